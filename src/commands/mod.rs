//! One file per command. Each `run` takes the resolved settings and its own arguments.

pub(crate) mod build;
pub(crate) mod cache;
pub(crate) mod gc;
pub(crate) mod publish;
pub(crate) mod push;
pub(crate) mod version;
