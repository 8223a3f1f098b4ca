//! Running commands and waiting: the small process helpers every test uses.

use anyhow::{Context, Result, anyhow, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs a command and fails with its stderr when it does not exit 0.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}:\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

pub(crate) fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args)).map(|_| ())
}

/// Polls `ok` every 20 ms until it holds, or fails after `timeout` naming `what`.
pub fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !ok() {
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Resident memory of the processes whose executable is `exe`: (current, peak) in KiB
/// summed over them, from `/proc/<pid>/status` (`VmRSS`, `VmHWM`).
pub fn rss_of(exe: &Path) -> Option<(u64, u64)> {
    rss_where(exe, None)
}

/// [`rss_of`], counting only the processes in the network namespace `netns` (one fleet host):
/// tests run in parallel, and another test's process of the same binary must not count.
pub fn rss_of_in(exe: &Path, netns: &str) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let ino = std::fs::metadata(format!("/run/netns/{netns}")).ok()?.ino();
    rss_where(exe, Some(format!("net:[{ino}]")))
}

fn rss_where(exe: &Path, net: Option<String>) -> Option<(u64, u64)> {
    let mut found = None;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let pid = e.path();
        if let Some(net) = &net
            && std::fs::read_link(pid.join("ns/net"))
                .map(|l| l.to_string_lossy() != net.as_str())
                .unwrap_or(true)
        {
            continue;
        }
        // A binary rebuilt while the bench runs shows as `<path> (deleted)`.
        let Ok(link) = std::fs::read_link(pid.join("exe")) else {
            continue;
        };
        let link = link.to_string_lossy();
        let shown = exe.to_string_lossy();
        if link != shown && link != format!("{shown} (deleted)") {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(pid.join("status")) else {
            continue;
        };
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let (rss, hwm) = found.unwrap_or((0, 0));
        found = Some((rss + field("VmRSS:"), hwm.max(field("VmHWM:"))));
    }
    found
}

/// Fails unless `out` succeeded, with stdout and stderr in the message.
pub fn check(out: &Output, what: &str) -> Result<()> {
    if !out.status.success() {
        return Err(anyhow!(
            "{what} failed with {}:\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Path of one of Ferry's binaries in this build's target directory (`dev/test` builds them
/// before the tests run). Panics with a clear message when it is missing.
pub fn ferry_bin(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps/; binaries in target/<profile>/.
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace --bins` first (dev/test does)",
        p.display()
    );
    p
}

/// Runs `c` (stdin closed) and returns its trimmed stdout; panics with its output when it
/// fails (a fixture step, not the behaviour under test).
pub fn stdout_of(mut c: Command, what: &str) -> String {
    let out = c.stdin(Stdio::null()).output().expect(what);
    check(&out, what).unwrap_or_else(|e| panic!("{e}"));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The fields of `/proc/<pid>/stat` after the command name (which is in parentheses and may
/// hold spaces): state, ppid, …; `None` when the process is gone.
pub fn proc_stat(pid: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Whether process `pid` has ended: gone, or a zombie nobody has reaped yet.
pub fn process_ended(pid: &str) -> bool {
    proc_stat(pid).is_none_or(|f| f.first().is_some_and(|state| state == "Z"))
}
