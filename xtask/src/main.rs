//! `cargo xtask`: the toolkit's command line.
//!
//! Run `cargo xtask` alone for the list of commands. `prune`, `eval` and `compare` are the
//! installable `diep` command's (crate `diep-cli`); `bench-methods`, `fixture`, `device` and `ci`
//! are the project's own.

mod bench;
mod bench_step;
mod device;
mod fixture;
mod generate;
mod train;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use diep_cli::{compare, eval, prune};

/// Expert pruning for HuggingFace Mixture-of-Experts checkpoints.
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", version)]
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
    /// Compare pruning methods: prune a model with every method at every ratio, evaluate
    /// held-out perplexity and multiple choice, write results.json, RESULTS.md and a chart.
    BenchMethods(bench::BenchArgs),
    /// Time one DiEP optimiser step (best of several) on a model and token ids; one JSON line.
    BenchStep(bench_step::BenchStepArgs),
    /// Build test fixtures: `fixture train` trains the `fixtures/trained-moe` model from scratch.
    Fixture(fixture::FixtureArgs),
    /// Check a compute device: bring it up and print its name as JSON, or fail with the reason.
    Device(device::DeviceArgs),
    /// Run the CI script (`.ci/run`): format, lint and doc gates, tests on CPU and on wgpu, and
    /// a build and link of the CUDA backend.
    Ci,
}

fn main() -> ExitCode {
    diep_cli::tune_allocator();
    // `cargo xtask` alone prints the list of commands and succeeds.
    if std::env::args_os().len() <= 1 {
        let _ = <Cli as clap::CommandFactory>::command().print_help();
        return ExitCode::SUCCESS;
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Prune(args) => prune::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Compare(args) => compare::run(args),
        Command::BenchMethods(args) => bench::run(args),
        Command::BenchStep(args) => bench_step::run(args),
        Command::Fixture(args) => fixture::run(args),
        Command::Device(args) => device::run(args),
        Command::Ci => util::run_ci(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            diep_cli::report_error(&e);
            ExitCode::FAILURE
        }
    }
}
