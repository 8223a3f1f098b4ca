//! The README's main job (`dev/demo`) as a test, so it runs on every Nix version of the
//! matrix: offload through `ferry-build-hook` with a dead builder, upload by
//! `ferry-post-build`, substitution through `ferry-substituter` with a dead first cache.

use ferry_integration::{check, ferry_bin};

#[test]
fn the_demo_runs_end_to_end() {
    // The demo binary checks every step itself and exits non-zero naming the one that failed;
    // it inherits FERRY_NIX, so it runs on the Nix under test.
    let out = std::process::Command::new(ferry_bin("ferry-demo"))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running ferry-demo");
    check(&out, "ferry-demo").unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Done: offloaded past a dead builder"),
        "{text}"
    );
}
