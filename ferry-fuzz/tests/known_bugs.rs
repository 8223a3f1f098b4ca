//! Bugs the fuzz targets found in code that is being changed elsewhere: each is a regression
//! test, ignored until the fix lands (then drop `#[ignore]` and the matching guard in
//! ferry-fuzz/src/targets.rs). Run them with `cargo test -p ferry-fuzz --test known_bugs -- --ignored`.

use std::time::{Duration, UNIX_EPOCH};

/// substituter/src/retry_after.rs `http_date`: a 12-digit year overflows `days * 86_400`
/// (i64): "attempt to multiply with overflow" in debug builds, a wrapped (wrong) delay in
/// release builds. A hostile upstream's `Retry-After` reaches it. Found by the `retry_after`
/// target; input in ferry-fuzz/seeds/known-bugs/retry-after-overflow.
#[test]
#[ignore = "bug in substituter/src/retry_after.rs, reported, fix pending (issue 12)"]
fn retry_after_huge_year_does_not_overflow() {
    let v = "Sun, 06 Nov 1099511627776 08:49:37 GMT";
    let got = std::panic::catch_unwind(|| {
        ferry_substituter::retry_after::parse(v, UNIX_EPOCH + Duration::from_secs(1_700_000_000))
    });
    let got = got.expect("no panic");
    // Far in the future or refused; never a wrapped value.
    assert!(
        got.is_none() || got.is_some_and(|d| d > Duration::from_secs(1 << 40)),
        "{got:?}"
    );
}
