//! The `store` binary: parses arguments and hands them to [`layerstore::cli::run`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = layerstore::cli::Cli::parse();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    match layerstore::cli::run(&cli, &mut out) {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`store blob ls | head`) is the reader's choice, not a failure.
        Err(layerstore::Error::Io { source, .. })
            if source.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            ExitCode::SUCCESS
        }
        // Problems are in the report already; the status says there were some.
        Err(layerstore::Error::ProblemsFound(n)) => {
            drop(out);
            eprintln!("store: {n} problem(s) found");
            ExitCode::from(3)
        }
        Err(e) => {
            drop(out);
            eprintln!("store: error: {e}");
            ExitCode::FAILURE
        }
    }
}
