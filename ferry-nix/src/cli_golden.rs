//! Test support: store paths and path infos for unit tests, and the outputs of the real
//! Nix versions' command-line tools under `tests/golden/cli/` (regen-cli.sh).

use crate::hash::Hash;
use crate::serve::PathInfo;
use crate::store_path::{StoreDir, StorePath};
use std::collections::{BTreeMap, BTreeSet};

pub(crate) fn sd() -> StoreDir {
    StoreDir::new("/nix/store").expect("dir")
}

/// A store path named `name` with a hash part made of `c`.
pub(crate) fn sp(c: char, name: &str) -> StorePath {
    StorePath::from_base_name(&format!("{}-{name}", c.to_string().repeat(32))).expect("path")
}

pub(crate) fn info(path: &StorePath, refs: &[&StorePath]) -> PathInfo {
    PathInfo {
        path: path.clone(),
        deriver: None,
        nar_hash: Hash::sha256_of(b""),
        nar_size: 0,
        references: refs.iter().map(|p| (*p).clone()).collect(),
        ca: None,
        sigs: BTreeSet::new(),
    }
}

/// The Nix versions of `integration/nix-versions` and their directory of
/// `ferry-nix/tests/golden/cli/` (regen-cli.sh; 2.26 and 2.34 through regen-version.sh).
pub(crate) fn cli_goldens() -> Vec<(&'static str, std::path::PathBuf)> {
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/cli");
    vec![
        ("2.8", base.clone()),
        ("2.26", base.join("nix-2.26")),
        ("2.34", base.join("nix-2.34")),
    ]
}

pub(crate) fn read_golden(dir: &std::path::Path, rel: &str) -> String {
    let p = dir.join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `<key> <value>` lines (paths.txt, statuses.txt) as a map.
pub(crate) fn golden_map(dir: &std::path::Path, rel: &str) -> BTreeMap<String, String> {
    read_golden(dir, rel)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What RestoreImporter reads from `nix-store --check-validity --print-invalid` (one
    /// invalid path a line, exit 0) and `-q --hash` (one hash a line; an invalid path fails).
    #[test]
    fn real_nix_store_queries_of_every_version() {
        for (label, dir) in cli_goldens() {
            let paths = golden_map(&dir, "paths.txt");
            let statuses = golden_map(&dir, "statuses.txt");
            for q in [
                "check-validity-invalid",
                "check-validity-valid",
                "hash",
                "references",
            ] {
                assert_eq!(statuses[&format!("query/{q}")], "0", "Nix {label} {q}");
            }
            assert_ne!(statuses["query/hash-invalid"], "0", "Nix {label}");
            let invalid: Vec<StorePath> = read_golden(&dir, "query/check-validity-invalid.out")
                .lines()
                .map(|l| sd().parse(l.trim()).expect("a store path a line"))
                .collect();
            assert_eq!(
                invalid,
                [sd().parse(&paths["missing"]).expect("path")],
                "{label}"
            );
            assert_eq!(
                read_golden(&dir, "query/check-validity-valid.out"),
                "",
                "{label}"
            );
            assert_eq!(
                read_golden(&dir, "query/hash.out").lines().count(),
                2,
                "Nix {label}: one line per path"
            );
        }
    }
}
