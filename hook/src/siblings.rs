//! Whether the daemon's worker that runs this hook has builds running, so that a `# decline`
//! makes it wait for one of them to end instead of failing or polling.
//!
//! Why: with every fitting builder busy, the stock answer is `# postpone`, and Nix puts the
//! goal in `waitingForAWhile`, which is woken only every `build-poll-interval` (5 s), not when
//! a build ends (2.8 `Worker::waitForInput`; `childTerminated` wakes `wantingToBuild` only).
//! A `# decline` for a derivation the host could build but has no free local slot for
//! (`max-jobs = 0`, or every local slot taken) sends the goal to `waitForBuildSlot`, which is
//! woken as soon as any child of the worker ends (2.8 `DerivationGoal::tryToBuild`, HEAD
//! `tryLocalBuild`). That is safe only while the worker has a child: with none, Nix 2.8
//! reports "unable to start any build" at once. The children that matter here are the
//! worker's other hook processes, each running one remote build: the worker starts a new
//! hook after every accept, so this hook's siblings (same parent, same program) are exactly
//! those.

use std::path::Path;

/// The parent pid and command name from a `/proc/<pid>/stat` line (`pid (comm) state ppid …`;
/// the name may contain spaces and parentheses, so it ends at the last `)`).
pub(crate) fn parse_stat(line: &str) -> Option<(u32, &str)> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let comm = line.get(open + 1..close)?;
    let mut rest = line.get(close + 1..)?.split_whitespace();
    let _state = rest.next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((ppid, comm))
}

/// How many other processes of this program have the same parent as this one (under
/// `proc`, normally `/proc`). 0 where `/proc` is missing (not Linux): then the hook
/// postpones as the stock hook does.
pub(crate) fn count_under(proc: &Path) -> usize {
    let me = std::process::id();
    let parent = std::os::unix::process::parent_id();
    let exe = std::env::current_exe().ok();
    // The kernel keeps the first 15 bytes of the program's file name as `comm`.
    let comm: Option<String> = exe
        .as_ref()
        .and_then(|e| e.file_name())
        .map(|n| n.to_string_lossy().chars().take(15).collect());
    let Ok(entries) = std::fs::read_dir(proc) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(proc.join(format!("{pid}/stat"))) else {
                return false;
            };
            let Some((ppid, c)) = parse_stat(&stat) else {
                return false;
            };
            if ppid != parent {
                return false;
            }
            // Same program: by path where readable (a zombie's is not), else by name.
            match (std::fs::read_link(proc.join(format!("{pid}/exe"))), &exe) {
                (Ok(p), Some(e)) => &p == e,
                _ => comm.as_deref() == Some(c),
            }
        })
        .count()
}

/// [`count_under`] for `/proc`.
pub(crate) fn count() -> usize {
    count_under(Path::new("/proc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_names() {
        assert_eq!(
            parse_stat("4242 (ferry-build-hoo) S 4000 4242 4000 0 -1"),
            Some((4000, "ferry-build-hoo"))
        );
        assert_eq!(parse_stat("7 (a) b) (c) Z 1 7 7 0"), Some((1, "a) b) (c")));
        assert_eq!(parse_stat("7 a S 1"), None);
        assert_eq!(parse_stat("7 (a) S x"), None);
    }

    #[test]
    fn siblings_are_processes_of_this_program_with_this_parent() {
        let tmp = tempfile::tempdir().expect("tmp");
        let proc = tmp.path();
        let parent = std::os::unix::process::parent_id();
        let exe = std::env::current_exe().expect("exe");
        let comm: String = exe
            .file_name()
            .map(|n| n.to_string_lossy().chars().take(15).collect())
            .unwrap_or_default();
        let add = |pid: u32, ppid: u32, name: &str, exe: Option<&Path>| {
            let d = proc.join(pid.to_string());
            std::fs::create_dir_all(&d).expect("dir");
            std::fs::write(d.join("stat"), format!("{pid} ({name}) S {ppid} 1 1 0")).expect("stat");
            if let Some(e) = exe {
                std::os::unix::fs::symlink(e, d.join("exe")).expect("link");
            }
        };
        add(std::process::id(), parent, &comm, Some(&exe)); // this process: not counted
        add(100_001, parent, &comm, Some(&exe)); // a sibling building
        add(100_002, parent, &comm, None); // a sibling that exited, not yet reaped
        add(100_003, parent + 1, &comm, Some(&exe)); // another worker's hook
        add(100_004, parent, "sshd", Some(Path::new("/usr/sbin/sshd"))); // another program
        std::fs::create_dir_all(proc.join("self")).expect("self");
        assert_eq!(count_under(proc), 2);
        assert_eq!(count_under(&proc.join("missing")), 0);
    }
}
