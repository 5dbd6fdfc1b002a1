//! The `store` command line: argument definitions (clap) and the command logic, as a
//! library function so tests and embedders can run it in-process.
//!
//! This module owns only presentation: parsing arguments, choosing the store root,
//! printing human or JSON output, and progress on a terminal. Every operation it runs is a
//! public library call; it must never reach into store internals. The JSON shapes printed
//! here are a stable interface documented in `docs/CLI.md`.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::{Parser, Subcommand};

use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};
use crate::store::{Options, PutOptions, Store};

/// The `store` command: a content-addressed store for container image content.
#[derive(Debug, Parser, serde::Serialize, serde::Deserialize)]
#[command(name = "store", version, about, max_term_width = 100)]
pub struct Cli {
    /// Store root directory [default: `$STORE_ROOT`, else `$XDG_DATA_HOME/layerstore`, else
    /// `~/.local/share/layerstore`]
    #[arg(long, global = true, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Print no progress.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Log the library's operations (spans with sizes and durations) on standard error;
    /// `RUST_LOG` (e.g. `layerstore=trace`) picks what. A command handed to the process
    /// holding the store logs there, if it logs.
    #[arg(long, short, global = true)]
    pub verbose: bool,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// `--format` of `store export`: the library's [`crate::ExportFormat`], which carries no
/// CLI derives.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
pub enum FormatArg {
    /// An OCI image layout in a tar (what `skopeo copy oci-archive:` reads).
    Oci,
    /// A `docker save` archive: an OCI layout plus `manifest.json` (the Docker 25+ form).
    Docker,
    /// An OCI image layout directory.
    OciDir,
}

impl From<FormatArg> for crate::ExportFormat {
    fn from(f: FormatArg) -> crate::ExportFormat {
        match f {
            FormatArg::Oci => crate::ExportFormat::Oci,
            FormatArg::Docker => crate::ExportFormat::Docker,
            FormatArg::OciDir => crate::ExportFormat::OciDir,
        }
    }
}

/// Top-level commands.
#[derive(Debug, Subcommand, serde::Serialize, serde::Deserialize)]
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
    /// Import an OCI layout directory, an OCI archive or a `docker save` archive (`-`:
    /// a tar on standard input). Atomic: a bad archive commits nothing.
    Import {
        /// The directory or tar file, or `-`.
        path: PathBuf,
        /// Name the imported image (the archive must hold exactly one).
        #[arg(long = "tag", value_name = "REF")]
        tags: Vec<String>,
        /// Repository for images the archive names only by a bare tag (`latest`).
        #[arg(long, value_name = "REPO")]
        base_name: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Export images as an OCI archive, a `docker save` archive, or an OCI layout directory.
    Export {
        /// Images to export (names or digests).
        #[arg(required = true, value_name = "REF")]
        refs: Vec<String>,
        /// Output file (`-` for standard output), or directory with `--format oci-dir`.
        #[arg(short, long, value_name = "PATH")]
        output: PathBuf,
        /// Archive format.
        #[arg(long, value_enum, default_value = "oci")]
        format: FormatArg,
    },
    /// List named images.
    Images {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show an image's manifest, config, layers, or an index's platforms.
    Inspect {
        /// A name or digest.
        reference: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Give an image another name.
    Tag {
        /// An existing name or digest.
        source: String,
        /// The new name.
        target: String,
    },
    /// Remove names. Refused for the last name of an image a container uses, unless forced.
    Rmi {
        /// Names (or digests: removes every name of that image).
        #[arg(required = true, value_name = "REF")]
        refs: Vec<String>,
        /// Remove the name even if a container uses the image (the container keeps it).
        #[arg(long, short)]
        force: bool,
    },
    /// Containers: how a runtime tells the store that an image is in use.
    #[command(subcommand)]
    Container(ContainerCommand),
    /// Leases: protect content for a while (e.g. during a multi-step push).
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Collect garbage: remove what no name, container or lease reaches.
    Gc {
        /// Print exactly what a real run would remove; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Keep blobs touched within this period (`10m`, `1h`, `0s`).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
        grace: std::time::Duration,
        /// Also collect referrers (signatures, SBOMs) of live images.
        #[arg(long)]
        drop_referrers: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check the store: blake3 (`--fast`), OCI digests (default), or everything (`--deep`).
    /// Exit status 3 when problems are found.
    Verify {
        /// Only blake3 of stored bytes against the index.
        #[arg(long, conflicts_with = "deep")]
        fast: bool,
        /// Also layers against `diff_ids`, JSON, the graph, segments, orphans.
        #[arg(long)]
        deep: bool,
        /// Quarantine corrupt blobs and rebuild reference counts.
        #[arg(long)]
        repair: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild the index from the self-describing pack records and large files.
    Repair {
        /// Required: the index (meta.redb) is moved aside and rebuilt.
        #[arg(long, required = true)]
        rebuild_index: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Apply an image's layers into a new directory (a root filesystem).
    Unpack {
        /// The image (name or digest).
        reference: String,
        /// The directory to create.
        dir: PathBuf,
        /// For an index: `os/arch[/variant]` (default: this machine's).
        #[arg(long)]
        platform: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Images: `store image prune [--all]`.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Disk usage by image, layer and container.
    Df {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `store image ...`
#[derive(Debug, Subcommand, serde::Serialize, serde::Deserialize)]
pub enum ImageCommand {
    /// Remove dangling images (no name, no container); with `--all`, every image no
    /// container uses (their names first), as `docker image prune` does.
    Prune {
        /// Remove every image no container uses, not only dangling ones.
        #[arg(long, short)]
        all: bool,
        /// Keep blobs touched within this period.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
        grace: std::time::Duration,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `store container ...`
#[derive(Debug, Subcommand, serde::Serialize, serde::Deserialize)]
pub enum ContainerCommand {
    /// Record a container using an image; prints its id.
    Create {
        /// The image (name or digest).
        #[arg(long)]
        image: String,
        /// A unique name (default: the first 12 digits of the id).
        #[arg(long)]
        name: Option<String>,
    },
    /// Remove a container (by id, unique id prefix, or name).
    Rm {
        /// Id, id prefix or name.
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// List containers.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `store lease ...`
#[derive(Debug, Subcommand, serde::Serialize, serde::Deserialize)]
pub enum LeaseCommand {
    /// Create a lease; prints its id.
    Create {
        /// Expire after this long (`30s`, `10m`, `2h`, `1d`); default never.
        #[arg(long, value_parser = humantime::parse_duration)]
        expire: Option<std::time::Duration>,
    },
    /// List leases.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a lease.
    Rm {
        /// Lease id.
        id: String,
    },
    /// Add blobs to a lease.
    Add {
        /// Lease id.
        id: String,
        /// Digests.
        #[arg(required = true)]
        digests: Vec<String>,
    },
}

/// `store blob ...`
#[derive(Debug, Subcommand, serde::Serialize, serde::Deserialize)]
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

impl Cli {
    /// Makes the command's relative paths absolute against `cwd`, and names the root
    /// explicitly: the form in which another process can run it. Refuses paths that
    /// name this process's own descriptors (`/dev/stdin`, `/dev/fd/N`, `/proc/self/…`),
    /// which mean something else in another process: use `-` for standard input.
    pub fn absolutize(&mut self, root: &Path, cwd: &Path) -> Result<()> {
        fn abs(p: &mut PathBuf, cwd: &Path) -> Result<()> {
            let own = [
                "/dev/stdin",
                "/dev/stdout",
                "/dev/stderr",
                "/dev/fd",
                "/proc/self",
            ];
            if own.iter().any(|o| p.starts_with(o)) {
                return Err(Error::Invalid(format!(
                    "{} names this process's own descriptor, which the process holding \
                     the store cannot open (use `-` for standard input or output)",
                    p.display()
                )));
            }
            if p.is_relative() {
                *p = cwd.join(&*p);
            }
            Ok(())
        }
        // `-` is standard input or output only where the command says so.
        let stdio = |p: &PathBuf| p.as_os_str() == "-";
        let mut root = root.to_owned();
        abs(&mut root, cwd)?;
        self.root = Some(root);
        match &mut self.command {
            Command::Import { path, .. } if !stdio(path) => abs(path, cwd)?,
            Command::Export { output, format, .. }
                if !stdio(output) || *format == FormatArg::OciDir =>
            {
                abs(output, cwd)?;
            }
            Command::Unpack { dir, .. } => abs(dir, cwd)?,
            Command::Blob(BlobCommand::Put { files }) => {
                for f in files.iter_mut().filter(|f| !stdio(f)) {
                    abs(f, cwd)?;
                }
            }
            Command::Blob(BlobCommand::Get {
                output: Some(o), ..
            }) => abs(o, cwd)?,
            _ => {}
        }
        Ok(())
    }
}

/// The exit status of a finished command, its error (if any) written to `err` as
/// `store: error: ...`: 0 on success (a closed pipe on standard output, as in
/// `store blob ls | head`, is the reader's choice, not a failure), 3 when a check found
/// problems (they are in the report already), 1 otherwise. Standard output must be
/// flushed first, so the error comes after what was printed.
pub fn exit_status(r: &Result<()>, err: &mut dyn Write) -> u8 {
    match r {
        Ok(()) => 0,
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::BrokenPipe => 0,
        Err(Error::ProblemsFound(n)) => {
            let _ = writeln!(err, "store: {n} problem(s) found");
            3
        }
        Err(e) => {
            let _ = writeln!(err, "store: error: {e}");
            1
        }
    }
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

/// Where a command runs: in this process, opening the store itself, or in the process
/// that holds the store open, serving it to a `store` command of another process
/// ([`crate::admin`]).
pub struct Session {
    /// The served store: every open returns it.
    served: Option<Store>,
    /// Standard input (the client's, when served); `None`: this process's.
    stdin: Option<std::sync::Mutex<File>>,
    /// Set to stop a long command (the client went away).
    interrupt: Arc<AtomicBool>,
}

impl Session {
    /// A command run by this process on a store it opens.
    pub fn local() -> Session {
        Session {
            served: None,
            stdin: None,
            interrupt: Arc::default(),
        }
    }

    /// A command served on `store` for another process: its standard input is `stdin`,
    /// and `interrupt` stops long work. Progress is never drawn (the terminal is the
    /// other process's).
    pub fn served(store: Store, stdin: File, interrupt: Arc<AtomicBool>) -> Session {
        Session {
            served: Some(store),
            stdin: Some(std::sync::Mutex::new(stdin)),
            interrupt,
        }
    }

    fn open(&self, root: &Path, opts: Options) -> Result<Store> {
        match &self.served {
            Some(s) => Ok(s.clone()),
            None => Store::open(root, opts),
        }
    }

    fn open_existing(&self, root: &Path) -> Result<Store> {
        self.open(root, Options::default().create(false))
    }

    fn read_only(&self, root: &Path) -> Result<Store> {
        match &self.served {
            Some(s) => Ok(s.clone()),
            None => open_read_only(root),
        }
    }

    /// Whether progress must stay hidden whatever the terminal.
    fn quiet(&self, quiet: bool) -> bool {
        quiet || self.served.is_some()
    }

    fn with_stdin<T>(&self, f: impl FnOnce(&mut dyn Read) -> Result<T>) -> Result<T> {
        match &self.stdin {
            Some(m) => f(&mut *m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)),
            None => f(&mut std::io::stdin().lock()),
        }
    }
}

/// Runs a parsed command line in this process, writing results to `out`.
pub fn run(cli: &Cli, out: &mut dyn Write) -> Result<()> {
    run_in(cli, &Session::local(), out)
}

/// Runs a parsed command line in `session`, writing results to `out`.
pub fn run_in(cli: &Cli, session: &Session, out: &mut dyn Write) -> Result<()> {
    let root = default_root(cli.root.as_deref())?;
    let open_existing = || session.open_existing(&root);
    let open_reading = || session.read_only(&root);
    let interrupt = &*session.interrupt;
    match &cli.command {
        Command::Init { shards } => {
            let s = session.open(&root, Options::default().shards(*shards))?;
            let info = s.info()?;
            if info.shards != *shards {
                return Err(Error::Invalid(format!(
                    "the store at {} already exists with {} shards (fixed at creation)",
                    root.display(),
                    info.shards
                )));
            }
            writeln!(
                out,
                "initialized store at {} ({} shards)",
                root.display(),
                info.shards
            )
            .map_err(stdout_err)?;
        }
        Command::Info { json } => {
            let store = open_reading()?;
            let info = store.info()?;
            // Since the store was opened: by this command, or by the process serving it.
            let m = store.metrics();
            if *json {
                #[derive(serde::Serialize)]
                struct WithMetrics<'a> {
                    #[serde(flatten)]
                    info: &'a crate::Info,
                    metrics: &'a crate::Metrics,
                }
                write_json(
                    out,
                    &WithMetrics {
                        info: &info,
                        metrics: &m,
                    },
                )?;
            } else {
                writeln!(
                    out,
                    "root:            {}\nblobs:           {}\nbytes:           {}\n\
                     large blobs:     {} ({} bytes)\nshards:          {}\n\
                     segments:        {} ({} sealed)\nlive bytes:      {}\ndead bytes:      {}\n\
                     in progress:     {} ingest(s) ({} bytes)",
                    info.root.display(),
                    info.blobs,
                    info.bytes,
                    info.large_blobs,
                    info.large_bytes,
                    info.shards,
                    info.segments,
                    info.sealed_segments,
                    info.live_bytes,
                    info.dead_bytes,
                    info.ingests,
                    info.ingest_bytes
                )
                .map_err(stdout_err)?;
                writeln!(
                    out,
                    "since open:      {} blob(s) written ({} bytes), {} removed, {} read; \
                     {} commit(s), mean {} us, max {} us; {} collection(s)",
                    m.blobs_written,
                    m.bytes_written,
                    m.blobs_removed,
                    m.reads,
                    m.commits,
                    m.commit_us.checked_div(m.commits).unwrap_or(0),
                    m.commit_us_max,
                    m.gc_runs
                )
                .map_err(stdout_err)?;
            }
        }
        Command::Blob(BlobCommand::Put { files }) => {
            let store = session.open(&root, Options::default())?;
            put_files(&store, files, session, session.quiet(cli.quiet), out)?;
        }
        Command::Blob(BlobCommand::Get { digest, output }) => {
            let d = Digest::parse(digest)?;
            let blob = open_reading()?.get(&d)?;
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
            let info = open_reading()?.stat(&d)?.ok_or(Error::NotFound(d))?;
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
        Command::Import {
            path,
            tags,
            base_name,
            json,
        } => {
            let store = session.open(&root, Options::default())?;
            let opts = crate::archive::ImportOptions {
                tags: tags.clone(),
                base_name: base_name.clone(),
                interrupt: Some(session.interrupt.clone()),
            };
            let outcome = if path.as_os_str() == "-" {
                session.with_stdin(|r| store.import_tar(r, &opts))?
            } else {
                store.import_path(path, &opts)?
            };
            if *json {
                write_json(out, &outcome)?;
            } else {
                for img in &outcome.images {
                    for n in &img.names {
                        writeln!(out, "imported {n} {}", img.digest).map_err(stdout_err)?;
                    }
                }
            }
        }
        Command::Export {
            refs,
            output,
            format,
        } => {
            let store = open_reading()?;
            let format = crate::archive::ExportFormat::from(*format);
            if output.as_os_str() == "-" && format != crate::archive::ExportFormat::OciDir {
                store.export_with(refs, format, &mut *out, interrupt)?;
            } else {
                store.export_path(refs, format, output, interrupt)?;
            }
        }
        Command::Images { json } => {
            let images = open_reading()?.images()?;
            if *json {
                write_json(out, &images)?;
            } else {
                let mut t = Table::new(&["NAME", "DIGEST", "SIZE", "CREATED", "CONTAINERS"]);
                for i in &images {
                    t.row(vec![
                        i.name.clone(),
                        short(&i.digest),
                        human_bytes(i.size),
                        i.created.clone().unwrap_or_default(),
                        i.containers.len().to_string(),
                    ]);
                }
                t.print(out)?;
            }
        }
        Command::Inspect { reference, json } => {
            let d = open_reading()?.inspect(reference)?;
            if *json {
                write_json(out, &d)?;
            } else {
                print_details(out, &d).map_err(stdout_err)?;
            }
        }
        Command::Tag { source, target } => {
            let store = open_existing()?;
            let d = store.resolve(source)?;
            let r = store.tag(target, &d)?;
            writeln!(out, "{} -> {d}", r.familiar()).map_err(stdout_err)?;
        }
        Command::Rmi { refs, force } => {
            let store = open_existing()?;
            for r in refs {
                for (name, _) in store.remove_image(r, *force)? {
                    let n = crate::Reference::parse(&name).map_or(name, |r| r.familiar());
                    writeln!(out, "Untagged: {n}").map_err(stdout_err)?;
                }
            }
        }
        Command::Container(c) => container_cmd(session, &root, c, out)?,
        Command::Lease(c) => lease_cmd(session, &root, c, out)?,
        Command::Gc {
            dry_run,
            grace,
            drop_referrers,
            json,
        } => {
            let store = if *dry_run {
                open_reading()?
            } else {
                open_existing()?
            };
            let opts = crate::GcOptions::default()
                .dry_run(*dry_run)
                .grace(*grace)
                .drop_referrers(*drop_referrers);
            let bar = GcBar::new(session.quiet(cli.quiet) || *json);
            let report = store.gc_progress(&opts, interrupt, &bar)?;
            bar.0.finish_and_clear();
            if *json {
                write_json(out, &report)?;
            } else {
                print_gc(out, &report).map_err(stdout_err)?;
            }
        }
        Command::Image(ImageCommand::Prune { all, grace, json }) => {
            let store = open_existing()?;
            let mut untagged = Vec::new();
            if *all {
                let used: std::collections::HashSet<Digest> =
                    store.containers()?.into_iter().map(|c| c.image).collect();
                for (name, d) in store.names()? {
                    if !used.contains(&d) {
                        untagged.extend(store.remove_image(&name, false)?);
                    }
                }
            }
            let bar = GcBar::new(session.quiet(cli.quiet) || *json);
            let report =
                store.gc_progress(&crate::GcOptions::default().grace(*grace), interrupt, &bar)?;
            bar.0.finish_and_clear();
            if *json {
                #[derive(serde::Serialize)]
                struct Prune<'a> {
                    untagged: Vec<&'a str>,
                    gc: &'a crate::GcReport,
                }
                let p = Prune {
                    untagged: untagged.iter().map(|(n, _)| n.as_str()).collect(),
                    gc: &report,
                };
                write_json(out, &p)?;
            } else {
                for (n, _) in &untagged {
                    let n = crate::Reference::parse(n).map_or_else(|_| n.clone(), |r| r.familiar());
                    writeln!(out, "Untagged: {n}").map_err(stdout_err)?;
                }
                print_gc(out, &report).map_err(stdout_err)?;
            }
        }
        Command::Verify {
            fast,
            deep,
            repair,
            json,
        } => {
            let store = if *repair {
                open_existing()?
            } else {
                open_reading()?
            };
            let depth = if *fast {
                crate::Depth::Fast
            } else if *deep {
                crate::Depth::Deep
            } else {
                crate::Depth::Digest
            };
            let total = store.info()?.bytes;
            let bar = progress(total, session.quiet(cli.quiet) || *json);
            let report = store.verify(
                &crate::VerifyOptions::depth(depth).repair(*repair),
                interrupt,
                &|n| bar.set_position(n),
            )?;
            bar.finish_and_clear();
            if *json {
                write_json(out, &report)?;
            } else {
                print_verify(out, &report).map_err(stdout_err)?;
            }
            if report.errors > 0 {
                out.flush().map_err(stdout_err)?;
                return Err(Error::ProblemsFound(report.errors));
            }
        }
        Command::Repair { json, .. } => {
            if session.served.is_some() {
                return Err(Error::Invalid(format!(
                    "repair rebuilds the index of {} and needs it closed, but a process \
                     holds it open (serving this command): stop that process first",
                    root.display()
                )));
            }
            let report = crate::repair::rebuild_index(&root)?;
            if *json {
                write_json(out, &report)?;
            } else {
                writeln!(
                    out,
                    "recovered {} blobs ({} manifests and indexes, {} edges) from {} segments and {} large files\n\
                     they are held by lease {:?}: re-create names (store tag / import), then `store lease rm {}`\n\
                     lost for good (they live only in the index): names, containers, leases",
                    report.blobs,
                    report.manifests,
                    report.edges,
                    report.segments,
                    report.large_files,
                    crate::gc::RECOVERED_LEASE,
                    crate::gc::RECOVERED_LEASE
                )
                .map_err(stdout_err)?;
                if let Some(p) = &report.old_index {
                    writeln!(out, "the old index was kept as {}", p.display())
                        .map_err(stdout_err)?;
                }
            }
        }
        Command::Unpack {
            reference,
            dir,
            platform,
            json,
        } => {
            let store = open_reading()?;
            let mut opts = crate::unpack::UnpackOptions::default();
            opts.platform.clone_from(platform);
            opts.interrupt = Some(session.interrupt.clone());
            let report = store.unpack(reference, dir, &opts)?;
            if *json {
                write_json(out, &report)?;
            } else {
                writeln!(
                    out,
                    "unpacked {} layers ({} entries, {}) into {}",
                    report.layers,
                    report.entries,
                    human_bytes(report.bytes),
                    dir.display()
                )
                .map_err(stdout_err)?;
            }
        }
        Command::Df { json } => {
            let u = open_reading()?.disk_usage()?;
            if *json {
                write_json(out, &u)?;
            } else {
                print_df(out, &u)?;
            }
        }
        Command::Blob(BlobCommand::Ls { json }) => {
            let store = open_reading()?;
            if *json {
                out.write_all(b"[").map_err(stdout_err)?;
            }
            for (i, item) in store.iter().enumerate() {
                if interrupt.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(Error::Interrupted);
                }
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

/// Opens an existing store for a command that only reads: without writing anything (so
/// a read-only root works too); a store a crash left needing recovery is opened writable
/// once for it, when the root allows.
fn open_read_only(root: &Path) -> Result<Store> {
    match Store::open(root, Options::default().create(false).read_only(true)) {
        Err(Error::NeedsRecovery { why, .. }) => {
            Store::open(root, Options::default().create(false)).map_err(|e| match e {
                // A root this user cannot write: say why a write was needed.
                Error::Io { .. } => Error::NeedsRecovery {
                    path: root.to_owned(),
                    why,
                },
                e => e,
            })
        }
        r => r,
    }
}

fn container_cmd(
    session: &Session,
    root: &Path,
    c: &ContainerCommand,
    out: &mut dyn Write,
) -> Result<()> {
    match c {
        ContainerCommand::Create { image, name } => {
            let store = session.open_existing(root)?;
            let rec = store.container_create(image, name.as_deref())?;
            writeln!(out, "{}", rec.id).map_err(stdout_err)
        }
        ContainerCommand::Rm { containers } => {
            let store = session.open_existing(root)?;
            for c in containers {
                let rec = store.container_remove(c)?;
                writeln!(out, "{}", rec.id).map_err(stdout_err)?;
            }
            Ok(())
        }
        ContainerCommand::Ls { json } => {
            let list = session.read_only(root)?.containers()?;
            if *json {
                return write_json(out, &list);
            }
            let mut t = Table::new(&["CONTAINER ID", "IMAGE", "NAME", "CREATED"]);
            for c in &list {
                t.row(vec![
                    c.id.chars().take(12).collect(),
                    c.image_ref.clone(),
                    c.name.clone(),
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + std::time::Duration::from_millis(c.created_ms),
                    )
                    .to_string(),
                ]);
            }
            t.print(out)
        }
    }
}

fn lease_cmd(session: &Session, root: &Path, c: &LeaseCommand, out: &mut dyn Write) -> Result<()> {
    match c {
        LeaseCommand::Create { expire } => {
            let store = session.open(root, Options::default())?;
            let rec = store.lease_create(*expire)?;
            writeln!(out, "{}", rec.id).map_err(stdout_err)
        }
        LeaseCommand::Rm { id } => session.open_existing(root)?.lease_remove(id),
        LeaseCommand::Add { id, digests } => {
            let ds = digests
                .iter()
                .map(|d| Digest::parse(d))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            session.open_existing(root)?.lease_add(id, &ds)
        }
        LeaseCommand::Ls { json } => {
            let list = session.read_only(root)?.leases()?;
            if *json {
                return write_json(out, &list);
            }
            let mut t = Table::new(&["LEASE ID", "EXPIRES", "RESOURCES"]);
            for l in &list {
                let exp = l.record.expires_ms.map_or_else(
                    || "never".to_owned(),
                    |ms| {
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
                        )
                        .to_string()
                    },
                );
                t.row(vec![
                    l.record.id.clone(),
                    exp,
                    l.resources.len().to_string(),
                ]);
            }
            t.print(out)
        }
    }
}

fn print_details(out: &mut dyn Write, d: &crate::catalog::ImageDetails) -> std::io::Result<()> {
    writeln!(out, "Digest:    {}", d.digest)?;
    writeln!(out, "Kind:      {}", d.kind.name())?;
    if let Some(m) = &d.media_type {
        writeln!(out, "MediaType: {m}")?;
    }
    writeln!(out, "Names:     {}", d.names.join(", "))?;
    writeln!(out, "Size:      {}", human_bytes(d.size))?;
    if let Some(c) = &d.config {
        writeln!(out, "Config:    {} ({} bytes)", c.digest, c.size)?;
    }
    if let Some(i) = &d.config_info {
        writeln!(
            out,
            "Platform:  {}/{}",
            i.os.as_deref().unwrap_or("?"),
            i.architecture.as_deref().unwrap_or("?")
        )?;
        if let Some(c) = &i.created {
            writeln!(out, "Created:   {c}")?;
        }
    }
    if !d.layers.is_empty() {
        writeln!(out, "Layers:")?;
        for l in &d.layers {
            writeln!(
                out,
                "  {} {:>10}  {}",
                l.digest,
                human_bytes(l.size),
                l.media_type
            )?;
        }
    }
    if !d.platforms.is_empty() {
        writeln!(out, "Platforms:")?;
        for p in &d.platforms {
            writeln!(
                out,
                "  {:<20} {}",
                p.platform.as_deref().unwrap_or("-"),
                p.digest
            )?;
        }
    }
    if !d.missing.is_empty() {
        writeln!(out, "Missing:")?;
        for m in &d.missing {
            writeln!(out, "  {m}")?;
        }
    }
    if !d.containers.is_empty() {
        writeln!(out, "Containers: {}", d.containers.join(", "))?;
    }
    Ok(())
}

fn print_verify(out: &mut dyn Write, r: &crate::VerifyReport) -> std::io::Result<()> {
    writeln!(
        out,
        "checked {} blobs ({}) at depth {:?} in {} ms: {} problem(s)",
        r.blobs,
        human_bytes(r.bytes),
        r.depth,
        r.elapsed_ms,
        r.problems.len()
    )?;
    for p in &r.problems {
        let what = p
            .digest
            .map(|d| d.to_string())
            .or_else(|| p.path.as_ref().map(|p| p.display().to_string()))
            .unwrap_or_default();
        writeln!(out, "  {:<13} {what}: {}", p.kind, p.detail)?;
        if !p.images.is_empty() {
            writeln!(out, "                affects: {}", p.images.join(", "))?;
        }
    }
    if let Some(rep) = &r.repaired {
        writeln!(
            out,
            "repaired: {} blob(s) quarantined, {} refcount(s) and {} hold(s) rewritten",
            rep.quarantined.len(),
            rep.refcounts_fixed,
            rep.holds_fixed
        )?;
        for (image, missing) in &rep.images_lacking {
            writeln!(
                out,
                "  {image} now lacks {} blob(s): re-import or re-pull it",
                missing.len()
            )?;
        }
    }
    Ok(())
}

fn print_gc(out: &mut dyn Write, r: &crate::GcReport) -> std::io::Result<()> {
    let verb = if r.dry_run { "would remove" } else { "removed" };
    writeln!(
        out,
        "{verb} {} blobs, {}",
        r.removed_blobs,
        human_bytes(r.removed_bytes)
    )?;
    for (kind, s) in &r.removed_by_kind {
        writeln!(
            out,
            "  {kind:<9} {:>8} blobs  {:>10}",
            s.blobs,
            human_bytes(s.bytes)
        )?;
    }
    for d in &r.removed {
        writeln!(out, "  {d}")?;
    }
    if !r.kept_for_containers.is_empty() {
        writeln!(out, "kept only because a container uses them:")?;
        for d in &r.kept_for_containers {
            writeln!(out, "  {d}")?;
        }
    }
    if !r.expired_leases.is_empty() {
        writeln!(out, "expired leases: {}", r.expired_leases.join(", "))?;
    }
    writeln!(
        out,
        "segments compacted: {} ({}), orphans removed: {}",
        r.segments_compacted,
        human_bytes(r.compacted_bytes),
        r.orphans_removed
    )?;
    let p = &r.phases;
    writeln!(
        out,
        "phases: expire {} ms, mark {} ms, sweep {} ms, compact {} ms, orphans {} ms",
        p.expire_ms, p.mark_ms, p.sweep_ms, p.compact_ms, p.orphans_ms
    )
}

fn print_df(out: &mut dyn Write, u: &crate::catalog::DiskUsage) -> Result<()> {
    let line = |out: &mut dyn Write, s: String| writeln!(out, "{s}").map_err(stdout_err);
    line(out, format!("Images:      {}", u.images.len()))?;
    line(out, format!("Containers:  {}", u.containers))?;
    line(out, format!("Total:       {}", human_bytes(u.total)))?;
    line(out, format!("Shared:      {}", human_bytes(u.shared)))?;
    line(out, format!("Unique:      {}", human_bytes(u.unique)))?;
    line(out, format!("Reclaimable: {}", human_bytes(u.reclaimable)))?;
    line(out, String::new())?;
    let mut t = Table::new(&["IMAGES", "DIGEST", "SIZE", "SHARED", "UNIQUE", "CONTAINERS"]);
    for i in &u.images {
        t.row(vec![
            if i.names.is_empty() {
                "<none>".into()
            } else {
                i.names.join(",")
            },
            short(&i.digest),
            human_bytes(i.size),
            human_bytes(i.shared),
            human_bytes(i.unique),
            i.containers.to_string(),
        ]);
    }
    t.print(out)?;
    line(out, String::new())?;
    let mut t = Table::new(&["LAYER", "SIZE", "IMAGES"]);
    for l in &u.layers {
        t.row(vec![
            short(&l.digest),
            human_bytes(l.size),
            l.images.to_string(),
        ]);
    }
    t.print(out)
}

/// `sha256:` and the first 12 hex digits.
fn short(d: &Digest) -> String {
    format!("{}:{}", d.algorithm(), &d.hex()[..12])
}

/// Sizes the way `docker images` prints them (decimal units).
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    #[allow(clippy::cast_precision_loss)]
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n}B")
    } else {
        format!("{v:.3}{}", UNITS[u]).replace(".000", "")
    }
}

/// A left-aligned text table.
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(head: &[&str]) -> Table {
        Table {
            rows: vec![head.iter().map(|s| (*s).to_owned()).collect()],
        }
    }
    fn row(&mut self, r: Vec<String>) {
        self.rows.push(r);
    }
    fn print(&self, out: &mut dyn Write) -> Result<()> {
        let cols = self.rows[0].len();
        let widths: Vec<usize> = (0..cols)
            .map(|c| self.rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
            .collect();
        for r in &self.rows {
            let mut line = String::new();
            for (c, cell) in r.iter().enumerate() {
                if c + 1 < cols {
                    let _ = write!(line, "{cell:<w$}   ", w = widths[c]);
                } else {
                    line.push_str(cell);
                }
            }
            writeln!(out, "{}", line.trim_end()).map_err(stdout_err)?;
        }
        Ok(())
    }
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

fn put_files(
    store: &Store,
    files: &[PathBuf],
    session: &Session,
    quiet: bool,
    out: &mut dyn Write,
) -> Result<()> {
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
    let stop = || {
        if session.interrupt.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        Ok(())
    };
    let flush = |batch: &mut Vec<Vec<u8>>, out: &mut dyn Write| -> Result<()> {
        stop()?;
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
                // Nothing could resume a killed command: its bytes go to scratch space,
                // which the next open discards.
                let opts = PutOptions::default().interrupt(session.interrupt.clone());
                let mut ing = store.ingest_unnamed(opts)?;
                if path.as_os_str() == "-" {
                    session.with_stdin(|mut r| ing.write_from(&mut r))?;
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

/// The collector's progress on standard error (when it is a terminal and `quiet` is off):
/// a counter while it scans and marks, a bar while it sweeps and compacts.
struct GcBar(indicatif::ProgressBar, std::sync::Mutex<&'static str>);

impl GcBar {
    fn new(quiet: bool) -> GcBar {
        let bar = if quiet || !std::io::stderr().is_terminal() {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new_spinner()
        };
        GcBar(bar, std::sync::Mutex::new(""))
    }
}

impl crate::Progress for GcBar {
    fn report(&self, phase: &'static str, done: u64, total: Option<u64>) {
        let mut current = self
            .1
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *current != phase {
            *current = phase;
            let template = match total {
                Some(_) => "{msg:8} {bar:40} {pos}/{len} eta {eta}",
                None => "{msg:8} {spinner} {pos} blobs",
            };
            if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
                self.0.set_style(style);
            }
            self.0.set_message(phase);
            self.0.reset();
        }
        if let Some(t) = total {
            self.0.set_length(t);
        }
        self.0.set_position(done);
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
