//! The one integration-test binary. Engine tests run against every engine the setup
//! (`scripts/setup.sh`) starts, Docker and Podman, and fail (never skip) when one is missing.

mod attest;
mod build;
mod builders;
mod cache;
mod chunks;
mod cli;
mod doctor;
mod engines;
mod harness;
mod many;
mod pin;
mod platforms;
mod publish;
mod push;
mod registry_harness;
mod sbom;
mod stall;
mod stream;
mod tag_harness;
mod tags;
mod trust;
mod version;
