//! The `store` binary: parses arguments and hands them to [`layerstore::cli::run`]; when
//! another process holds the store, to that process through its admin socket
//! ([`layerstore::admin`]).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = layerstore::cli::Cli::parse();
    if cli.verbose || std::env::var_os("RUST_LOG").is_some() {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("layerstore=debug"));
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
            .init();
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let r = layerstore::cli::run(&cli, &mut out);
    drop(out);
    // Every command opens the store before it reads input or writes output, so a locked
    // store is found before anything was done here: hand the command over.
    let r = match r {
        Err(layerstore::Error::Locked { path }) => match layerstore::admin::forward(&path, cli) {
            Ok(Some(code)) => return ExitCode::from(code),
            Ok(None) => Err(layerstore::Error::Locked { path }),
            Err(e) => Err(e),
        },
        r => r,
    };
    ExitCode::from(layerstore::cli::exit_status(&r, &mut std::io::stderr()))
}
