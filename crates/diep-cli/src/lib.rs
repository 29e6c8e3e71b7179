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

/// Sets glibc's malloc for the tensors of a DiEP step; both binaries call it first thing.
///
/// A step allocates and frees buffers of megabytes to tens of megabytes (attention scores,
/// logits, their gradients) many times. By default glibc raises its `mmap` threshold as such
/// buffers are freed and returns the top of the heap to the kernel past 128 KB, so the same
/// memory is unmapped or trimmed and faulted in (and zeroed) again on every use. A fixed
/// threshold (32 MiB, glibc's maximum) and a 1 GiB trim threshold keep it: on
/// `fixtures/trained-moe` a 0.25-global DiEP run takes about 20 % less time for the same result
/// (`docs/PERFORMANCE.md`, "A DiEP step on the CPU"). Other platforms keep their allocator
/// unchanged.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: `mallopt` only changes malloc's parameters; it is called before any other thread
    // exists and with values glibc documents as valid.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
