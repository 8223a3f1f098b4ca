//! A large output on every path at flat memory: built on a builder through
//! `ferry-build-hook` (NAR streamed back and imported), uploaded by `ferry-post-build` to a
//! `file://` cache, an HTTP cache (nginx WebDAV) and an S3 store (Garage, as a multipart
//! upload), and substituted by a second client through `ferry-substituter` reading the
//! bucket. Each process's peak RSS is printed next to the size and must stay under a small
//! constant: memory must not grow with the output.
//!
//! `FERRY_LARGE_MIB` sets the size (default 2048; `dev/bench` also runs 10 GiB of zeros,
//! `FERRY_LARGE_ZEROS=1`, to spare the disk). The output repeats a 16 MiB random block, so
//! it does not compress within zstd's window but the build is quick.
//!
//! Needs root, nginx and Garage (dev/setup).

use ferry_integration::support::post_build as post_build_support;

use ferry_integration::garage::Garage;
use ferry_integration::{SYSTEM, check, ferry_bin, nonce, out_paths};
use post_build_support::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// Peak resident memory allowed to each process, whatever the output's size.
const LIMIT_MIB: u64 = 64;

/// Peak RSS (VmHWM, KiB) over the live processes whose executable is `exe` in the fleet host
/// whose network namespace is `netns` (other tests' processes run at the same time).
fn peak_rss_kib(exe: &Path, netns: &str) -> u64 {
    ferry_integration::rss_of_in(exe, netns).map_or(0, |(_, peak)| peak)
}

/// Runs `wait` while sampling `exe`'s peak RSS every 50 ms (for short-lived processes such as
/// the hook, which the daemon starts and reaps).
fn sampling<T>(exe: &Path, netns: &str, wait: impl FnOnce() -> T) -> (T, u64) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let exe2 = exe.to_owned();
    let netns = netns.to_owned();
    let stop2 = stop.clone();
    let sampler = std::thread::spawn(move || {
        let mut peak = 0;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            peak = peak.max(peak_rss_kib(&exe2, &netns));
            std::thread::sleep(Duration::from_millis(50));
        }
        peak
    });
    let r = wait();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap_or(0);
    (r, peak)
}

#[test]
fn large_output_on_every_path_at_flat_memory() {
    if !garage_or_skip("large_output_on_every_path_at_flat_memory") {
        return;
    }
    let mib: u64 = ferry_integration::env_number("FERRY_LARGE_MIB", 16, 2048);
    let ferry = Ferry::new();
    let mut fleet = ferry.fleet(1);
    let (www, http) = add_nginx_cache(&mut fleet);
    let garage =
        Garage::start(&mut fleet, 1, "ferry-large").unwrap_or_else(|e| panic!("garage: {e:#}"));
    let (id_file, secret_file) = garage
        .credential_files(ferry.dir.path())
        .expect("key files");
    let s3 = format!("{}&compression=none", garage.s3_url(0));
    ferry.write_config_with(
        &[http.clone(), s3.clone()],
        &s3_key_files_toml(&id_file, &secret_file),
    );

    // Offloaded: the builder makes it, the hook streams it back into the client's store.
    // `FERRY_LARGE_ZEROS=1` (the 10 GiB benchmark) makes a file of zeros instead, which the
    // compressed targets and Garage's deduplication store in little space.
    let script = if std::env::var_os("FERRY_LARGE_ZEROS").is_some() {
        format!("head -c {} /dev/zero > $out", mib << 20)
    } else {
        format!(
            "head -c 16777216 /dev/urandom > block; i=0; while [ $i -lt {} ]; do cat block; i=$((i+1)); done > $out",
            mib / 16
        )
    };
    let expr = format!(
        r#"builtins.derivation {{ name = "ferry-large-{n}"; system = "{SYSTEM}"; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
  args = [ "-c" "{script}" ]; }}"#,
        n = nonce(),
    );
    let t = Instant::now();
    let client_netns = fleet.client.netns.clone();
    let (out, hook_kib) = sampling(&ferry_bin("ferry-build-hook"), &client_netns, || {
        fleet.nix_build(&expr, &["-j0"])
    });
    let build_secs = t.elapsed().as_secs_f64();
    check(&out, "the large build").unwrap_or_else(|e| panic!("{e}\n{}", fleet.daemon_log()));
    let path = out_paths(&out).remove(0);
    assert!(
        fleet.builders[0].has_store_path(&path),
        "not built on the builder"
    );
    let size = std::fs::metadata(fleet.client.nix_path(&path))
        .expect("imported")
        .len();
    assert_eq!(size, mib << 20);

    // Uploaded to all three targets.
    let t = Instant::now();
    let up = ferry.start_uploader(&fleet);
    wait_for(
        "the large path uploaded",
        Duration::from_secs(60 + mib / 4),
        || {
            let status = ferry.status(&fleet);
            [&http, &s3].iter().all(|t| target_succeeded(&status, t))
                && missing_narinfos(&ferry.file_cache, [&path]).is_empty()
                && status.contains(QUEUE_DONE)
        },
    );
    let upload_secs = t.elapsed().as_secs_f64();
    let uploader_kib = peak_rss_kib(&post_build_bin(), &client_netns);
    drop(up);
    let status = ferry.status(&fleet);
    for t in [&http, &s3] {
        assert!(target_succeeded(&status, t), "{status}");
    }
    let log = ferry.uploader_log();
    assert!(log.contains("multipart upload complete"), "{log}");
    assert!(missing_narinfos(&ferry.file_cache, [&path]).is_empty());
    assert!(www.join(format!("{}.narinfo", hash_part(&path))).exists());

    // Substituted through Ferry from the bucket.
    let sub = add_client_behind_substituter(
        &mut fleet,
        "client2",
        &ferry.public_key,
        ferry.dir.path(),
        &s3_upstream_toml(&garage.s3_url(0), "", &id_file, &secret_file),
    );
    let client2 = fleet.host("client2");
    let t = Instant::now();
    let out = realise(client2, [&path]);
    let substitute_secs = t.elapsed().as_secs_f64();
    let substituter_kib = peak_rss_kib(&ferry_bin("ferry-substituter"), &client2.netns);
    let sub_log = sub.log_text();
    drop(sub);
    check(&out, "client2 substitutes the large path through Ferry")
        .unwrap_or_else(|e| panic!("{e}\nsubstituter log:\n{sub_log}"));
    assert_eq!(
        std::fs::metadata(client2.nix_path(&path))
            .expect("substituted")
            .len(),
        mib << 20
    );

    println!(
        "large output {mib} MiB: peak RSS hook {} MiB (build+fetch {build_secs:.1} s), uploader {} MiB \
         (file+http+s3 multipart {upload_secs:.1} s), substituter {} MiB (substitution {substitute_secs:.1} s)",
        hook_kib >> 10,
        uploader_kib >> 10,
        substituter_kib >> 10
    );
    for (what, kib) in [
        ("hook", hook_kib),
        ("uploader", uploader_kib),
        ("substituter", substituter_kib),
    ] {
        assert!(kib > 0, "no RSS sample of the {what}");
        assert!(
            kib < LIMIT_MIB << 10,
            "the {what}'s peak RSS is {} MiB for a {mib} MiB output (limit {LIMIT_MIB} MiB)",
            kib >> 10
        );
    }
}
