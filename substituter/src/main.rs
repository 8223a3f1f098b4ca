//! Command line of `ferry-substituter`: `serve` (the default), `check-config`, `status`.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ferry_substituter::config::{Overrides, SubstituterConfig, UpstreamLocation, nix_conf_trust};
use ferry_substituter::upstream::AccessCheck;

#[derive(Parser)]
#[command(
    version,
    about = "A local Nix binary cache in front of upstream caches"
)]
struct Cli {
    /// Address to listen on (overrides `listen` in ferry.toml).
    #[arg(long, global = true)]
    listen: Option<String>,
    /// Upstream cache URL (http://, https://, file://, s3://); repeat for several, in priority
    /// order.
    /// Replaces the upstreams of ferry.toml.
    #[arg(long = "upstream", global = true)]
    upstreams: Vec<String>,
    /// Serving threads, each with its own single-threaded runtime and listening socket
    /// (default: one per core).
    #[arg(long, global = true)]
    workers: Option<std::num::NonZeroUsize>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the binary-cache protocol (the default).
    Serve,
    /// Validate the configuration and print the resolved settings.
    CheckConfig,
    /// Print the counters and breaker states of a running instance.
    Status {
        /// Base URL of the running instance (default: the configured listen address).
        #[arg(long)]
        url: Option<String>,
    },
}

fn settings(cli: &Cli) -> anyhow::Result<ferry_substituter::Settings> {
    let path = ferry_nix::config::path_from_env();
    let file: SubstituterConfig = ferry_nix::config::load_section(&path, "substituter")?;
    let o = Overrides {
        listen: cli.listen.clone(),
        upstreams: cli.upstreams.clone(),
    };
    file.resolve(&o, nix_conf_trust)
        .with_context(|| format!("configuration from {}", path.display()))
}

/// What `check-config` says about an upstream's credentials: whether it has any, and for a
/// bucket the access key id in use (never the secret).
fn credentials_note(location: &UpstreamLocation) -> String {
    match location {
        UpstreamLocation::Http {
            credentials: Some(_),
            ..
        } => " credentials: yes".to_owned(),
        UpstreamLocation::Http { .. } | UpstreamLocation::File(_) => String::new(),
        UpstreamLocation::S3 {
            location,
            credentials,
        } => format!(
            " bucket {} at {} region {}{} access key id {}",
            location.bucket,
            location.base,
            location.region,
            if location.path_style {
                " (path-style)"
            } else {
                ""
            },
            credentials.access_key_id
        ),
    }
}

