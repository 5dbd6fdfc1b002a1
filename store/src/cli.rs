//! The `store` command line: argument definitions (clap) and the command logic, as a
//! library function so tests and embedders can run it in-process.
//!
//! This module owns only presentation: parsing arguments, choosing the store root,
//! printing human or JSON output, and progress on a terminal. Every operation it runs is a
//! public library call; it must never reach into store internals. The JSON shapes printed
//! here are a stable interface documented in `docs/CLI.md`.

use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};
use crate::store::{Options, PutOptions, Store};

/// The `store` command: a content-addressed store for container image content.
#[derive(Debug, Parser)]
#[command(name = "store", version, about, max_term_width = 100)]
pub struct Cli {
    /// Store root directory [default: `$STORE_ROOT`, else `$XDG_DATA_HOME/layerstore`, else
    /// `~/.local/share/layerstore`]
    #[arg(long, global = true, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Print no progress.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a store with chosen settings (any write creates one with defaults).
    Init {
        /// Number of pack shards (parallel writers); fixed for the store's life.
        #[arg(long, default_value_t = 16)]
        shards: u32,
    },
    /// Work with individual blobs.
    #[command(subcommand)]
    Blob(BlobCommand),
    /// Show store statistics.
    Info {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `store blob ...`
#[derive(Debug, Subcommand)]
pub enum BlobCommand {
    /// Store files (or `-` for standard input); prints one digest per input, in order.
    Put {
        /// Files to store; `-` reads standard input.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Write a blob's bytes to standard output or a file.
    Get {
        /// The blob's digest (`sha256:<hex>`).
        digest: String,
        /// Write to this file (atomically) instead of standard output.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Show what the index records for a blob.
    Stat {
        /// The blob's digest.
        digest: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List every blob.
    Ls {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
}

/// Resolves the store root: `--root`, else `$STORE_ROOT`, else the XDG data directory.
pub fn default_root(flag: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.to_owned());
    }
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(p) = env("STORE_ROOT") {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = env("XDG_DATA_HOME") {
        return Ok(PathBuf::from(p).join("layerstore"));
    }
    if let Some(h) = env("HOME") {
        return Ok(PathBuf::from(h).join(".local/share/layerstore"));
    }
    Err(Error::Invalid(
        "no store root: pass --root or set STORE_ROOT".into(),
    ))
}

/// Runs a parsed command line, writing results to `out`.
pub fn run(cli: &Cli, out: &mut dyn Write) -> Result<()> {
    let root = default_root(cli.root.as_deref())?;
    let open_existing = || Store::open(&root, Options::default().create(false));
    match &cli.command {
        Command::Init { shards } => {
            let s = Store::open(&root, Options::default().shards(*shards))?;
            let info = s.info()?;
            writeln!(
                out,
                "initialized store at {} ({} shards)",
                root.display(),
                info.shards
            )
            .map_err(stdout_err)?;
        }
        Command::Info { json } => {
            let info = open_existing()?.info()?;
            if *json {
                write_json(out, &info)?;
            } else {
                writeln!(
                    out,
                    "root:            {}\nblobs:           {}\nbytes:           {}\n\
                     large blobs:     {} ({} bytes)\nshards:          {}\n\
                     segments:        {} ({} sealed)\nlive bytes:      {}\ndead bytes:      {}",
                    info.root.display(),
                    info.blobs,
                    info.bytes,
                    info.large_blobs,
                    info.large_bytes,
                    info.shards,
                    info.segments,
                    info.sealed_segments,
                    info.live_bytes,
                    info.dead_bytes
                )
                .map_err(stdout_err)?;
            }
        }
        Command::Blob(BlobCommand::Put { files }) => {
            let store = Store::open(&root, Options::default())?;
            put_files(&store, files, cli.quiet, out)?;
        }
        Command::Blob(BlobCommand::Get { digest, output }) => {
            let d = Digest::parse(digest)?;
            let blob = open_existing()?.get(&d)?;
            match output {
                Some(path) => {
                    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
                    let dir = dir.unwrap_or(Path::new("."));
                    let mut tmp = tempfile::NamedTempFile::new_in(dir).ctx("create", dir)?;
                    tmp.write_all(&blob).ctx("write", tmp.path())?;
                    tmp.as_file().sync_all().ctx("fsync", tmp.path())?;
                    tmp.persist(path)
                        .map_err(|e| Error::io("rename", path, e.error))?;
                }
                None => out.write_all(&blob).map_err(stdout_err)?,
            }
        }
        Command::Blob(BlobCommand::Stat { digest, json }) => {
            let d = Digest::parse(digest)?;
            let info = open_existing()?.stat(&d)?.ok_or(Error::NotFound(d))?;
            if *json {
                write_json(out, &info)?;
            } else {
                let loc = match info.location {
                    crate::Location::Packed { segment, offset } => {
                        format!("packed (segment {segment}, offset {offset})")
                    }
                    crate::Location::Large { generation } => {
                        format!("large file (generation {generation})")
                    }
                };
                writeln!(
                    out,
                    "digest:   {}\nsize:     {}\nkind:     {}\nlocation: {loc}\nblake3:   {}\ntouched:  {} ms since epoch",
                    info.digest,
                    info.size,
                    info.kind.name(),
                    hex::encode(info.blake3),
                    info.touched_ms
                )
                .map_err(stdout_err)?;
            }
        }
        Command::Blob(BlobCommand::Ls { json }) => {
            let store = open_existing()?;
            if *json {
                out.write_all(b"[").map_err(stdout_err)?;
            }
            for (i, item) in store.iter().enumerate() {
                let info = item?;
                if *json {
                    if i > 0 {
                        out.write_all(b",").map_err(stdout_err)?;
                    }
                    out.write_all(b"\n").map_err(stdout_err)?;
                    serde_json::to_writer(&mut *out, &info).map_err(|e| stdout_err(e.into()))?;
                } else {
                    writeln!(out, "{}\t{}\t{}", info.digest, info.size, info.kind.name())
                        .map_err(stdout_err)?;
                }
            }
            if *json {
                out.write_all(b"\n]\n").map_err(stdout_err)?;
            }
        }
    }
    out.flush().map_err(stdout_err)
}

fn stdout_err(e: std::io::Error) -> Error {
    Error::io("write", "standard output", e)
}

fn write_json(out: &mut dyn Write, v: &impl serde::Serialize) -> Result<()> {
    serde_json::to_writer_pretty(&mut *out, v).map_err(|e| stdout_err(e.into()))?;
    out.write_all(b"\n").map_err(stdout_err)
}

/// Budget of small files read into memory for one `put_many` batch.
const BATCH_BYTES: u64 = 64 << 20;

fn put_files(store: &Store, files: &[PathBuf], quiet: bool, out: &mut dyn Write) -> Result<()> {
    let threshold = Options::default().large_threshold;
    let mut sizes = Vec::with_capacity(files.len());
    for f in files {
        sizes.push(if f.as_os_str() == "-" {
            None
        } else {
            Some(std::fs::metadata(f).ctx("stat", f)?.len())
        });
    }
    let bar = progress(sizes.iter().flatten().sum(), quiet);
    let mut batch: Vec<Vec<u8>> = Vec::new();
    let mut batch_bytes = 0u64;
    let flush = |batch: &mut Vec<Vec<u8>>, out: &mut dyn Write| -> Result<()> {
        for d in store.put_many(batch.drain(..))? {
            writeln!(out, "{}", d.digest).map_err(stdout_err)?;
        }
        Ok(())
    };
    for (path, size) in files.iter().zip(&sizes) {
        match size {
            Some(n) if *n < threshold => {
                let data = std::fs::read(path).ctx("read", path)?;
                batch_bytes += data.len() as u64;
                bar.inc(data.len() as u64);
                batch.push(data);
                if batch_bytes >= BATCH_BYTES {
                    flush(&mut batch, out)?;
                    batch_bytes = 0;
                }
            }
            _ => {
                flush(&mut batch, out)?;
                batch_bytes = 0;
                let r#ref = format!("cli-put-{}-{}", std::process::id(), sys_seq());
                let mut ing = store.ingest(&r#ref, PutOptions::default())?;
                if path.as_os_str() == "-" {
                    ing.write_from(&mut std::io::stdin().lock())?;
                } else {
                    let mut f = File::open(path).ctx("open", path)?;
                    ing.write_from(&mut ProgressRead(&mut f, &bar))?;
                }
                let d = ing.commit()?;
                writeln!(out, "{}", d.digest).map_err(stdout_err)?;
            }
        }
    }
    flush(&mut batch, out)?;
    bar.finish_and_clear();
    Ok(())
}

struct ProgressRead<'a, R>(&'a mut R, &'a indicatif::ProgressBar);

impl<R: Read> Read for ProgressRead<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        self.1.inc(n as u64);
        Ok(n)
    }
}

/// A byte progress bar on standard error when it is a terminal and `quiet` is off.
pub fn progress(total: u64, quiet: bool) -> indicatif::ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    bar
}

fn sys_seq() -> u64 {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}
