//! Command line: no subcommand is hook mode (Nix passes no arguments to its
//! `post-build-hook`, so the mode cannot be chosen in the setting); `daemon`, `status`,
//! `retry`, `push`, `keygen` and `check-config` are for people and service managers.

use crate::config::Settings;
use crate::queue::{Queue, now_ms};
use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "ferry-post-build",
    version,
    about = "Queue built Nix paths durably and upload them to binary caches"
)]
pub struct Cli {
    /// Configuration file (default: $FERRY_CONFIG or /etc/ferry/ferry.toml).
    #[arg(long, global = true)]
    pub(crate) config: Option<PathBuf>,
    /// Where logs go: `auto` is journald when systemd connected stderr to the journal
    /// (`JOURNAL_STREAM`), stderr otherwise.
    #[arg(long, global = true, value_enum, default_value_t = LogTo::Auto)]
    pub(crate) log: LogTo,
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the uploader (spool → queue → targets).
    Daemon {
        /// Exit once everything queued is uploaded.
        #[arg(long)]
        drain: bool,
    },
    /// Queue depth, the last error (local store or target), jobs being retried with their
    /// errors and next attempt, dead letters with their errors, per-target last success and
    /// error.
    Status {
        /// One JSON object with everything, every retrying job and dead letter included.
        #[arg(long)]
        json: bool,
    },
    /// Put dead-lettered jobs back in the queue, once what made them fail is fixed.
    ///
    /// A job is dead-lettered when it failed for a reason that retrying cannot change (the
    /// target refused it: HTTP 401/403/404/405/413…, a read-only cache directory, a store
    /// path whose contents no longer match its hash) or when its path left the store. Dead
    /// letters stay until this command (or a new build of the path) queues them again; a
    /// running uploader picks them up at its next poll.
    #[command(group = clap::ArgGroup::new("which").required(true).args(["all", "paths"]))]
    Retry {
        /// Every dead letter.
        #[arg(long, conflicts_with = "paths")]
        all: bool,
        /// Store paths of dead letters (or `./result` links to them).
        paths: Vec<String>,
    },
    /// Queue store paths for upload (as the hook would).
    Push {
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Generate a Nix signing key pair: writes the secret (0600), prints the public key.
    Keygen {
        /// Key name, e.g. `cache.example.org-1`.
        name: String,
        /// Secret key file (default: ./<name>.sec).
        #[arg(long)]
        secret_file: Option<PathBuf>,
        /// Also write the public key here.
        #[arg(long)]
        public_file: Option<PathBuf>,
    },
    /// Validate the configuration, keys and targets, and exit.
    CheckConfig,
}

fn config_path(cli: &Cli) -> PathBuf {
    cli.config
        .clone()
        .unwrap_or_else(ferry_nix::config::path_from_env)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogTo {
    Auto,
    Journald,
    Stderr,
}

/// The native journald layer, if journald's socket answers. Fields are prefixed `FERRY_`
/// (`FERRY_PATH`, `FERRY_TARGET`…) so they never shadow journald's own (`TARGET` is one).
fn journald_layer() -> Option<tracing_journald::Layer> {
    tracing_journald::layer().ok().map(|l| {
        l.with_syslog_identifier("ferry-post-build".into())
            .with_field_prefix(Some("FERRY".into()))
    })
}

/// Is stderr the journal? systemd sets `JOURNAL_STREAM=<dev>:<inode>` of the stream it gives
/// a service, so that it can prefer the native protocol (systemd.exec(5)); a child whose
/// stderr was redirected elsewhere inherits the variable but not the stream.
pub(crate) fn stderr_is_journal(journal_stream: Option<&str>, stderr: Option<(u64, u64)>) -> bool {
    let (Some(v), Some((dev, ino))) = (journal_stream, stderr) else {
        return false;
    };
    let mut it = v.trim().split(':').map(str::parse::<u64>);
    matches!((it.next(), it.next(), it.next()), (Some(Ok(d)), Some(Ok(i)), None) if d == dev && i == ino)
}

fn stderr_dev_ino() -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    // `/proc/self/fd/2` resolves to the open file (or pipe, or socket) itself.
    std::fs::metadata("/proc/self/fd/2")
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Logging for the subcommands: journald (native protocol, structured fields) when asked or
/// when stderr is the journal anyway; otherwise human-readable lines on stderr.
fn init_logging(to: LogTo) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let want_journald = match to {
        LogTo::Journald => true,
        LogTo::Stderr => false,
        LogTo::Auto => stderr_is_journal(
            std::env::var("JOURNAL_STREAM").ok().as_deref(),
            stderr_dev_ino(),
        ),
    };
    let journald = if want_journald {
        journald_layer()
    } else {
        None
    };
    if want_journald && journald.is_none() {
        eprintln!("ferry-post-build: journald is not reachable; logging to stderr");
    }
    // Colours only for a terminal: logs written to files stay greppable.
    let fmt = journald.is_none().then(|| {
        tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(journald)
        .with(fmt)
        .try_init();
}

/// Hook mode logs to journald only, when it is there: the hook's stderr goes into Nix's
/// build output (`post-build-hook: …` lines), where only problems belong.
fn init_hook_logging() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    if let Some(j) = journald_layer() {
        let _ = tracing_subscriber::registry()
            .with(tracing_subscriber::filter::LevelFilter::INFO)
            .with(j)
            .try_init();
    }
}

pub fn main(cli: Cli) -> ExitCode {
    let Some(cmd) = &cli.command else {
        init_hook_logging();
        return hook_main(&config_path(&cli));
    };
    init_logging(cli.log);
    let r = match cmd {
        Command::Daemon { drain } => daemon(&config_path(&cli), *drain),
        Command::Status { json } => status(&config_path(&cli), *json),
        Command::Retry { all, paths } => retry(&config_path(&cli), *all, paths),
        Command::Push { paths } => push(&config_path(&cli), paths),
        Command::Keygen {
            name,
            secret_file,
            public_file,
        } => keygen(name, secret_file.as_deref(), public_file.as_deref()),
        Command::CheckConfig => check_config(&config_path(&cli)),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-post-build: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Hook mode: always exit 0 (docs/upload.md §1.3); problems go to stderr, which Nix shows
/// as `post-build-hook:` lines.
fn hook_main(config: &Path) -> ExitCode {
    let settings = match Settings::load(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ferry-post-build: {e}; outputs NOT queued for upload");
            tracing::error!(error = %e, drv = std::env::var("DRV_PATH").unwrap_or_default(),
                outs = std::env::var("OUT_PATHS").unwrap_or_default(), "outputs NOT queued for upload");
            return ExitCode::SUCCESS;
        }
    };
    let out_paths = std::env::var("OUT_PATHS").unwrap_or_default();
    let drv_path = std::env::var("DRV_PATH").ok().filter(|d| !d.is_empty());
    let report = crate::hook::run(&settings, &out_paths, drv_path.as_deref());
    for p in &report.problems {
        eprintln!("ferry-post-build: {p}");
        tracing::warn!(problem = %p, drv = drv_path.as_deref().unwrap_or(""), "post-build hook problem");
    }
    if let Some(name) = &report.spool_name {
        tracing::info!(drv = report.drv.as_deref().unwrap_or(""), outs = %report.record.outs.join(" "),
            outputs_from = report.outputs_from.as_str(), spool = %name, "queued for upload");
    }
    ExitCode::SUCCESS
}

fn daemon(config: &Path, drain: bool) -> Result<()> {
    // reqwest is built without a default TLS provider so that ring, not aws-lc, is used.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let settings = Settings::load(config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let d = crate::daemon::Daemon::new(settings)?;
        d.run(crate::daemon::Options { drain }).await
    })
}

fn age(ms: Option<i64>) -> String {
    match ms {
        None => "never".into(),
        Some(t) => format!("{:.1}s ago", (now_ms() - t) as f64 / 1000.0),
    }
}

/// A time that may lie ahead: "in 3.2s", or "now" once it has passed.
fn until(ms: i64) -> String {
    let d = ms - now_ms();
    if d <= 0 {
        "now".into()
    } else {
        format!("in {:.1}s", d as f64 / 1000.0)
    }
}

/// How many retrying jobs and dead letters the text status lists; `--json` lists all.
const STATUS_LIST_LIMIT: usize = 20;

/// Opens the queue database, or `None` when the uploader has never run.
fn open_queue(settings: &Settings) -> Result<Option<Queue>> {
    let db = settings.queue_db();
    if !db.exists() {
        return Ok(None);
    }
    Ok(Some(
        Queue::open(&db).with_context(|| format!("opening {}", db.display()))?,
    ))
}

fn status(config: &Path, json: bool) -> Result<()> {
    let settings = Settings::load(config)?;
    let spool = crate::spool::Spool::new(settings.spool_dir());
    let spooled = spool.pending()?.len();
    let (st, retrying, dead) = match open_queue(&settings)? {
        Some(q) => (
            q.status()?,
            q.retrying(if json { usize::MAX } else { STATUS_LIST_LIMIT })?,
            q.dead()?,
        ),
        None => Default::default(),
    };
    let multipart = if settings.queue_db().exists() {
        crate::multipart::UploadLog::open(&settings.queue_db())?.all()?
    } else {
        Vec::new()
    };
    let mut out = std::io::stdout().lock();
    if json {
        let uploads: Vec<_> = multipart
            .iter()
            .map(|m| {
                serde_json::json!({
                    "target": ferry_nix::url::redact(&m.target),
                    "key": m.key,
                    "path": m.path,
                    "parts_done": m.parts.len(),
                    "parts": ferry_s3::multipart::plan(m.file_size, m.part_size).map(|p| p.len()).unwrap_or(0),
                    "file_size": m.file_size,
                    "started_ms": m.started_at,
                })
            })
            .collect();
        let v = serde_json::json!({
            "spooled": spooled,
            "multipart_uploads": uploads,
            "queue": st,
            "retrying_jobs": retrying,
            "dead_letters": dead,
            "now_ms": now_ms(),
        });
        writeln!(out, "{v}")?;
        return Ok(());
    }
    writeln!(out, "spooled (not yet in the queue): {spooled}")?;
    writeln!(
        out,
        "queued jobs: {} ({} retrying), dead letters: {}",
        st.depth, st.retrying, st.dead
    )?;
    if let Some(t) = st.oldest_enqueued_ms {
        writeln!(out, "oldest job: enqueued {}", age(Some(t)))?;
    }
    if let Some(t) = st.next_retry_ms {
        writeln!(out, "next retry: {}", until(t))?;
    }
    match &st.last_error {
        None => writeln!(out, "last error: never")?,
        Some(e) => {
            let source = if e.source == "local" {
                "local store"
            } else {
                "target"
            };
            writeln!(
                out,
                "last error: {} ({source}): {}",
                age(Some(e.at_ms)),
                e.error
            )?
        }
    }
    writeln!(
        out,
        "local store: last success {}, errors {}, last error {}{}",
        age(st.local.last_ok_ms),
        st.local.errors,
        age(st.local.last_error_ms),
        st.local
            .last_error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default()
    )?;
    for t in &settings.config.targets {
        let s = st.targets.iter().find(|s| &s.url == t);
        writeln!(
            out,
            "target {}: last success {}, paths uploaded {}, last error {}{}",
            ferry_nix::url::redact(t),
            age(s.and_then(|s| s.last_ok_ms)),
            s.map(|s| s.paths_uploaded).unwrap_or(0),
            age(s.and_then(|s| s.last_error_ms)),
            s.and_then(|s| s.last_error.as_deref())
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        )?;
    }
    for m in &multipart {
        let parts = ferry_s3::multipart::plan(m.file_size, m.part_size)
            .map(|p| p.len())
            .unwrap_or(0);
        writeln!(
            out,
            "multipart upload to {}: {} ({}), {}/{parts} parts done, started {}",
            ferry_nix::url::redact(&m.target),
            m.key,
            m.path,
            m.parts.len(),
            age(Some(m.started_at))
        )?;
    }
    if !retrying.is_empty() {
        writeln!(out, "retrying jobs:")?;
        for j in &retrying {
            let side = j
                .last_error_side
                .map(|s| format!(" ({})", s.as_str()))
                .unwrap_or_default();
            writeln!(
                out,
                "  {}: {} failed attempt(s), last {}{side}, next attempt {}: {}",
                j.path,
                j.attempts,
                age(j.last_error_ms),
                until(j.next_attempt_ms),
                j.last_error.as_deref().unwrap_or("(no error recorded)")
            )?;
        }
        if (st.retrying as usize) > retrying.len() {
            writeln!(
                out,
                "  … and {} more (status --json lists all)",
                st.retrying as usize - retrying.len()
            )?;
        }
    }
    if !dead.is_empty() {
        writeln!(
            out,
            "dead letters (fix the cause, then `ferry-post-build retry --all` or `retry PATH…`):"
        )?;
        for d in dead.iter().take(STATUS_LIST_LIMIT) {
            writeln!(
                out,
                "  {}: dead since {} after {} attempt(s) ({}): {}",
                d.path,
                age(Some(d.dead_since_ms)),
                d.attempts,
                d.cause.label(),
                d.error
            )?;
        }
        if dead.len() > STATUS_LIST_LIMIT {
            writeln!(
                out,
                "  … and {} more (status --json lists all)",
                dead.len() - STATUS_LIST_LIMIT
            )?;
        }
    }
    Ok(())
}

/// A store path as given on the command line (`./result` links and paths inside a store
/// object are followed, like `nix copy`), as the queue spells it.
fn store_path_arg(settings: &Settings, p: &str) -> Result<String> {
    if let Ok(sp) = settings.store_dir.parse(p) {
        return Ok(settings.store_dir.display(&sp));
    }
    store_path_of_file(settings, p)
}

/// The store path a file is in, after following links (`./result`, a path inside a store
/// object), as the queue spells it.
fn store_path_of_file(settings: &Settings, p: &str) -> Result<String> {
    let real = std::fs::canonicalize(p).with_context(|| p.to_string())?;
    let real = real.to_string_lossy();
    let (sp, _) = settings
        .store_dir
        .parse_with_subpath(&real)
        .with_context(|| format!("{p} is not in {}", settings.store_dir))?;
    Ok(settings.store_dir.display(&sp))
}

fn retry(config: &Path, all: bool, paths: &[String]) -> Result<()> {
    let settings = Settings::load(config)?;
    let wanted = if all {
        None
    } else {
        Some(
            paths
                .iter()
                .map(|p| store_path_arg(&settings, p))
                .collect::<Result<Vec<_>>>()?,
        )
    };
    let Some(mut q) = open_queue(&settings)? else {
        if let Some(w) = &wanted {
            bail!("not dead-lettered (the queue is empty): {}", w.join(" "));
        }
        println!("no dead letters");
        return Ok(());
    };
    // Roots first: dead letters of the first release lost theirs, and the path must be
    // safe from the collector before the job is queued again.
    if settings.config.gc_roots {
        for d in q.dead()? {
            let chosen = wanted.as_ref().is_none_or(|w| w.contains(&d.path));
            if chosen
                && d.kind == crate::queue::JobKind::Out
                && std::fs::symlink_metadata(&d.path).is_ok()
                && let Err(e) = crate::gcroot::add(&settings.gc_roots_dir(), &d.path)
            {
                eprintln!(
                    "ferry-post-build: GC root for {} in {}: {e}",
                    d.path,
                    settings.gc_roots_dir().display()
                );
            }
        }
    }
    let (requeued, missing) = q.requeue_dead(wanted.as_deref(), now_ms())?;
    for p in &requeued {
        tracing::info!(path = %p, "dead letter queued again");
        println!("queued again: {p}");
    }
    if !missing.is_empty() {
        bail!("not dead-lettered: {}", missing.join(" "));
    }
    if requeued.is_empty() {
        println!("no dead letters");
    }
    Ok(())
}

fn push(config: &Path, paths: &[String]) -> Result<()> {
    let settings = Settings::load(config)?;
    let mut outs = Vec::new();
    for p in paths {
        // Accept `./result` symlinks and paths inside a store object, like `nix copy`.
        outs.push(store_path_of_file(&settings, p)?);
    }
    let mut report = crate::hook::HookReport {
        record: crate::spool::SpoolRecord { drv: None, outs },
        ..Default::default()
    };
    crate::hook::enqueue(&settings, &mut report);
    for p in &report.problems {
        eprintln!("ferry-post-build: {p}");
    }
    if report.spool_name.is_none() {
        bail!("nothing queued");
    }
    println!("queued {} path(s)", report.record.outs.len());
    Ok(())
}

fn keygen(name: &str, secret_file: Option<&Path>, public_file: Option<&Path>) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let key = ferry_nix::signing::SecretKey::generate(name)?;
    let default_secret = PathBuf::from(format!("{name}.sec"));
    let secret_file = secret_file.unwrap_or(&default_secret);
    // 0600 from the start: never a moment where the secret is world-readable; never
    // overwrite an existing key.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(secret_file)
        .with_context(|| format!("creating {}", secret_file.display()))?;
    // Nix writes key files without a trailing newline.
    f.write_all(key.to_key_file_text().as_bytes())?;
    f.sync_all()?;
    let public = key.to_public().to_string();
    if let Some(p) = public_file {
        std::fs::write(p, &public).with_context(|| format!("writing {}", p.display()))?;
    }
    println!("{public}");
    Ok(())
}

