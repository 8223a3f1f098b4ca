//! The environment real Nix gives a `post-build-hook` (ferry-nix/tests/golden/cli/, made by
//! regen-cli.sh: 2.8 on this machine, 2.26 and 2.34 through regen-version.sh), for a
//! derivation with outputs `out` and `dev`: what `hook::outputs` makes of it.

use ferry_nix::store_path::StoreDir;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn env_of(ver: &str) -> BTreeMap<String, String> {
    let p: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "../ferry-nix/tests/golden/cli",
        ver,
        "post-build/cli-multi.env",
    ]
    .iter()
    .collect();
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[test]
fn out_paths_and_drv_path_of_every_version() {
    let sd = StoreDir::new("/nix/store").expect("store dir");
    let drv = "/nix/store/rqmfwfpvs8n1dax7r7cvzsn38ybhrn8q-cli-multi.drv";
    let want = [
        "/nix/store/qjn8ypha59hx23flfnrmasmss9h92wlf-cli-multi",
        "/nix/store/wcxxx9il94a4iakh6009c7cyq78qak6c-cli-multi-dev",
    ];
    for ver in ["", "nix-2.26", "nix-2.34"] {
        let env = env_of(ver);
        assert_eq!(env.get("DRV_PATH").map(String::as_str), Some(drv), "{ver}");
        let out_paths = env.get("OUT_PATHS").map(String::as_str);
        let mut problems = Vec::new();
        if ver.is_empty() {
            // Nix 2.8.0 sets OUT_PATHS empty (NixOS/nix#6446): the hook falls back to the
            // .drv, which is gone with the throwaway store, so it reports a problem and
            // leaves the outputs to the uploader.
            assert_eq!(out_paths, Some(""));
            let outs = ferry_post_build::hook::outputs("", Some(drv), &sd, &mut problems);
            assert!(outs.is_empty() && problems.len() == 1, "{problems:?}");
            continue;
        }
        let outs = ferry_post_build::hook::outputs(
            out_paths.expect("OUT_PATHS"),
            Some(drv),
            &sd,
            &mut problems,
        );
        let mut outs_sorted = outs.clone();
        outs_sorted.sort();
        assert_eq!(outs_sorted, want, "{ver}");
        assert!(problems.is_empty(), "{ver}: {problems:?}");
    }
}
