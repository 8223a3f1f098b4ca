//! Does the running nix-daemon really use Ferry's hook? (`check-config`, `status`.)
//!
//! Why it is a question: Nix 2.25.0 to 2.33.x ignore `build-hook` in the system nix.conf.
//! `src/nix/main.cc` calls `settings.buildHook.setDefault(…)` after `initNix()`, and
//! `setDefault` writes only a setting not marked overridden, while `loadConfFile` clears
//! those marks right after reading `<conf dir>/nix.conf`
//! (<https://github.com/NixOS/nix/blob/2.26.3/src/libstore/globals.cc#L108-L112>,
//! <https://github.com/NixOS/nix/blob/2.26.3/src/nix/main.cc#L376>): the nix.conf value is
//! replaced by the default, the stock hook. Fixed in 2.34.0
//! (<https://github.com/NixOS/nix/pull/15083>). What still counts there is what
//! `loadConfFile` applies after the reset: the user configuration files
//! (`NIX_USER_CONF_FILES`, else `$XDG_CONFIG_HOME/nix/nix.conf` and
//! `$XDG_CONFIG_DIRS/*/nix/nix.conf`), the `NIX_CONFIG` environment variable, and
//! `--option` on the daemon's command line.
//!
//! So the answer needs the daemon's own view: its Nix version (its executable's
//! `--version`), its environment and command line (`/proc/<pid>/environ`, `cmdline`), and
//! the files it reads. [`effective`] is the pure rule; [`inspect`] gathers the inputs.

use ferry_nix::nix_version::{NixVersion, parse_nix_version};
use ferry_nix::nixconf::{FileLoader, NIX_CONFIG_SOURCE, NixConf, RealFs};
use std::path::{Path, PathBuf};

/// Whether this Nix drops `build-hook` from the system nix.conf (see the module docs). Lix
/// keeps reading it.
pub(crate) fn ignores_build_hook_in_nix_conf(v: &NixVersion) -> bool {
    !v.lix && (v.major, v.minor) >= (2, 25) && (v.major, v.minor) < (2, 34)
}

/// A `build-hook` value and where it was set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Set {
    pub(crate) value: String,
    /// `/etc/nix/nix.conf:12`, `NIX_CONFIG:1`, `the daemon's --option`.
    pub(crate) at: String,
}

/// What the daemon reads, layer by layer, in the order `loadConfFile` applies them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Layers {
    /// The daemon's Nix, if known.
    pub(crate) version: Option<NixVersion>,
    /// From `<conf dir>/nix.conf` and its includes.
    pub(crate) system: Option<Set>,
    /// From the user files, `NIX_CONFIG` or `--option` (the last one applied wins).
    pub(crate) later: Option<Set>,
}

/// The `build-hook` the daemon runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Effective {
    /// This value, from this place.
    Set(Set),
    /// Nix's default (the stock hook); `ignored` is a nix.conf value the daemon dropped.
    Default { ignored: Option<Set> },
}

/// The rule: later layers win; the system nix.conf counts unless this version ignores it.
/// An unknown version is taken to honour nix.conf (Nix before 2.25 and from 2.34 do).
pub(crate) fn effective(l: &Layers) -> Effective {
    if let Some(s) = &l.later {
        return Effective::Set(s.clone());
    }
    let ignores = l
        .version
        .is_some_and(|v| ignores_build_hook_in_nix_conf(&v));
    match (&l.system, ignores) {
        (Some(s), false) => Effective::Set(s.clone()),
        (ignored, _) => Effective::Default {
            ignored: ignored.clone(),
        },
    }
}

/// Is `value` (a `build-hook` command line) this program? By path, else by file name.
pub(crate) fn is_ferry(value: &str, this_exe: Option<&Path>) -> bool {
    let Some(first) = value.split_whitespace().next() else {
        return false;
    };
    let p = Path::new(first);
    if let (Some(exe), Ok(c)) = (this_exe, std::fs::canonicalize(p))
        && std::fs::canonicalize(exe).is_ok_and(|e| e == c)
    {
        return true;
    }
    p.file_name().is_some_and(|n| n == "ferry-build-hook")
}

/// The outcome for people: one verdict line, then what to do when it is not Ferry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Report {
    pub(crate) in_effect: bool,
    /// A running daemon was found (through its socket): the verdict is about a real process,
    /// not only about the files it would read when started.
    pub(crate) daemon_running: bool,
    pub(crate) text: String,
}

