//! The one integration-test binary.

mod push;
mod registry_harness;
