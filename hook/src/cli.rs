//! The commands people run by hand: `status` (what Ferry knows about each builder),
//! `probe` (check every builder now) and `check-config`. They read the same nix.conf,
//! machines and health state as the hook, from the same environment variables
//! (`NIX_CONF_DIR`, `NIX_STATE_DIR`, `FERRY_STATE_DIR`, `FERRY_CONFIG`, `NIX_SSHOPTS`).

use crate::config;
use crate::health::{self, Health, State};
use crate::health_store::HealthStore;
use crate::probe;
use crate::run::{Env, Settings, prober};
use crate::slots::LoadDir;
use clap::{Parser, Subcommand};
use ferry_nix::machines::Machine;
use serde::Serialize;
use std::fmt::Write as _;
use std::sync::Arc;

#[derive(Debug, Parser)]
#[command(
    name = "ferry-build-hook",
    version,
    about = "Nix build hook for ssh:// builders. Nix runs it as `build-hook` with the verbosity \
             as its last argument; these subcommands are for people."
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Show each builder's health: state, since when, last error, slots in use, speed.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Use this `builders` value instead of nix.conf's.
        #[arg(long)]
        builders: Option<String>,
    },
    /// Probe every builder now (SSH login and the serve handshake), record and show the
    /// result. Exits 1 if any builder is down.
    Probe {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        builders: Option<String>,
        /// How to reach the builders: russh (in-process, every step under the deadline, the
        /// failing step named) or openssh (the `ssh` program with the user's configuration).
        #[arg(long, default_value = "russh")]
        transport: String,
    },
    /// Check the [build-hook] section of ferry.toml, the builders in nix.conf, and whether
    /// the running nix-daemon uses this hook (exit 1 if it does not, with how to fix it).
    CheckConfig,
    /// Used by the hook itself: probe the builders given as machines-file lines on stdin,
    /// record the results, print nothing (see `probe::hand_off`).
    #[command(hide = true)]
    ProbeDetached,
}

/// Is this a command line for a person (rather than Nix running the hook)? Nix passes the
/// verbosity, a number, as the last argument.
pub fn is_command(argv: &[String]) -> bool {
    match argv.get(1).map(String::as_str) {
        Some("status" | "probe" | "probe-detached" | "check-config" | "help") => true,
        Some(a) => a.starts_with('-'),
        // Without arguments the hook reports the missing verbosity, as the stock hook does.
        None => false,
    }
}

/// One row of `status`.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct Row {
    pub(crate) builder: String,
    pub(crate) systems: Vec<String>,
    pub(crate) max_jobs: u64,
    pub(crate) speed_factor: f64,
    pub(crate) state: State,
    pub(crate) since_ms: Option<u64>,
    pub(crate) consecutive_failures: u32,
    pub(crate) backoff_until_ms: Option<u64>,
    pub(crate) last_error: Option<String>,
    pub(crate) last_error_ms: Option<u64>,
    /// Slots held by running builds (`None` if the lock directory cannot be read).
    pub(crate) slots_in_use: Option<u64>,
    pub(crate) latency_ms: Option<f64>,
    pub(crate) transfer_rate: Option<f64>,
    pub(crate) mean_build_secs: Option<f64>,
    pub(crate) attempts: u64,
}

pub(crate) fn row(m: &Machine, h: &Health, slots_in_use: Option<u64>) -> Row {
    Row {
        builder: m.store_uri.clone(),
        systems: m.systems.clone(),
        max_jobs: m.max_jobs,
        speed_factor: m.speed_factor,
        state: h.state,
        since_ms: Some(h.since_ms).filter(|&t| t > 0),
        consecutive_failures: h.consecutive_failures,
        backoff_until_ms: Some(h.backoff_until_ms).filter(|&t| t > 0),
        last_error: h.last_error.clone(),
        last_error_ms: h.last_error_ms,
        slots_in_use,
        latency_ms: h.latency_ms,
        transfer_rate: h.transfer_rate,
        mean_build_secs: h.mean_build_secs(),
        attempts: h.attempts,
    }
}

