//! `pinner`: the daemon and its command-line client. The commands live in
//! `pinner::cli`; this prints their error as one line.

use clap::Parser;
use pinner::cli::{commands, Cli};
use std::process::ExitCode;

fn main() -> ExitCode {
    match commands::run(Cli::parse()) {
        Ok(code) => code,
        Err(error) => {
            // Errors quote names and messages from elsewhere: one line, shown.
            eprintln!(
                "pinner: {}",
                pinner_shared::text::printable(&error.to_string())
            );
            ExitCode::FAILURE
        }
    }
}
