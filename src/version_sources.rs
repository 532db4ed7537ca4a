//! version_sources (to be written).