/// What the daemon process is, for the report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct DaemonInfo {
    pub(crate) pid: Option<u32>,
    /// The daemon's `NIX_CONFIG`, if any (the fix must keep it).
    pub(crate) nix_config: Option<String>,
    /// Why the daemon's environment could not be read, if it could not.
    pub(crate) unreadable: Option<String>,
}

/// Renders the verdict. `hook` is the value to recommend (this program's path).
pub(crate) fn report(l: &Layers, d: &DaemonInfo, this_exe: Option<&Path>) -> Report {
    let hook = this_exe.map_or_else(
        || "/path/to/ferry-build-hook".to_owned(),
        |p| p.display().to_string(),
    );
    let who = match (d.pid, l.version) {
        (Some(pid), Some(v)) => format!(
            "the running nix-daemon (pid {pid}, Nix {}.{})",
            v.major, v.minor
        ),
        (Some(pid), None) => format!("the running nix-daemon (pid {pid}, version unknown)"),
        (None, Some(v)) => format!(
            "nix-daemon (no running one found here; Nix {}.{} installed)",
            v.major, v.minor
        ),
        (None, None) => "nix-daemon (no running one found here)".to_owned(),
    };
    let mut text = String::new();
    let in_effect = match effective(l) {
        Effective::Set(s) if is_ferry(&s.value, this_exe) => {
            text.push_str(&format!(
                "build hook: in effect: {who} runs `{}` (set at {})\n",
                s.value, s.at
            ));
            true
        }
        Effective::Set(s) => {
            text.push_str(&format!(
                "build hook: NOT in effect: {who} runs `{}` (set at {}), not ferry-build-hook\n",
                s.value, s.at
            ));
            false
        }
        Effective::Default { ignored: Some(s) } => {
            text.push_str(&format!(
                "build hook: NOT in effect: {} sets `build-hook = {}`, but {who} ignores \
                 build-hook in nix.conf (Nix 2.25.0 to 2.33.x reset it to the default after \
                 reading nix.conf; fixed in 2.34.0, https://github.com/NixOS/nix/pull/15083) \
                 and runs Nix's own build-remote instead\n",
                s.at, s.value
            ));
            false
        }
        Effective::Default { ignored: None } => {
            text.push_str(&format!(
                "build hook: NOT in effect: build-hook is not set for {who}; it runs Nix's own build-remote\n"
            ));
            false
        }
    };
    if let Some(why) = &d.unreadable {
        text.push_str(&format!(
            "  (the daemon's environment and command line could not be read: {why}; run as root \
             to include NIX_CONFIG and --option)\n"
        ));
    }
    if !in_effect {
        let ignores = l
            .version
            .is_some_and(|v| ignores_build_hook_in_nix_conf(&v));
        let conf_line = match d.nix_config.as_deref().map(str::trim_end) {
            Some(existing) if !existing.is_empty() => {
                format!("{existing}\\nbuild-hook = {hook}")
            }
            _ => format!("build-hook = {hook}"),
        };
        text.push_str(
            "  To use Ferry's hook, set it where the daemon reads it, then restart the daemon:\n",
        );
        text.push_str(&format!(
            "  - systemd: `systemctl edit nix-daemon`, add\n      [Service]\n      Environment=\"NIX_CONFIG={conf_line}\"\n    then `systemctl restart nix-daemon`\n"
        ));
        text.push_str(&format!(
            "  - NixOS: systemd.services.nix-daemon.environment.NIX_CONFIG = \"build-hook = {hook}\";\n"
        ));
        if ignores {
            text.push_str(
                "    (nix.settings.build-hook and /etc/nix/nix.conf do not work on this Nix; \
                 they do from Nix 2.34.0)\n",
            );
        } else {
            text.push_str(&format!(
                "  - or in nix.conf: build-hook = {hook} (NixOS: nix.settings.build-hook); \
                 Nix 2.25.0 to 2.33.x ignore this one\n"
            ));
        }
    }
    Report {
        in_effect,
        daemon_running: d.pid.is_some(),
        text,
    }
}

