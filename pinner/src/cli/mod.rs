//! The `pinner` command line: its arguments (`args`, which the packaging
//! also turns into man pages and completions), each command's body
//! (`commands`), the text reports (`report`) and the socket client
//! (`client`).

pub mod args;
pub mod client;
pub mod commands;
pub mod demand;
pub mod map;
pub mod report;

pub use args::{Cli, Command};
