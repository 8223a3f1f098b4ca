//! Command line: no subcommand is hook mode (Nix passes no arguments to its
//! `post-build-hook`, so the mode cannot be chosen in the setting); `daemon`, `status`,
//! `push`, `keygen` and `check-config` are for people and service managers.

use crate::config::Settings;
use crate::queue::{Queue, now_ms};
use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "ferry-post-build", version, about = "Queue built Nix paths durably and upload them to binary caches")]
pub struct Cli {
    /// Configuration file (default: $FERRY_CONFIG or /etc/ferry/ferry.toml).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the uploader (spool → queue → targets).
    Daemon {
        /// Exit once everything queued is uploaded.
        #[arg(long)]
        drain: bool,
    },
    /// Queue depth, oldest job, per-target last success and error.
    Status {
        #[arg(long)]
        json: bool,
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
    cli.config.clone().unwrap_or_else(ferry_nix::config::path_from_env)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a terminal: logs written to files stay greppable.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

pub fn main(cli: Cli) -> ExitCode {
    let Some(cmd) = &cli.command else {
        return hook_main(&config_path(&cli));
    };
    init_logging();
    let r = match cmd {
        Command::Daemon { drain } => daemon(&config_path(&cli), *drain),
        Command::Status { json } => status(&config_path(&cli), *json),
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
            return ExitCode::SUCCESS;
        }
    };
    let out_paths = std::env::var("OUT_PATHS").unwrap_or_default();
    let drv_path = std::env::var("DRV_PATH").ok().filter(|d| !d.is_empty());
    let report = crate::hook::run(&settings, &out_paths, drv_path.as_deref());
    for p in &report.problems {
        eprintln!("ferry-post-build: {p}");
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

fn status(config: &Path, json: bool) -> Result<()> {
    let settings = Settings::load(config)?;
    let spool = crate::spool::Spool::new(settings.spool_dir());
    let spooled = spool.pending()?.len();
    let db = settings.queue_db();
    let st = if db.exists() {
        Queue::open(&db).with_context(|| format!("opening {}", db.display()))?.status()?
    } else {
        crate::queue::QueueStatus {
            depth: 0,
            oldest_enqueued_ms: None,
            dead: 0,
            retrying: 0,
            targets: vec![],
        }
    };
    let mut out = std::io::stdout().lock();
    if json {
        let v = serde_json::json!({ "spooled": spooled, "queue": st, "now_ms": now_ms() });
        writeln!(out, "{v}")?;
        return Ok(());
    }
    writeln!(out, "spooled (not yet in the queue): {spooled}")?;
    writeln!(out, "queued jobs: {} ({} retrying), dead letters: {}", st.depth, st.retrying, st.dead)?;
    if let Some(t) = st.oldest_enqueued_ms {
        writeln!(out, "oldest job: enqueued {}", age(Some(t)))?;
    }
    for t in &settings.config.targets {
        let s = st.targets.iter().find(|s| &s.url == t);
        writeln!(
            out,
            "target {t}: last success {}, paths uploaded {}, last error {}{}",
            age(s.and_then(|s| s.last_ok_ms)),
            s.map(|s| s.paths_uploaded).unwrap_or(0),
            age(s.and_then(|s| s.last_error_ms)),
            s.and_then(|s| s.last_error.as_deref()).map(|e| format!(": {e}")).unwrap_or_default()
        )?;
    }
    Ok(())
}

fn push(config: &Path, paths: &[String]) -> Result<()> {
    let settings = Settings::load(config)?;
    let mut outs = Vec::new();
    for p in paths {
        // Accept `./result` symlinks and paths inside a store object, like `nix copy`.
        let real = std::fs::canonicalize(p).with_context(|| p.to_string())?;
        let real = real.to_string_lossy();
        let (sp, _) = settings
            .store_dir
            .parse_with_subpath(&real)
            .with_context(|| format!("{p} is not in {}", settings.store_dir))?;
        outs.push(settings.store_dir.display(&sp));
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
    println!("  GC roots: {}", if settings.config.gc_roots { settings.gc_roots_dir().display().to_string() } else { "off".into() });
    for t in &targets {
        // The access key id identifies the credentials; the secret is never shown.
        let s3 = t.s3_access_key_id().map(|id| format!(", S3 access key id {id}")).unwrap_or_default();
        println!("  target: {} (compression {}{s3})", t.url, t.compression.narinfo_name());
    }
    if settings.config.targets.is_empty() {
        println!("  warning: no targets; the hook queues but nothing uploads");
    }
    for k in &keys {
        println!("  signing key: {}", k.to_public());
    }
    Ok(())
}