/// The inode of the listening Unix socket bound to `socket` in `/proc/net/unix` text
/// (`Num RefCount Protocol Flags Type St Inode Path`; flag `0x10000` is `__SO_ACCEPTCON`,
/// a listening socket).
pub(crate) fn listening_inode(net_unix: &str, socket: &Path) -> Option<u64> {
    let want = socket.to_str()?;
    net_unix.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let flags = u64::from_str_radix(f.get(3)?, 16).ok()?;
        (f.get(7) == Some(&want) && flags & 0x10000 != 0)
            .then(|| f.get(6)?.parse().ok())
            .flatten()
    })
}

/// The nix-daemon serving this store: the process named `nix-daemon` (not a per-connection
/// worker, whose parent is a nix-daemon too) that holds the listening socket at `socket`.
/// `/proc/net/unix` lists the sockets of this process's network namespace only, and the
/// path is the one the daemon bound, so a daemon of another store or namespace on the same
/// machine (the test fleet has many) is not taken for this one. Not matching by mount
/// namespace: the daemon unshares its own (Nix's `LocalStore` does so to remount the store
/// writable), so it never equals its caller's.
pub(crate) fn find_daemon(proc: &Path, socket: &Path) -> Option<u32> {
    let inode = listening_inode(
        &std::fs::read_to_string(proc.join("net/unix")).ok()?,
        socket,
    )?;
    let target = format!("socket:[{inode}]");
    let comm = |pid: u32| {
        std::fs::read_to_string(proc.join(pid.to_string()).join("comm"))
            .map(|c| c.trim_end().to_owned())
            .ok()
    };
    let mut pids: Vec<u32> = std::fs::read_dir(proc)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| comm(pid).as_deref() == Some("nix-daemon"))
        .filter(|pid| {
            let stat =
                std::fs::read_to_string(proc.join(format!("{pid}/stat"))).unwrap_or_default();
            crate::siblings::parse_stat(&stat)
                .is_none_or(|(ppid, _)| comm(ppid).as_deref() != Some("nix-daemon"))
        })
        .collect();
    pids.sort_unstable();
    pids.into_iter().find(|pid| {
        std::fs::read_dir(proc.join(format!("{pid}/fd")))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()))
    })
}