/// Reads `nix-cache-info` from each `s3://` upstream with its credentials: a running Ferry
/// counts a bucket's 403 as a miss (as Nix does), so wrong keys are found here or not at all.
fn check_s3_access(s: &ferry_substituter::Settings) -> anyhow::Result<()> {
    let buckets: Vec<_> = s
        .upstreams
        .iter()
        .filter(|u| matches!(u.location, UpstreamLocation::S3 { .. }))
        .collect();
    if buckets.is_empty() {
        return Ok(());
    }
    ferry_substituter::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut refused = Vec::new();
    for u in buckets {
        let up = ferry_substituter::upstream::Upstream::new(u.clone())?;
        let key_id = match &u.location {
            UpstreamLocation::S3 { credentials, .. } => credentials.access_key_id.as_str(),
            _ => "",
        };
        match rt.block_on(up.check_access()) {
            AccessCheck::Ok => println!("upstream {}: nix-cache-info OK", u.display),
            AccessCheck::Missing(status) => println!(
                "warning: upstream {}: no nix-cache-info (HTTP {status}): is this a binary cache?",
                u.display
            ),
            AccessCheck::Refused { status, code } => {
                let code = code.unwrap_or_else(|| "no S3 error code".to_owned());
                let hint = match code.as_str() {
                    "SignatureDoesNotMatch" => {
                        "the secret access key does not belong to this key id"
                    }
                    "InvalidAccessKeyId" => "the server does not know this access key id",
                    "AccessDenied" => {
                        "this key may not read the bucket, or the bucket has no nix-cache-info"
                    }
                    "RequestTimeTooSkewed" => "this host's clock is off",
                    _ => "check the credentials and the bucket's policy",
                };
                let line = format!(
                    "upstream {}: access key id {key_id} refused on nix-cache-info (HTTP {status} {code}): {hint}",
                    u.display
                );
                println!("error: {line}");
                refused.push(line);
            }
            AccessCheck::Failed(e) => println!(
                "warning: upstream {}: nix-cache-info not read ({e}); not checked",
                u.display
            ),
        }
    }
    if refused.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{}", refused.join("; "))
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let s = settings(&cli)?;
    match cli.command {
        None | Some(Cmd::Serve) => {
            let workers = cli.workers.map_or_else(
                || std::thread::available_parallelism().map_or(1, |n| n.get()),
                |n| n.get(),
            );
            let listeners = ferry_substituter::bind_workers(s.listen, workers)
                .with_context(|| format!("binding {}", s.listen))?;
            tracing::info!(listen = %s.listen, workers, "serving");
            let shutdown = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            ferry_substituter::run_workers(s, listeners, shutdown)
        }
        Some(Cmd::CheckConfig) => {
            println!("listen {}", s.listen);
            println!("store-dir {} priority {}", s.store_dir, s.priority);
            // The effective list next to Nix's own: a difference means Ferry prefers or
            // drops narinfos differently from the daemon it serves.
            let list = |t: &str| {
                if t.is_empty() {
                    "(none)".to_owned()
                } else {
                    t.to_owned()
                }
            };
            println!(
                "trusted-public-keys (Ferry): {}",
                list(&s.trusted_keys_text)
            );
            println!(
                "trusted-public-keys (Nix):   {}",
                list(&s.nix_trust.trusted_public_keys)
            );
            println!("require-sigs (Nix): {}", s.nix_trust.require_sigs);
            if s.trusted_keys_text != s.nix_trust.trusted_public_keys {
                println!(
                    "warning: Ferry's trusted-public-keys differ from Nix's: set them in nix.conf only"
                );
            }
            match &s.local {
                Some(l) => println!(
                    "local store: {} (database {}), signing keys: {}, verify-nar-hash {}",
                    s.store_dir,
                    l.db.display(),
                    if l.keys.is_empty() {
                        "(none: paths without signatures are served unsigned)".to_owned()
                    } else {
                        l.keys
                            .iter()
                            .map(|k| k.name().to_owned())
                            .collect::<Vec<_>>()
                            .join(" ")
                    },
                    l.verify_nar_hash
                ),
                None => println!("local store: off"),
            }
            match &s.disk {
                Some(d) => println!(
                    "disk cache {} max-size {} bytes max-age {:?}",
                    d.dir.display(),
                    d.max_bytes,
                    d.max_age
                ),
                None => println!("disk cache: off"),
            }
            for u in &s.upstreams {
                println!(
                    "upstream {} priority {} connect {:?} read {:?} rate {}/s in-flight {}{}",
                    u.display,
                    u.priority,
                    u.connect_timeout,
                    u.read_timeout,
                    u.rate_limit,
                    u.max_in_flight,
                    credentials_note(&u.location)
                );
            }
            check_s3_access(&s)
        }
        Some(Cmd::Status { url }) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                ferry_substituter::install_crypto_provider();
                let base = url.unwrap_or_else(|| format!("http://{}", s.listen));
                let body = reqwest::get(format!("{}/ferry/status", base.trim_end_matches('/')))
                    .await
                    .and_then(|r| r.error_for_status())
                    .with_context(|| format!("asking {base}"))?
                    .text()
                    .await?;
                print!("{body}");
                Ok(())
            }),
    }
}