/// The human table.
pub(crate) fn render_table(rows: &[Row], now_ms: u64) -> String {
    let header = [
        "BUILDER",
        "SYSTEMS",
        "STATE",
        "SINCE",
        "SLOTS",
        "SPEED",
        "LAST ERROR",
    ];
    let mut cells: Vec<[String; 7]> = Vec::new();
    for r in rows {
        let since = r
            .since_ms
            .map(|t| format!("{} ago", health::format_age(now_ms.saturating_sub(t))))
            .unwrap_or_else(|| "-".into());
        let slots = match r.slots_in_use {
            Some(n) => format!("{n}/{}", r.max_jobs),
            None => format!("?/{}", r.max_jobs),
        };
        let mut speed = format!("sf {}", r.speed_factor);
        if let Some(l) = r.latency_ms {
            let _ = write!(speed, ", {l:.0} ms");
        }
        if let Some(b) = r.transfer_rate {
            let _ = write!(speed, ", {:.1} MB/s", b / 1e6);
        }
        if let Some(s) = r.mean_build_secs {
            let _ = write!(speed, ", builds {s:.1} s");
        }
        let mut state = r.state.as_str().to_owned();
        if let Some(u) = r.backoff_until_ms.filter(|&u| u > now_ms) {
            let _ = write!(state, " (retry in {})", health::format_age(u - now_ms));
        }
        let err = match (&r.last_error, r.last_error_ms) {
            (Some(e), Some(t)) => {
                format!("{} ago: {e}", health::format_age(now_ms.saturating_sub(t)))
            }
            (Some(e), None) => e.clone(),
            _ => "-".into(),
        };
        cells.push([
            r.builder.clone(),
            r.systems.join(","),
            state,
            since,
            slots,
            speed,
            err,
        ]);
    }
    let mut widths = header.map(str::len);
    for c in &cells {
        for (w, s) in widths.iter_mut().zip(c.iter()).take(6) {
            *w = (*w).max(s.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, c: &[&str]| {
        for (i, s) in c.iter().enumerate() {
            if i < 6 {
                let _ = write!(out, "{s:<w$}  ", w = widths[i]);
            } else {
                out.push_str(s);
            }
        }
        out.push('\n');
    };
    line(&mut out, &header);
    for c in &cells {
        let refs: Vec<&str> = c.iter().map(String::as_str).collect();
        line(&mut out, &refs);
    }
    out
}

fn machines(env: &Env, builders: Option<&str>) -> anyhow::Result<Vec<Machine>> {
    let mut settings = Settings::load(env)?;
    if let Some(b) = builders {
        settings.conf.apply_overrides(&[("builders", b)]);
    }
    Ok(settings.machines()?)
}

fn rows(env: &Env, machines: &[Machine]) -> Vec<Row> {
    let store = HealthStore::at(&env.ferry_state_dir);
    // Slots are counted the way hooks count them, under `main-lock` so no hook sees a
    // free slot as taken while we look.
    let load_dir = env
        .nix_state_dir
        .join(ferry_nix::machines::CURRENT_LOAD_DIR)
        .is_dir()
        .then(|| LoadDir::open(&env.nix_state_dir).ok())
        .flatten();
    let main = load_dir.as_ref().and_then(|d| d.lock_main().ok());
    let out = machines
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let slots = match (&load_dir, &main) {
                (Some(d), Some(_)) => d.probe(i, m).ok().map(|(l, _)| l.load),
                _ if load_dir.is_none() => Some(0),
                _ => None,
            };
            row(m, &store.read(&m.store_uri), slots)
        })
        .collect();
    drop(main);
    out
}

fn print(rows: &[Row], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(rows)?);
    } else if rows.is_empty() {
        println!("no builders configured (the 'builders' setting is empty)");
    } else {
        print!("{}", render_table(rows, health::now_ms()));
    }
    Ok(())
}

/// Runs a command; returns the exit status.
pub fn main(argv: &[String]) -> i32 {
    let cli = match Cli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let env = Env::from_process();
    match command(cli.cmd, &env) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry-build-hook: {e:#}");
            1
        }
    }
}

/// The daemon's socket: `NIX_DAEMON_SOCKET_PATH`, else `<state dir>/daemon-socket/socket`.
fn daemon_socket(env: &Env) -> std::path::PathBuf {
    std::env::var_os("NIX_DAEMON_SOCKET_PATH")
        .filter(|p| !p.is_empty())
        .map_or_else(
            || env.nix_state_dir.join("daemon-socket/socket"),
            std::path::PathBuf::from,
        )
}

/// Runs `f` on a runtime like the hook's; connections still closing in the background get
/// 100 ms, then the command ends without them.
fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let out = rt.block_on(f);
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    Ok(out)
}

