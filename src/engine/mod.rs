//! The only bollard code (to be written).
