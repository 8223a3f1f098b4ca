//! Handing one derivation to the stock hook, for builders Ferry does not speak to itself
//! (`ssh-ng://`, local or chroot stores, anything not `ssh://`).
//!
//! When a `try` can only go to such machines, Ferry starts the stock hook (Nix 2.8:
//! `/usr/libexec/nix/build-remote`; later Nix: `nix __build-remote`; or `stock-hook` in
//! `[build-hook]`), writes to its stdin the settings stream it read (with `builders`
//! narrowed to those machines) and the current `try` in wire form (docs/hook-protocol.md §1.3,
//! §1.4), then copies the rest of its own stdin through. The stock hook inherits stderr (the
//! reply channel, and stdout, which the daemon points at the same pipe) and the build log on
//! fd 4 (and fd 5), so it answers the daemon itself.
//!
//! **From then on this process is the stock hook**: Ferry writes nothing more and exits with
//! the stock hook's exit status. If the stock hook declines or postpones, the daemon's next
//! `try` for this Worker goes to it as well, with the narrowed `builders`; once it accepts
//! and finishes, the hook process ends and the daemon's next hook is Ferry again
//! (docs/hook-protocol.md §1.9).

use crate::protocol::TryRequest;
use ferry_nix::machines::Machine;
use ferry_nix::wire::WireWriter;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::process::Command;

/// Debian's stock hook for Nix 2.8–2.9 (a symlink to `nix`, which picks the legacy command
/// from `argv[0]`).
pub(crate) const DEBIAN_STOCK_HOOK: &str = "/usr/libexec/nix/build-remote";

#[derive(Debug, Error)]
#[non_exhaustive]
pub(crate) enum DelegateError {
    #[error(
        "no stock hook to hand over to: {DEBIAN_STOCK_HOOK} does not exist and `nix` is not on PATH; set stock-hook in [build-hook]"
    )]
    NotFound,
    #[error("starting the stock hook {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

/// One machines-file line for `m` (2.8 `src/libstore/machines.cc` field order): URI,
/// systems, ssh key, max jobs, speed factor, supported and mandatory features, host key;
/// `-` for what is unset. A whole speed factor is written as an integer: 2.8 reads it with
/// `stoull`.
pub(crate) fn machine_line(m: &Machine) -> String {
    let list = |v: &mut dyn Iterator<Item = &String>| {
        let s: Vec<&str> = v.map(String::as_str).collect();
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.join(",")
        }
    };
    let speed = if m.speed_factor.fract() == 0.0 {
        format!("{}", m.speed_factor as u64)
    } else {
        format!("{}", m.speed_factor)
    };
    [
        m.store_uri.clone(),
        list(&mut m.systems.iter()),
        m.ssh_key.clone().unwrap_or_else(|| "-".into()),
        m.max_jobs.to_string(),
        speed,
        list(&mut m.supported_features.iter()),
        list(&mut m.mandatory_features.iter()),
        m.public_host_key
            .as_ref()
            .map_or_else(|| "-".into(), |k| k.base64.clone()),
    ]
    .join(" ")
}

/// What the stock hook reads first: the settings as the daemon sent them, with `builders`
/// replaced (or added: Lix sends only overridden settings) by `machines`, then the `try`.
pub(crate) fn replay(
    settings: &[(String, String)],
    machines: &[&Machine],
    t: &TryRequest,
) -> Vec<u8> {
    let builders: Vec<String> = machines.iter().map(|m| machine_line(m)).collect();
    let builders = builders.join("\n");
    let mut pairs: Vec<(&str, &str)> = settings
        .iter()
        .filter(|(k, _)| k != "builders")
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    pairs.push(("builders", &builders));
    let mut w = WireWriter::new(Vec::new());
    // Writing into a Vec cannot fail.
    let _ = (|| -> std::io::Result<()> {
        w.write_settings(&pairs)?;
        w.write_str("try")?;
        w.write_bool(t.am_willing)?;
        w.write_str(&t.needed_system)?;
        w.write_str(&t.drv_path)?;
        w.write_strings(t.required_features.iter())
    })();
    w.into_inner()
}