/// NUL-separated `KEY=value` pairs of `/proc/<pid>/environ`.
pub(crate) fn parse_environ(bytes: &[u8]) -> Vec<(String, String)> {
    bytes
        .split(|&b| b == 0)
        .filter_map(|kv| {
            let s = String::from_utf8_lossy(kv);
            let (k, v) = s.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// `--option build-hook VALUE` pairs of a NUL-separated command line (the last wins).
pub(crate) fn option_from_cmdline(bytes: &[u8]) -> Option<String> {
    let args: Vec<String> = bytes
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    args.windows(3)
        .filter(|w| w[0] == "--option" && w[1] == "build-hook")
        .map(|w| w[2].clone())
        .next_back()
}

/// The user configuration files Nix reads, most important first (`getUserConfigFiles`:
/// `NIX_USER_CONF_FILES`, else `$XDG_CONFIG_HOME` or `~/.config`, then `$XDG_CONFIG_DIRS`
/// or `/etc/xdg`, each with `/nix/nix.conf`).
pub(crate) fn user_conf_files(env: &dyn Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    if let Some(files) = env("NIX_USER_CONF_FILES") {
        return files
            .split(':')
            .filter(|f| !f.is_empty())
            .map(PathBuf::from)
            .collect();
    }
    let home = env("XDG_CONFIG_HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| Path::new(&h).join(".config")));
    let dirs = env("XDG_CONFIG_DIRS")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "/etc/xdg".into());
    home.into_iter()
        .chain(dirs.split(':').filter(|d| !d.is_empty()).map(PathBuf::from))
        .map(|d| d.join("nix/nix.conf"))
        .collect()
}

fn set_of(conf: &NixConf) -> Option<Set> {
    let s = conf.setting("build-hook")?;
    Some(Set {
        value: s.value.clone(),
        at: s.last_changed_at().to_string(),
    })
}

/// The layers from a daemon's environment and command line, reading its files through
/// `fs`.
pub(crate) fn layers_from(
    version: Option<NixVersion>,
    environ: &[(String, String)],
    cmdline_option: Option<String>,
    fs: &dyn FileLoader,
) -> Layers {
    let env = |k: &str| environ.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let conf_dir = env("NIX_CONF_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from("/etc/nix"), PathBuf::from);
    let system = NixConf::load_system(&conf_dir, fs)
        .ok()
        .as_ref()
        .and_then(set_of);
    let mut later = NixConf::new();
    // `loadConfFile` applies them from the last to the first: the first one wins.
    for f in user_conf_files(&env).iter().rev() {
        let _ = later.apply_file(f, fs);
    }
    if let Some(text) = env("NIX_CONFIG") {
        let _ = later.apply_text(&text, Path::new(NIX_CONFIG_SOURCE), fs);
    }
    let mut later = set_of(&later);
    if let Some(v) = cmdline_option {
        later = Some(Set {
            value: v,
            at: "the daemon's --option".into(),
        });
    }
    Layers {
        version,
        system,
        later,
    }
}

/// Gathers the layers of the running daemon (or, without one, of this environment and the
/// installed Nix) and renders the report.
pub(crate) async fn inspect(proc: &Path, socket: &Path) -> Report {
    let this_exe = std::env::current_exe().ok();
    let pid = find_daemon(proc, socket);
    let mut info = DaemonInfo {
        pid,
        ..DaemonInfo::default()
    };
    let (environ, option, version) = match pid {
        Some(pid) => {
            let dir = proc.join(pid.to_string());
            let environ = match std::fs::read(dir.join("environ")) {
                Ok(b) => parse_environ(&b),
                Err(e) => {
                    info.unreadable = Some(e.to_string());
                    Vec::new()
                }
            };
            let option = std::fs::read(dir.join("cmdline"))
                .ok()
                .and_then(|b| option_from_cmdline(&b));
            let version = match std::fs::read_link(dir.join("exe")) {
                Ok(exe) => version_of(&exe).await,
                Err(_) => None,
            };
            (environ, option, version)
        }
        None => (std::env::vars().collect(), None, None),
    };
    let version = match version {
        Some(v) => Some(v),
        None => version_of(Path::new("nix-store")).await,
    };
    info.nix_config = environ
        .iter()
        .find(|(k, _)| k == "NIX_CONFIG")
        .map(|(_, v)| v.clone());
    let layers = layers_from(version, &environ, option, &RealFs);
    report(&layers, &info, this_exe.as_deref())
}

/// `<program> --version`, parsed; `None` if it cannot be run within 5 s or parsed.
async fn version_of(program: &Path) -> Option<NixVersion> {
    let mut c = tokio::process::Command::new(program);
    c.arg("--version")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(std::time::Duration::from_secs(5), c.output())
        .await
        .ok()?
        .ok()?;
    parse_nix_version(&String::from_utf8_lossy(&out.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    struct Files(BTreeMap<PathBuf, String>);

    impl FileLoader for Files {
        fn load(&self, path: &Path) -> std::io::Result<Option<String>> {
            Ok(self.0.get(path).cloned())
        }
    }

    fn v(text: &str) -> Option<NixVersion> {
        parse_nix_version(text)
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const FERRY: &str = "/usr/bin/ferry-build-hook";

    #[test]
    fn nix_conf_counts_except_on_2_25_to_2_33() {
        let fs = Files(BTreeMap::from([(
            PathBuf::from("/etc/nix/nix.conf"),
            format!("max-jobs = 0\nbuild-hook = {FERRY}\n"),
        )]));
        let e = env(&[("HOME", "/root")]);
        for (version, honoured) in [
            ("nix-daemon (Nix) 2.8.0", true),
            ("nix-daemon (Nix) 2.24.9", true),
            ("nix (Nix) 2.25.0", false),
            ("nix (Nix) 2.26.3", false),
            ("nix (Nix) 2.33.1", false),
            ("nix (Nix) 2.34.8", true),
            ("nix (Lix, like Nix) 2.93.0", true),
        ] {
            let l = layers_from(v(version), &e, None, &fs);
            let r = report(
                &l,
                &DaemonInfo {
                    pid: Some(7),
                    ..DaemonInfo::default()
                },
                None,
            );
            assert_eq!(r.in_effect, honoured, "{version}: {}", r.text);
            if !honoured {
                assert!(r.text.contains("/etc/nix/nix.conf:2 sets"), "{}", r.text);
                assert!(
                    r.text.contains("Environment=\"NIX_CONFIG=build-hook = "),
                    "{}",
                    r.text
                );
                assert!(
                    r.text
                        .contains("systemd.services.nix-daemon.environment.NIX_CONFIG"),
                    "{}",
                    r.text
                );
                assert!(r.text.contains("15083"), "{}", r.text);
            }
        }
    }

    #[test]
    fn the_daemons_environment_user_files_and_options_win() {
        let fs = Files(BTreeMap::from([
            (
                PathBuf::from("/etc/nix/nix.conf"),
                "build-hook = /usr/libexec/nix/build-remote\n".into(),
            ),
            (
                PathBuf::from("/root/.config/nix/nix.conf"),
                format!("build-hook = {FERRY}\n"),
            ),
        ]));
        let nix26 = v("nix (Nix) 2.26.3");
        // Root's user file counts on 2.26 (applied after the reset).
        let l = layers_from(nix26, &env(&[("HOME", "/root")]), None, &fs);
        assert_eq!(
            effective(&l),
            Effective::Set(Set {
                value: FERRY.into(),
                at: "/root/.config/nix/nix.conf:1".into()
            })
        );
        // NIX_CONFIG beats the user file, --option beats both.
        let e = env(&[
            ("HOME", "/root"),
            ("NIX_CONFIG", "build-hook = /opt/other 3"),
        ]);
        let l = layers_from(nix26, &e, None, &fs);
        let r = report(&l, &DaemonInfo::default(), None);
        assert!(!r.in_effect);
        assert!(
            r.text.contains("runs `/opt/other 3` (set at NIX_CONFIG:1)"),
            "{}",
            r.text
        );
        let l = layers_from(nix26, &e, Some(FERRY.into()), &fs);
        assert!(report(&l, &DaemonInfo::default(), None).in_effect);
        // A NIX_CONFIG the fix must keep is repeated in the suggested override.
        let e = env(&[("NIX_CONFIG", "max-jobs = 0")]);
        let l = layers_from(nix26, &e, None, &Files(BTreeMap::new()));
        let d = DaemonInfo {
            nix_config: Some("max-jobs = 0".into()),
            ..DaemonInfo::default()
        };
        let r = report(&l, &d, Some(Path::new(FERRY)));
        assert!(r.text.contains("not set"), "{}", r.text);
        assert!(
            r.text.contains(&format!(
                "Environment=\"NIX_CONFIG=max-jobs = 0\\nbuild-hook = {FERRY}\""
            )),
            "{}",
            r.text
        );
    }

    #[test]
    fn daemon_process_details() {
        assert_eq!(
            parse_environ(b"PATH=/bin\0NIX_CONFIG=build-hook = /x 1\nmax-jobs = 0\0EMPTY=\0junk\0"),
            env(&[
                ("PATH", "/bin"),
                ("NIX_CONFIG", "build-hook = /x 1\nmax-jobs = 0"),
                ("EMPTY", "")
            ])
        );
        assert_eq!(
            option_from_cmdline(
                b"nix-daemon\0--option\0build-hook\0/a\0--option\0build-hook\0/b\0"
            ),
            Some("/b".into())
        );
        assert_eq!(option_from_cmdline(b"nix-daemon\0--daemon\0"), None);
        let get = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            user_conf_files(&get(&[("HOME", "/root")])),
            [
                PathBuf::from("/root/.config/nix/nix.conf"),
                PathBuf::from("/etc/xdg/nix/nix.conf")
            ]
        );
        assert_eq!(
            user_conf_files(&get(&[("HOME", "/root"), ("NIX_USER_CONF_FILES", "/a:/b")])),
            [PathBuf::from("/a"), PathBuf::from("/b")]
        );
        let net_unix = "Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 2001 /run/other.sock
0000000000000000: 00000003 00000000 00000000 0001 03 2002 /nix/var/nix/daemon-socket/socket
0000000000000000: 00000002 00000000 00010000 0001 01 2003 /nix/var/nix/daemon-socket/socket
";
        let sock = Path::new("/nix/var/nix/daemon-socket/socket");
        assert_eq!(listening_inode(net_unix, sock), Some(2003));
        assert_eq!(listening_inode(net_unix, Path::new("/x")), None);
        assert!(is_ferry("/nix/store/abc-ferry/bin/ferry-build-hook", None));
        assert!(!is_ferry("nix __build-remote", None));
        assert!(!is_ferry("", None));
    }
}
