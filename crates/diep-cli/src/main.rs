//! `diep`: expert pruning for HuggingFace Mixture-of-Experts checkpoints.
//!
//! Run `diep` alone for the list of commands, `diep <command> --help` for its options
//! (`docs/CLI.md` lists them all).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use diep_cli::{compare, eval, prune};

/// Expert pruning for HuggingFace Mixture-of-Experts checkpoints.
#[derive(Parser)]
#[command(name = "diep", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per run
enum Command {
    /// Prune experts: compute a plan with a criterion on calibration text (or apply an
    /// existing pruning.json) and write the smaller checkpoint.
    Prune(prune::PruneArgs),
    /// Evaluate a model directory: perplexity over token ids and text files, multiple-choice
    /// tasks scored exactly as lm-evaluation-harness scores them.
    Eval(eval::EvalArgs),
    /// Evaluate a base and a pruned model on the same inputs; write a retention table
    /// (Markdown and JSON) and figures of kept experts per layer and retention.
    Compare(compare::CompareArgs),
}

fn main() -> ExitCode {
    diep_cli::tune_allocator();
    // `diep` alone prints the list of commands and succeeds.
    if std::env::args_os().len() <= 1 {
        let _ = <Cli as clap::CommandFactory>::command().print_help();
        return ExitCode::SUCCESS;
    }
    let result = match Cli::parse().command {
        Command::Prune(args) => prune::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Compare(args) => compare::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            diep_cli::report_error(&e);
            ExitCode::FAILURE
        }
    }
}