/// The stock hook's command line, without the verbosity: `configured` split on whitespace
/// if set; else Debian's path if it exists; else, from `nix` on PATH, the `build-remote`
/// next to its real location (`<prefix>/libexec/nix/build-remote`, Nix ≤ 2.9) or
/// `nix __build-remote` (Nix ≥ 2.10). `exists` and `find_nix` are the file system.
pub(crate) fn stock_hook_command(
    configured: Option<&str>,
    exists: impl Fn(&Path) -> bool,
    find_nix: impl Fn() -> Option<PathBuf>,
) -> Result<Vec<String>, DelegateError> {
    if let Some(c) = configured {
        let words: Vec<String> = c.split_whitespace().map(str::to_owned).collect();
        if !words.is_empty() {
            return Ok(words);
        }
    }
    if exists(Path::new(DEBIAN_STOCK_HOOK)) {
        return Ok(vec![DEBIAN_STOCK_HOOK.to_owned()]);
    }
    let nix = find_nix().ok_or(DelegateError::NotFound)?;
    if let Some(prefix) = nix.parent().and_then(Path::parent) {
        let legacy = prefix.join("libexec/nix/build-remote");
        if exists(&legacy) {
            return Ok(vec![legacy.display().to_string()]);
        }
    }
    Ok(vec![nix.display().to_string(), "__build-remote".to_owned()])
}

/// `nix` on `PATH`, resolved through symlinks.
pub(crate) fn find_nix_on_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("nix"))
        .find(|p| p.is_file())
        .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
}

