//! One file per command. Each `run` takes the resolved settings and its own arguments.

pub mod build;
pub mod cache;
pub mod gc;
pub mod publish;
pub mod push;
pub mod version;
