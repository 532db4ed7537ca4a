//! The only oci-client code (to be written).
