//! Types and codec shared by `pinner-hook` and the `pinner` daemon/CLI.
//!
//! Kept free of heavy dependencies: the hook links this crate and starts on
//! every libvirt domain event.

pub mod log;
pub mod paths;
pub mod protocol;
pub mod text;
pub mod wire;
