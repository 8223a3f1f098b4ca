//! The Nix versions a fleet host can run (`integration/nix-versions`) and the holder script
//! that gives a host a Debian suite's root file system.

use crate::process::run;
use crate::workspace_root;
use anyhow::{Context, Result, anyhow};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A Nix version a fleet host runs: this machine's own Debian `nix-bin`, or a Debian suite's
/// `nix-bin` in a root file system of its own (built and cached by `dev/rootfs`). The list
/// lives in `integration/nix-versions`, one line per version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nix {
    /// Short version label, `2.8`, `2.26`, ...: what `FERRY_NIX` names.
    pub label: String,
    /// Debian suite whose `nix-bin` the host runs; `None` for this machine's own.
    pub suite: Option<String>,
}

const NIX_VERSIONS: &str = include_str!("../nix-versions");

impl Nix {
    /// Every version of `integration/nix-versions`, in file order.
    pub fn all() -> Vec<Nix> {
        NIX_VERSIONS
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let label = f.next()?.to_owned();
                let suite = f.next().filter(|s| *s != "-").map(str::to_owned);
                Some(Nix { label, suite })
            })
            .collect()
    }

    /// The version labelled `label` (`2.26`), or an error listing the known ones.
    pub fn by_label(label: &str) -> Result<Nix> {
        let all = Nix::all();
        all.iter()
            .find(|n| n.label == label)
            .cloned()
            .ok_or_else(|| {
                let known: Vec<&str> = all.iter().map(|n| n.label.as_str()).collect();
                anyhow!(
                    "unknown Nix version '{label}' (integration/nix-versions has {})",
                    known.join(", ")
                )
            })
    }

    /// This machine's own Nix (Debian bookworm's 2.8).
    pub fn native() -> Nix {
        Nix::all()
            .into_iter()
            .find(|n| n.suite.is_none())
            .unwrap_or(Nix {
                label: "native".into(),
                suite: None,
            })
    }

    /// The version under test: `FERRY_NIX` (a label), else this machine's own. Every host
    /// whose Nix the test does not choose runs this one, so the whole suite runs on a
    /// version by setting one variable (`dev/test` does it for each).
    pub fn under_test() -> Nix {
        match std::env::var("FERRY_NIX") {
            Ok(l) if !l.is_empty() => {
                Nix::by_label(&l).unwrap_or_else(|e| panic!("FERRY_NIX: {e}"))
            }
            _ => Nix::native(),
        }
    }

    /// (major, minor) from the label, for behaviour that differs by version.
    pub fn minor(&self) -> (u32, u32) {
        let mut it = self.label.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        (it.next().unwrap_or(0), it.next().unwrap_or(0))
    }

    /// Nix 2.25 to 2.33 ignore `build-hook` in `nix.conf` (it became an internal setting);
    /// only the daemon's environment (`NIX_CONFIG`) sets it there.
    pub fn ignores_build_hook_in_conf(&self) -> bool {
        let v = self.minor();
        ((2, 25)..(2, 34)).contains(&v)
    }

    /// The root file system of this version, built on first use (`dev/rootfs`).
    pub(crate) fn rootfs(&self) -> Result<Option<PathBuf>> {
        let Some(suite) = &self.suite else {
            return Ok(None);
        };
        static CACHE: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
        let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, p)) = cache.iter().find(|(s, _)| s == suite) {
            return Ok(Some(p.clone()));
        }
        let script = workspace_root().join("dev/rootfs");
        let out = run(Command::new(&script).arg(suite).stderr(Stdio::inherit()))
            .with_context(|| format!("preparing the {suite} root file system"))?;
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        cache.push((suite.clone(), dir.clone()));
        Ok(Some(dir))
    }
}

impl std::fmt::Display for Nix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.suite {
            Some(s) => write!(f, "Nix {} ({s})", self.label),
            None => write!(f, "Nix {} (this machine)", self.label),
        }
    }
}

/// The holder script of a host that runs a Debian suite's Nix: the cached root file system
/// as the read-only layer of an overlay (the host's changes go to its own directory), the
/// host's `/nix` and `/etc/nix` bound over it, the kernel file systems, a private `/run`, and
/// the directories tests share with hosts (`/tmp`, where fleets and their files live, and the
/// workspace, where Ferry's binaries are). Then the root is switched with `pivot_root`, not
/// `chroot`: Nix 2.8 `setns()`es its ssh child back into its mount namespace, which resets a
/// chroot's root but keeps a pivoted one. Root's shell start-up files are removed in the
/// host's layer, as they are hidden on hosts of this machine's Nix: logins cost what sshd and
/// Nix cost.
pub(crate) fn rootfs_holder_script(dir: &Path, lower: &Path) -> Result<String> {
    for d in ["root", "upper", "overlay-work"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    let mut shared = vec![std::env::temp_dir(), workspace_root()];
    // The target directory may live outside the workspace (CARGO_TARGET_DIR), under any
    // name: test and bench executables are `<target>/<profile>/deps/<name>`, binaries
    // `<target>/<profile>/<name>`.
    if let Some(t) = std::env::current_exe().ok().and_then(|e| {
        let dir = e.parent()?;
        let profile = if dir.ends_with("deps") {
            dir.parent()?
        } else {
            dir
        };
        profile.parent().map(Path::to_path_buf)
    }) {
        shared.push(t);
    }
    let mut binds = String::new();
    for d in &shared {
        let d = d.display();
        binds.push_str(&format!(
            "mkdir -p \"$R{d}\" && mount --bind \"{d}\" \"$R{d}\" && "
        ));
    }
    Ok(format!(
        "set -e; R={root}; \
         mount -t overlay overlay -o lowerdir={lower},upperdir={upper},workdir={work} \"$R\" && \
         mkdir -p \"$R/nix\" \"$R/etc/nix\" \"$R/.oldroot\" \"$R/proc\" \"$R/sys\" \"$R/dev\" \"$R/run\" && \
         mount --bind {nix} \"$R/nix\" && mount --bind {etc} \"$R/etc/nix\" && \
         mount -t proc proc \"$R/proc\" && mount --rbind /sys \"$R/sys\" && mount --rbind /dev \"$R/dev\" && \
         mount -t tmpfs -o mode=755 tmpfs \"$R/run\" && mkdir -p \"$R/run/sshd\" && \
         rm -f \"$R/root/.bashrc\" \"$R/root/.profile\" && \
         {binds}cd \"$R\" && pivot_root . .oldroot && umount -l /.oldroot && cd / && \
         exec sleep 100000000",
        root = dir.join("root").display(),
        lower = lower.display(),
        upper = dir.join("upper").display(),
        work = dir.join("overlay-work").display(),
        nix = dir.join("nix").display(),
        etc = dir.join("etc-nix").display(),
    ))
}
