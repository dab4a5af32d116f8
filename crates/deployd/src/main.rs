//! The `deployd` command: the server (`deployd serve`) and a CLI for it.
//!
//! This crate only composes the others: `args.rs` parses the command line, `serve.rs` starts
//! the Manager and the HTTP server, waits for a signal and drains with a deadline,
//! `commands.rs` calls a running server, `telemetry.rs` exports traces.

mod args;
mod commands;
mod serve;
mod telemetry;

use clap::Parser;

/// mimalloc instead of glibc's allocator: the task path allocates and frees many small buffers
/// on every request, where glibc's malloc spent about a quarter of the async thread's time
/// (see "The task-path benchmark" in docs/ARCHITECTURE.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The async runtime's worker threads: one fewer than the cores (at least one), since the
/// control store's writer runs on a thread of its own; `TOKIO_WORKER_THREADS` overrides it. On
/// two cores one worker served as many tasks as two, with a fifth less CPU per task (the
/// second worker mostly woke up to steal work).
fn worker_threads() -> Option<usize> {
    if std::env::var_os("TOKIO_WORKER_THREADS").is_some() {
        return None; // tokio reads it
    }
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    Some(cores.saturating_sub(1).max(1))
}

fn main() -> std::process::ExitCode {
    let cli = args::Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = worker_threads() {
        builder.worker_threads(threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