fn check_config(config: &Path) -> Result<()> {
    let settings = Settings::load(config)?;
    let keys = crate::daemon::load_keys(&settings)?;
    let targets = crate::daemon::make_targets(&settings)?;
    println!("{}: [post-build] OK", config.display());
    println!("  state dir: {}", settings.config.state_dir.display());
    println!("  store dir: {}", settings.store_dir);
    println!(
        "  GC roots: {}",
        if settings.config.gc_roots {
            settings.gc_roots_dir().display().to_string()
        } else {
            "off".into()
        }
    );
    for t in &targets {
        // The access key id identifies the credentials; the secret is never shown.
        let mp = settings.multipart();
        let s3 = t
            .s3_access_key_id()
            .map(|id| {
                format!(
                    ", S3 access key id {id}, multipart from {} MiB in {} MiB parts, {} at a time",
                    mp.threshold >> 20,
                    mp.part_size >> 20,
                    mp.parallel
                )
            })
            .unwrap_or_default();
        println!(
            "  target: {} (compression {}{s3})",
            t.shown(),
            t.compression.narinfo_name()
        );
    }
    if settings.config.targets.is_empty() {
        println!("  warning: no targets; the hook queues but nothing uploads");
    }
    for k in &keys {
        println!("  signing key: {}", k.to_public());
    }
    let policy = settings.retry_policy();
    println!(
        "  failures: transient ones (network, HTTP 5xx/429, local store busy) retried after {:?} \
         doubling up to {:?}; permanent ones (target refuses: HTTP 4xx, read-only cache; \
         corrupt store path) dead-lettered: see `status`, then `retry`",
        policy.initial, policy.max
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_wants_all_or_paths_not_both() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("ferry-post-build").chain(args.iter().copied()))
        };
        assert!(parse(&["retry"]).is_err());
        assert!(parse(&["retry", "--all", "/nix/store/x"]).is_err());
        assert!(matches!(
            parse(&["retry", "--all"]).map(|c| c.command),
            Ok(Some(Command::Retry { all: true, .. }))
        ));
        match parse(&["retry", "/nix/store/a", "./result"]).map(|c| c.command) {
            Ok(Some(Command::Retry { all: false, paths })) => {
                assert_eq!(paths, ["/nix/store/a", "./result"])
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn journal_stream_must_be_our_stderr() {
        assert!(stderr_is_journal(Some("8:12345"), Some((8, 12345))));
        assert!(!stderr_is_journal(Some("8:12345"), Some((8, 12346))));
        assert!(!stderr_is_journal(Some("8:12345:1"), Some((8, 12345))));
        assert!(!stderr_is_journal(Some("junk"), Some((8, 12345))));
        assert!(!stderr_is_journal(None, Some((8, 12345))));
        assert!(!stderr_is_journal(Some("8:12345"), None));
    }
}
