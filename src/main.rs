//! The `distill` binary: parse flags, run the library, map the outcome to an exit code.
//! 0 done, 1 done but some records failed, 2 error, 130 interrupted (rerun to resume).

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use distill::cli::{self, Cli};

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("warn,distill=info,mistralrs_core=error,mistralrs=error")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match cli::run(Cli::parse()) {
        Ok(o) if o.interrupted => ExitCode::from(130),
        Ok(o) if o.failed_records > 0 => ExitCode::from(1),
        Ok(_) => ExitCode::SUCCESS,
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("distill: error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