/// Runs the stock hook as this hook from here on: `command` plus `verbosity` as argv,
/// `prefix` then the rest of `stdin` on its stdin, stderr, stdout and fds 4 and 5
/// inherited. Returns its exit status (128 + signal if it was killed). An error means it
/// could not be started, and nothing was written to the daemon.
pub(crate) async fn hand_over<R: AsyncRead + Unpin>(
    command: &[String],
    verbosity: &str,
    prefix: Vec<u8>,
    mut stdin: R,
) -> Result<i32, DelegateError> {
    let Some((program, args)) = command.split_first() else {
        return Err(DelegateError::NotFound);
    };
    let mut child = Command::new(program)
        .args(args)
        .arg(verbosity)
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|source| DelegateError::Spawn {
            program: program.clone(),
            source,
        })?;
    let mut to_child = child.stdin.take();
    let pump = async {
        if let Some(w) = to_child.as_mut() {
            w.write_all(&prefix).await?;
            w.flush().await?;
            tokio::io::copy(&mut stdin, w).await?;
        }
        // End of our input: the stock hook sees EOF too.
        drop(to_child);
        std::io::Result::Ok(())
    };
    tokio::pin!(pump);
    let mut pumping = true;
    loop {
        tokio::select! {
            status = child.wait() => {
                return Ok(match status {
                    Ok(s) => s.code().unwrap_or_else(|| {
                        use std::os::unix::process::ExitStatusExt;
                        128 + s.signal().unwrap_or(0)
                    }),
                    Err(_) => 1,
                });
            }
            // A write error means the stock hook stopped reading: its exit says why.
            _ = &mut pump, if pumping => pumping = false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_nix::machines::parse_builders_setting;
    use ferry_nix::wire::WireReader;

    fn machines(spec: &str) -> Vec<Machine> {
        parse_builders_setting(spec, "x86_64-linux").expect("machines")
    }

    #[test]
    fn machine_lines_round_trip() {
        let spec =
            "ssh-ng://root@h x86_64-linux,i686-linux /k 2 3 big,kvm kvm c3NoLWVkMjU1MTkgQUFBQQ==";
        let m = machines(spec);
        assert_eq!(machine_line(&m[0]), spec);
        assert_eq!(machines(&machine_line(&m[0])), m);
        let bare = machines("ssh-ng://h");
        assert_eq!(
            machine_line(&bare[0]),
            "ssh-ng://h x86_64-linux - 1 1 - - -"
        );
    }

    #[test]
    fn replay_narrows_builders_and_repeats_the_try() {
        let all = machines("ssh://a\nssh-ng://b - - 4");
        let t = TryRequest {
            am_willing: true,
            needed_system: "x86_64-linux".into(),
            drv_path: "/nix/store/00000000000000000000000000000000-x.drv".into(),
            required_features: ["kvm".to_owned()].into(),
        };
        let settings = vec![
            (
                "builders".to_owned(),
                "ssh://a\nssh-ng://b - - 4".to_owned(),
            ),
            ("max-jobs".to_owned(), "0".to_owned()),
        ];
        let bytes = replay(&settings, &[&all[1]], &t);
        let mut r = WireReader::new(&bytes[..]);
        let s = r.read_settings(100, 1000).expect("settings");
        assert_eq!(
            s,
            [
                ("max-jobs".to_owned(), "0".to_owned()),
                (
                    "builders".to_owned(),
                    "ssh-ng://b x86_64-linux - 4 1 - - -".to_owned()
                ),
            ]
        );
        assert_eq!(r.read_string(10).expect("tag"), "try");
        assert!(r.read_bool().expect("willing"));
        assert_eq!(r.read_string(100).expect("sys"), "x86_64-linux");
        assert_eq!(r.read_string(100).expect("drv"), t.drv_path);
        assert_eq!(r.read_strings(10, 10).expect("features"), ["kvm"]);
        assert_eq!(r.offset(), bytes.len() as u64);
    }

    #[test]
    fn stock_hook_lookup() {
        let none = |_: &Path| false;
        assert_eq!(
            stock_hook_command(Some(" nix  __build-remote "), none, || None).expect("cfg"),
            ["nix", "__build-remote"]
        );
        assert_eq!(
            stock_hook_command(None, |p| p == Path::new(DEBIAN_STOCK_HOOK), || None)
                .expect("debian"),
            [DEBIAN_STOCK_HOOK]
        );
        let nix = || Some(PathBuf::from("/nix/store/x-nix-2.8/bin/nix"));
        assert_eq!(
            stock_hook_command(
                None,
                |p| p == Path::new("/nix/store/x-nix-2.8/libexec/nix/build-remote"),
                nix
            )
            .expect("legacy"),
            ["/nix/store/x-nix-2.8/libexec/nix/build-remote"]
        );
        assert_eq!(
            stock_hook_command(None, none, nix).expect("new"),
            ["/nix/store/x-nix-2.8/bin/nix", "__build-remote"]
        );
        assert!(stock_hook_command(None, none, || None).is_err());
    }

    /// The stock hook's stand-in (`sh`) gets the prefix and then our stdin, and its exit
    /// status is ours.
    #[tokio::test]
    async fn hand_over_pipes_and_returns_the_status() {
        let tmp = tempfile::tempdir().expect("tmp");
        let out = tmp.path().join("got");
        let script = format!("cat > {}; exit \"$0\"", out.display());
        let cmd = vec!["sh".to_owned(), "-c".to_owned(), script];
        let code = hand_over(&cmd, "7", b"prefix|".to_vec(), &b"rest"[..])
            .await
            .expect("ran");
        assert_eq!(code, 7);
        assert_eq!(std::fs::read(&out).expect("out"), b"prefix|rest");
        let e = hand_over(&["/nonexistent/hook".to_owned()], "3", vec![], &b""[..])
            .await
            .expect_err("missing");
        assert!(e.to_string().contains("/nonexistent/hook"), "{e}");
    }
}
