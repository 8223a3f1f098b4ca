//! Test derivations (plain `/bin/sh`, no nixpkgs) and what `nix-build` prints.

use crate::{SEQ, SYSTEM};
use std::process::Output;
use std::sync::atomic::Ordering;

/// A derivation expression that builds `echo <text> > $out` with `/bin/sh` (no nixpkgs).
/// `nonce` makes the name unique so nothing is cached between runs.
pub fn trivial_drv(nonce: &str, text: &str) -> String {
    format!(
        r#"builtins.derivation {{ name = "ferry-test-{nonce}"; system = "{SYSTEM}"; builder = "/bin/sh"; args = [ "-c" "echo {text} > $out" ]; PATH = "/usr/bin:/bin"; }}"#
    )
}

/// A derivation with a two-level input closure: `top` depends on `mid`, which depends on `leaf`.
pub fn chain_drv(nonce: &str) -> String {
    format!(
        r#"let
  mk = name: script: builtins.derivation {{ name = "ferry-${{name}}-{nonce}"; system = "{SYSTEM}"; builder = "/bin/sh"; args = [ "-c" script ]; PATH = "/usr/bin:/bin"; }};
  leaf = mk "leaf" "echo leaf > $out";
  mid = mk "mid" "mkdir $out; echo ${{leaf}} > $out/leaf; cat ${{leaf}} > $out/copy";
in mk "top" "mkdir $out; echo ${{mid}} > $out/mid; cat ${{mid}}/copy > $out/copy""#
    )
}

/// A unique nonce for test derivations.
pub fn nonce() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst),
        t % 1_000_000_007
    )
}

/// Output paths printed by `nix-build`.
pub fn out_paths(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A derivation whose output is one file of `bytes` zero bytes (`head -c` from /dev/zero:
/// real, not sparse, for the small sizes of the tests).
pub fn zeros_drv(n: &str, bytes: u64) -> String {
    format!(
        r#"builtins.derivation {{ name = "ferry-zeros-{n}"; system = "{SYSTEM}"; builder = "/bin/sh"; args = [ "-c" "head -c {bytes} /dev/zero > $out" ]; PATH = "/usr/bin:/bin"; }}"#
    )
}
