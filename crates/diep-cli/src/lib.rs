//! The `diep` command line as a library: the `prune`, `eval` and `compare` subcommands, each a
//! clap argument struct and a `run` function over the library crates.
//!
//! The `diep` binary (`cargo install --path crates/diep-cli`) and the project's `cargo xtask`
//! orchestrator both dispatch here, so the two give the same arguments and the same output.
//! Nothing here depends on where the source tree is: every path is an argument.

#![warn(missing_docs)]

pub mod compare;
pub mod eval;
pub mod prune;
pub mod util;

/// Prints an error and its whole cause chain on one line (`error: what failed: why`).
pub fn report_error(e: &anyhow::Error) {
    eprintln!("error: {e:#}");
}