fn command(cmd: Cmd, env: &Env) -> anyhow::Result<i32> {
    match cmd {
        Cmd::Status { json, builders } => {
            let ms = machines(env, builders.as_deref())?;
            let hook = block_on(crate::daemon_check::inspect(
                std::path::Path::new("/proc"),
                &daemon_socket(env),
            ))?;
            if json {
                // The rows stay the JSON document; a hook not in effect is worth a warning.
                if !hook.in_effect {
                    eprint!("{}", hook.text);
                }
            } else {
                print!("{}", hook.text);
            }
            print(&rows(env, &ms), json)?;
            Ok(0)
        }
        Cmd::Probe {
            json,
            builders,
            transport,
        } => {
            let ms = machines(env, builders.as_deref())?;
            let mut tuning = config::load(&env.config_path)?;
            tuning.probe_transport = match transport.as_str() {
                "russh" => config::TransportKind::Russh,
                "openssh" => config::TransportKind::Openssh,
                other => anyhow::bail!("--transport {other}: expected russh or openssh"),
            };
            let p = Arc::new(prober(env, tuning));
            block_on(async {
                let mut set = tokio::task::JoinSet::new();
                for m in ms.iter().filter(|m| m.scheme() == Some("ssh")) {
                    let (p, m) = (Arc::clone(&p), m.clone());
                    set.spawn(async move {
                        if let Ok(Some(c)) = p.probe_recorded(&m, p.tuning.probe_timeout).await {
                            c.close().await;
                        }
                    });
                }
                while set.join_next().await.is_some() {}
            })?;
            let rows = rows(env, &ms);
            print(&rows, json)?;
            Ok(if rows.iter().all(|r| r.state == State::Up) {
                0
            } else {
                1
            })
        }
        Cmd::ProbeDetached => {
            let mut lines = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut lines)?;
            let ms = ferry_nix::machines::parse_builders_setting(&lines, "")?;
            // A broken configuration is the hook's to report; probe with the defaults.
            let tuning = config::load(&env.config_path).unwrap_or_default();
            let p = Arc::new(prober(env, tuning));
            let which = (0..ms.len()).map(|i| (i, probe::Kind::Fresh)).collect();
            block_on(async {
                // Nobody waits for these answers, so no grace: every probe runs to its end.
                let round = p.probe_all_to_end(&ms, which).await;
                for (_, outcome) in round.outcomes {
                    if let probe::Outcome::Up(Some(c)) = outcome {
                        c.close().await;
                    }
                }
            })?;
            Ok(0)
        }
        Cmd::CheckConfig => {
            let t = config::load(&env.config_path)?;
            println!("{}: ok", env.config_path.display());
            println!(
                "[build-hook]\nprobe-timeout-ms = {}\nprobe-grace-ms = {}\nslot-wait-ms = {}\nbackoff-base-secs = {}\nbackoff-cap-secs = {}\nstale-after-secs = {}\nprefer-remote = {}\nprobe-transport = \"{}\"\nbuild-transport = \"{}\"\nimport-method = \"{}\"",
                t.probe_timeout.as_millis(),
                t.probe_grace.as_millis(),
                t.slot_wait.as_millis(),
                t.backoff_base.as_secs(),
                t.backoff_cap.as_secs(),
                t.stale_after.as_secs(),
                t.prefer_remote,
                t.probe_transport.name(),
                t.build_transport.name(),
                t.import_method.name()
            );
            let ms = machines(env, None)?;
            let ssh = ms.iter().filter(|m| m.scheme() == Some("ssh")).count();
            println!(
                "builders (from {}): {} ({ssh} ssh://, others left to the daemon)",
                env.conf_dir.join("nix.conf").display(),
                ms.len()
            );
            let hook = block_on(crate::daemon_check::inspect(
                std::path::Path::new("/proc"),
                &daemon_socket(env),
            ))?;
            print!("{}", hook.text);
            // Exit 1 when the running daemon does not run this hook: the configuration is not
            // in effect, whatever the file says. With no daemon running here (an image being
            // built, a host whose daemon is stopped) the verdict above is about the files the
            // daemon would read, a warning rather than a failed check.
            Ok(if hook.in_effect || !hook.daemon_running {
                0
            } else {
                1
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_nix::machines::parse_builders_setting;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn commands_are_told_apart_from_hook_invocations() {
        assert!(!is_command(&argv(&["/usr/bin/ferry-build-hook", "3"])));
        assert!(!is_command(&argv(&[
            "ferry-build-hook",
            "__build-remote",
            "4"
        ])));
        assert!(is_command(&argv(&["ferry-build-hook", "status", "--json"])));
        assert!(is_command(&argv(&["ferry-build-hook", "--help"])));
        assert!(!is_command(&argv(&["ferry-build-hook"])));
    }

    #[test]
    fn status_rows_render_as_table_and_json() {
        let now = 1_762_178_585_000;
        let ms = parse_builders_setting(
            "ssh://root@a x86_64-linux - 2 1\nssh://root@b x86_64-linux,aarch64-linux - 4 2",
            "x86_64-linux",
        )
        .expect("m");
        let mut a = Health::new("ssh://root@a");
        a.record_failure(
            now - 1_000,
            "Connection refused",
            &config::Tuning::default(),
            0.0,
        );
        let mut b = Health::new("ssh://root@b");
        b.record_success(now - 600_000, Some(12.4));
        let rows = vec![row(&ms[0], &a, Some(0)), row(&ms[1], &b, Some(3))];
        let t = render_table(&rows, now);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("BUILDER"), "{t}");
        assert!(lines[1].contains("down (retry in 9 s)"), "{t}");
        assert!(lines[1].ends_with("1 s ago: Connection refused"), "{t}");
        assert!(lines[2].contains("x86_64-linux,aarch64-linux"), "{t}");
        assert!(
            lines[2].contains("3/4") && lines[2].contains("sf 2, 12 ms"),
            "{t}"
        );
        let j = serde_json::to_value(&rows).expect("json");
        assert_eq!(j[0]["state"], "down");
        assert_eq!(j[0]["last-error"], "Connection refused");
        assert_eq!(j[1]["slots-in-use"], 3);
        assert_eq!(j[1]["latency-ms"], 12.4);
    }
}
