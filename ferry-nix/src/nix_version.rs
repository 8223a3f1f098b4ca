//! The local Nix's version as `nix-store --version` prints it, and what each version
//! does that Ferry must know about.

/// What `nix-store --version` says about the local Nix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NixVersion {
    /// Lix (`nix-store (Lix, like Nix) 2.91.1`) rather than Nix.
    pub lix: bool,
    pub major: u64,
    pub minor: u64,
}

/// Parses the first line of `nix-store --version`: `nix-store (Nix) 2.8.0`, `nix-store
/// (Lix, like Nix) 2.93.0`, `nix-store (Determinate Nix 3.8.2) 2.30.1`, `nix-store (Nix)
/// 2.29.0pre20250407_1a2b3c4d`. The version is the last word; `None` if it has no
/// `major.minor`.
pub fn parse_nix_version(text: &str) -> Option<NixVersion> {
    let line = text.lines().next()?.trim();
    let word = line.split_whitespace().last()?;
    let mut parts = word.split('.');
    let number = |s: Option<&str>| -> Option<u64> {
        let digits: String = s?.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    let major = number(parts.next())?;
    let minor = number(parts.next())?;
    Some(NixVersion {
        lix: line.contains("Lix"),
        major,
        minor,
    })
}

/// Whether `NIX_HELD_LOCKS` still works: every Lix (`lix/libstore/local-store.cc`) and Nix
/// before 2.29.0, which removed it (commit 78eed85b).
pub fn held_locks_supported(v: &NixVersion) -> bool {
    v.lix || (v.major, v.minor) < (2, 29)
}

/// Whether a `# decline` under `max-jobs = 0` makes the daemon wait for a build slot (woken
/// when any of its builds ends) rather than fail. Up to 2.32 a declined goal goes to the
/// local-build path, whose first step, with `max-jobs = 0` always true, is
/// `curBuilds >= maxBuildJobs` → `waitForBuildSlot` (2.8 `DerivationGoal::tryLocalBuild`;
/// <https://github.com/NixOS/nix/blob/2.26.3/src/libstore/unix/build/local-derivation-goal.cc#L192>;
/// <https://github.com/NixOS/nix/blob/2.32.0/src/libstore/build/derivation-building-goal.cc#L705>);
/// the platform check that would reject it comes only after that, in `startBuilder`.
/// From 2.33.0 (commit b57caaa1) a declined derivation is checked with `canBuildLocally`,
/// false under `max-jobs = 0`, and fails at once: "Cannot build … required system or
/// feature not available" (2.33), "… local builds are disabled (max-jobs = 0)" (2.34,
/// <https://github.com/NixOS/nix/blob/2.34.0/src/libstore/build/derivation-building-goal.cc#L362>).
/// Lix is not known to wait, so no.
pub fn decline_waits_with_max_jobs_zero(v: &NixVersion) -> bool {
    !v.lix && (v.major, v.minor) < (2, 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli_golden::{cli_goldens, read_golden};

    #[test]
    fn decline_waits_for_a_slot_only_on_nix_before_2_33() {
        let v = |t: &str| parse_nix_version(t).expect("version");
        assert!(decline_waits_with_max_jobs_zero(&v(
            "nix-store (Nix) 2.8.0"
        )));
        assert!(decline_waits_with_max_jobs_zero(&v(
            "nix-store (Nix) 2.18.8"
        )));
        assert!(decline_waits_with_max_jobs_zero(&v(
            "nix-store (Nix) 2.26.3"
        )));
        assert!(decline_waits_with_max_jobs_zero(&v(
            "nix-store (Nix) 2.32.4"
        )));
        assert!(!decline_waits_with_max_jobs_zero(&v(
            "nix-store (Nix) 2.33.0"
        )));
        assert!(!decline_waits_with_max_jobs_zero(&v(
            "nix-store (Nix) 2.34.8"
        )));
        assert!(!decline_waits_with_max_jobs_zero(&v(
            "nix-store (Lix, like Nix) 2.91.1"
        )));
    }

    #[test]
    fn nix_versions_choose_the_importer() {
        let v = |t| parse_nix_version(t).expect(t);
        let nix28 = v("nix-store (Nix) 2.8.0\n");
        assert_eq!(
            nix28,
            NixVersion {
                lix: false,
                major: 2,
                minor: 8
            }
        );
        assert!(held_locks_supported(&nix28));
        assert!(held_locks_supported(&v("nix-store (Nix) 2.28.4")));
        assert!(!held_locks_supported(&v("nix-store (Nix) 2.29.0")));
        assert!(!held_locks_supported(&v(
            "nix-store (Nix) 2.29.0pre20250407_1a2b3c4d"
        )));
        assert!(!held_locks_supported(&v("nix-store (Nix) 3.0.1")));
        assert!(!held_locks_supported(&v(
            "nix-store (Determinate Nix 3.8.2) 2.30.1"
        )));
        let lix = v("nix-store (Lix, like Nix) 2.93.0\nSystem type: x86_64-linux\n");
        assert!(lix.lix && lix.minor == 93);
        assert!(held_locks_supported(&lix));
        assert_eq!(parse_nix_version(""), None);
        assert_eq!(parse_nix_version("nix-store (Nix) unknown"), None);
        assert_eq!(parse_nix_version("nix-store (Nix) 2"), None);
    }

    /// `nix-store --version` of each real Nix: the version Ferry reads picks the importer
    /// (`NIX_HELD_LOCKS` is gone from 2.29) and whether a decline under max-jobs 0 waits.
    #[test]
    fn real_nix_versions_choose_the_importer() {
        for (label, dir) in cli_goldens() {
            for file in ["versions/nix-store.txt", "versions/nix.txt"] {
                let text = read_golden(&dir, file);
                let v = parse_nix_version(&text).unwrap_or_else(|| panic!("{label}: {text}"));
                assert_eq!(format!("{}.{}", v.major, v.minor), label, "{file}");
                assert!(!v.lix);
                assert_eq!(held_locks_supported(&v), label != "2.34", "{label}");
                // Up to 2.32 a declined goal waits for a build slot; 2.33 rejects it.
                assert_eq!(
                    decline_waits_with_max_jobs_zero(&v),
                    label != "2.34",
                    "{label}"
                );
            }
        }
    }
}
