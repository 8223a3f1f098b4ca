//! `ferry-post-build` on a real Nix fleet of the version under test (`FERRY_NIX`): the client
//! daemon runs it as its `post-build-hook` (Nix 2.8.0 passes only `DRV_PATH`,
//! NixOS/nix#6446, so the hook reads the outputs from the derivation; 2.26 and 2.34 set
//! `OUT_PATHS`), the uploader runs in the client's namespaces, an nginx with
//! WebDAV PUT on a LAN host is the HTTP cache, and a second host substitutes from it with
//! signatures required.
//!
//! These tests need root (network and mount namespaces) and nginx (dev/setup).

use ferry_integration::support::post_build as post_build_support;

use ferry_integration::{SYSTEM, blackhole_port, chain_drv, ferry_bin, heal_host, nonce, run};
use post_build_support::*;
use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// 20 derivations (local with no builders, remote through Ferry's build hook, a
/// multi-output one) are uploaded while they build to a `file://` cache and to nginx over
/// HTTP PUT; a second host with `require-sigs` substitutes every path from nginx and
/// verifies it; Nix itself verifies the `file://` cache's NARs and signatures.
#[test]
fn builds_are_uploaded_and_substituted_with_signatures() {
    let ferry = Ferry::new();
    let mut fleet = ferry.fleet(1);
    let (www, cache_url) = add_nginx_cache(&mut fleet);
    ferry.write_config(std::slice::from_ref(&cache_url));
    let _up = Uploader(ferry.start_uploader(&fleet));

    let mut built = Vec::new();
    built.extend(build(
        &fleet,
        &chain_drv(&nonce()),
        &LOCAL_ONLY,
        "local chain",
    ));
    built.extend(build(
        &fleet,
        &trivial_list(6, "local"),
        &LOCAL_ONLY,
        "local trivials",
    ));
    built.extend(build(
        &fleet,
        &multi_output("local"),
        &LOCAL_ONLY,
        "local multi-output",
    ));
    let remote_chain = build(&fleet, &chain_drv(&nonce()), &["-j0"], "remote chain");
    assert!(
        fleet.builders[0].has_store_path(&remote_chain[0]),
        "the chain was not built remotely"
    );
    built.extend(remote_chain);
    built.extend(build(
        &fleet,
        &trivial_list(7, "remote"),
        &["-j0"],
        "remote trivials",
    ));
    let outputs = all_outputs(&fleet, &built);
    assert_eq!(outputs.len(), 17, "{outputs:?}");
    let expected = closure(&fleet, &outputs);
    assert_eq!(expected.len(), 21, "{expected:?}");

    wait_uploaded(
        "every path in both caches",
        Duration::from_secs(60),
        &[&ferry.file_cache, &www],
        &expected,
    );
    assert_eq!(check_cache_dir(&ferry.file_cache), expected.len());
    assert_eq!(check_cache_dir(&www), expected.len());
    wait_for(
        "GC roots removed after upload",
        Duration::from_secs(10),
        || ferry.gc_roots(&fleet).is_empty(),
    );
    let status = ferry.status(&fleet);
    assert!(status.contains(QUEUE_DONE), "{status}");
    assert!(target_succeeded(&status, &cache_url), "{status}");

    // A second host trusts only Ferry's key and substitutes from nginx.
    add_substituting_client(&mut fleet, "client2", &cache_url, &ferry.public_key);
    let client2 = fleet.host("client2");
    realise_and_verify(
        client2,
        &outputs,
        &expected,
        "client2 substitutes from nginx",
    );
    // Nothing was built on client2: substitution only (`nix-store -r` would build otherwise).
    let mut q = client2.nix_command("nix-store");
    q.args(["-q", "--deriver", &outputs[0]]);
    let deriver = String::from_utf8_lossy(&run(&mut q).expect("deriver").stdout)
        .trim()
        .to_owned();
    assert!(
        !client2.has_store_path(&deriver),
        "client2 has the .drv: it built instead of substituting"
    );

    // Nix checks the file:// cache: NAR hashes and Ferry's signature.
    verify_cache(
        client2.nix_command("nix"),
        &format!("file://{}", ferry.file_cache.display()),
        &ferry.public_key,
        &expected,
        "the file:// cache",
    );
}

/// An `s3://` target on a real S3 server (moto, in server mode on a LAN host, checking every
/// request's SigV4 signature with botocore's code). Debian's Nix 2.8 is built without
/// aws-sdk-cpp (`nix store ping --store s3://…` says "don't know how to open"), so Nix reads
/// the bucket through moto's plain HTTP interface as a binary cache instead.
///
/// With a wrong secret every S3 request is refused (`SignatureDoesNotMatch` in `status`),
/// a permanent failure: the jobs wait in the dead letters and the `file://` target still
/// fills; with the right key and `retry --all` the closure lands in the bucket (narinfos after their NARs and references), and a second host with
/// `require-sigs` substitutes every path from `http://<moto>/<bucket>`.
#[test]
fn s3_target_with_sigv4_on_moto_and_substitution_by_nix() {
    let Some(python) = moto_or_skip("s3_target_with_sigv4_on_moto_and_substitution_by_nix") else {
        return;
    };
    let ferry = Ferry::new();
    let mut fleet = ferry.fleet(0);
    let bucket = "ferry-cache";
    let MotoBucket {
        endpoint,
        key_id,
        secret,
    } = start_moto_bucket(&mut fleet, &python, bucket, BucketAccess::Public, None);
    let (id_file, secret_file) = write_s3_key_files(ferry.dir.path(), &key_id, "not-the-secret");
    let s3_url = format!("s3://{bucket}?endpoint={endpoint}&region=us-east-1");
    ferry.write_config_with(
        std::slice::from_ref(&s3_url),
        &s3_key_files_toml(&id_file, &secret_file),
    );

    let (outputs, expected) = build_locally(
        &fleet,
        &[
            (trivial_list(3, "s3"), "trivials"),
            (multi_output("s3"), "multi-output"),
            (chain_drv(&nonce()), "chain"),
        ],
    );

    // Wrong secret: moto refuses every signature.
    let up = Uploader(ferry.start_uploader(&fleet));
    wait_uploaded(
        "the file:// target (the S3 one is refused)",
        Duration::from_secs(30),
        &[&ferry.file_cache],
        &expected,
    );
    wait_for(
        "SignatureDoesNotMatch in the status",
        Duration::from_secs(20),
        || ferry.status(&fleet).contains("(SignatureDoesNotMatch)"),
    );
    // A refused signature is permanent: every job waits in the dead letters, none is lost.
    wait_for("every job dead-lettered", Duration::from_secs(20), || {
        ferry.status(&fleet).contains(&format!(
            "queued jobs: 0 (0 retrying), dead letters: {}",
            expected.len()
        ))
    });
    let status = ferry.status(&fleet);
    // Every built path had its own job (the hook ran for each derivation).
    assert_dead_letters(
        &status,
        &expected,
        &["(target)", "SignatureDoesNotMatch"],
        "the refused signature",
    );
    drop(up);
    let log = ferry.uploader_log();
    assert!(
        !log.contains("not-the-secret"),
        "the secret was logged:\n{log}"
    );

    // The right secret: `retry` queues the dead letters again and everything goes up.
    std::fs::write(&secret_file, format!("{secret}\n")).expect("secret");
    let up = Uploader(ferry.start_uploader(&fleet));
    let mut r = ferry.command(&fleet.client, &["retry", "--all"]);
    run(&mut r).expect("ferry-post-build retry --all");
    wait_for_done(&ferry, &fleet);
    drop(up);
    let log = ferry.uploader_log();
    assert!(!log.contains(&secret), "the secret was logged");
    let status = ferry.status(&fleet);
    assert!(target_succeeded(&status, &s3_url), "{status}");
    let uploaded_to_s3 = log
        .lines()
        .filter(|l| l.contains(" uploaded ") && l.contains(&format!("target={s3_url} ")))
        .count();
    assert_eq!(
        uploaded_to_s3,
        expected.len(),
        "paths uploaded to S3 (log):\n{log}"
    );

    // Nix reads the bucket over moto's HTTP interface, trusting only Ferry's key.
    moto_allow_anonymous(fleet.host("s3"), &python, &endpoint);
    let cache = format!("{endpoint}/{bucket}");
    add_substituting_client(&mut fleet, "client2", &cache, &ferry.public_key);
    let client2 = fleet.host("client2");
    realise_on(
        client2,
        &outputs,
        &expected,
        "client2 substitutes from the S3 bucket",
    );
    verify_cache(
        client2.nix_command("nix"),
        &cache,
        &ferry.public_key,
        &expected,
        "the S3 bucket",
    );
}

/// A `file://…?compression=xz` target next to the default zstd one: the same paths get an
/// xz NAR there (`Compression: xz`, `nar/….nar.xz`), and a second host with `require-sigs`
/// substitutes everything from it with Nix 2.8's own xz decoder.
#[test]
fn xz_target_substitutes_with_nix() {
    let ferry = Ferry::new();
    let mut fleet = ferry.fleet(0);
    let xz_dir = ferry.dir.path().join("xz-cache");
    let xz_url = format!("file://{}?compression=xz", xz_dir.display());
    ferry.write_config_with(std::slice::from_ref(&xz_url), "xz-level = 2\n");
    let (outputs, expected) = build_locally(
        &fleet,
        &[
            (trivial_list(2, "xz"), "trivials"),
            (chain_drv(&nonce()), "chain"),
        ],
    );
    ferry.drain(&fleet);
    assert_eq!(check_cache_dir(&xz_dir), expected.len());
    assert_eq!(check_cache_dir(&ferry.file_cache), expected.len());
    for p in &expected {
        let xz = read_narinfo(&xz_dir, p);
        assert!(
            xz.contains("\nCompression: xz\n") && xz.contains(".nar.xz\n"),
            "{xz}"
        );
        let zst = read_narinfo(&ferry.file_cache, p);
        assert!(zst.contains("\nCompression: zstd\n"), "{zst}");
    }

    let url = format!("file://{}", xz_dir.display());
    add_substituting_client(&mut fleet, "client2", &url, &ferry.public_key);
    realise_and_verify(
        fleet.host("client2"),
        &outputs,
        &expected,
        "client2 substitutes from the xz cache",
    );
}

/// With the uploader stopped and the HTTP cache blackholed, builds still succeed and the hook
/// returns 0 quickly; queued outputs survive `nix-store --gc` (GC roots); once the uploader
/// runs, the file cache fills at once and the HTTP cache after it comes back.
#[test]
fn hook_is_fast_and_nothing_is_lost_while_uploader_and_cache_are_down() {
    let ferry = Ferry::new();
    let mut fleet = ferry.fleet(0);
    let (www, cache_url) = add_nginx_cache(&mut fleet);
    ferry.write_config(std::slice::from_ref(&cache_url));
    blackhole_port(fleet.host("cache"), NGINX_PORT).expect("blackhole");

    let start = Instant::now();
    let built = build(
        &fleet,
        &trivial_list(6, "down"),
        &["-j1"],
        "builds with everything down",
    );
    let elapsed = start.elapsed();
    assert!(
        elapsed < Duration::from_secs(20),
        "6 trivial builds took {elapsed:?}"
    );
    let outputs = all_outputs(&fleet, &built);
    let roots = ferry.gc_roots(&fleet);
    for o in &outputs {
        let base = o.rsplit('/').next().unwrap_or_default();
        assert!(
            roots.iter().any(|r| r == base),
            "no GC root for {o}: {roots:?}"
        );
    }

    // The hook itself, run as Nix runs it (Nix 2.8: DRV_PATH only), while nothing uploads.
    let mut q = fleet.client_command("nix-store");
    q.args(["-q", "--deriver", &outputs[0]]);
    let drv = String::from_utf8_lossy(&run(&mut q).expect("deriver").stdout)
        .trim()
        .to_owned();
    let mut times = Vec::new();
    for _ in 0..20 {
        let mut h = fleet
            .client
            .command(&ferry_bin("ferry-post-build").to_string_lossy());
        h.env("DRV_PATH", &drv)
            .env("OUT_PATHS", "")
            .env("FERRY_CONFIG", &ferry.config);
        let t = Instant::now();
        let out = h.stdin(Stdio::null()).output().expect("hook");
        times.push(t.elapsed());
        assert!(
            out.status.success(),
            "hook exit {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "hook complained: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    times.sort();
    // Generous bounds (debug build, nsenter): this catches waiting on the uploader or the
    // network, not milliseconds; the benchmark measures those.
    assert!(times[times.len() - 1] < Duration::from_secs(1), "{times:?}");
    assert!(
        times[times.len() / 2] < Duration::from_millis(200),
        "{times:?}"
    );

    gc_keeps(&fleet, &outputs, "queued");

    let up = Uploader(ferry.start_uploader(&fleet));
    wait_uploaded(
        "the file cache (its target is up)",
        Duration::from_secs(30),
        &[&ferry.file_cache],
        &outputs,
    );
    wait_for(
        "a recorded error for the blackholed cache",
        Duration::from_secs(30),
        || {
            ferry
                .status(&fleet)
                .contains(&format!("target {cache_url}: last success never"))
                && ferry.status(&fleet).contains("retrying")
        },
    );
    let status = ferry.status(&fleet);
    assert!(
        !status.contains("queued jobs: 0 "),
        "jobs left the queue while the cache was down:\n{status}"
    );
    assert_eq!(missing_narinfos(&www, &outputs).len(), outputs.len());

    heal_host(fleet.host("cache")).expect("heal");
    wait_uploaded(
        "the HTTP cache after it came back",
        Duration::from_secs(30),
        &[&www],
        &outputs,
    );
    wait_for_done(&ferry, &fleet);
    check_cache_dir(&ferry.file_cache);
    check_cache_dir(&www);
    drop(up);
}

/// Tiny deterministic generator for kill delays (no rand dependency in the fixture).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

/// The uploader is killed with SIGKILL 25 times at random moments (during ingest,
/// compression, uploads, commits) and restarted; afterwards every queued path is in both
/// caches once, every narinfo's NAR is complete, no NAR is orphaned or duplicated, no
/// temporary file is visible, nothing is dead-lettered and every GC root is gone.
#[test]
fn uploader_survives_sigkill_at_random_moments() {
    let ferry = Ferry::new();
    let mut fleet = ferry.fleet(0);
    let (www, cache_url) = add_nginx_cache(&mut fleet);
    ferry.write_config(std::slice::from_ref(&cache_url));

    // Each round builds a multi-MB incompressible output while an uploader runs, then kills
    // the uploader at a random moment: hits land during ingest, NAR compression, uploads and
    // queue commits.
    let mut rng = Lcg(std::process::id() as u64 ^ 0x5eed);
    let mut built = build(&fleet, &chain_drv(&nonce()), &["-j1"], "chain");
    let mut kills = 0;
    for i in 0..25 {
        let mut up = ferry.start_uploader(&fleet);
        let size = 1_000_000 + rng.next(3_000_000);
        let expr = format!(
            r#"builtins.derivation {{ name = "ferry-pb-big-{i}-{n}"; system = "{SYSTEM}"; builder = "/bin/sh"; args = [ "-c" "mkdir $out; head -c {size} /dev/urandom > $out/data; echo {i} > $out/i" ]; PATH = "/usr/bin:/bin"; }}"#,
            n = nonce()
        );
        built.extend(build(&fleet, &expr, &["-j1"], "big output"));
        std::thread::sleep(Duration::from_millis(rng.next(300)));
        let _ = up.kill(); // SIGKILL
        let _ = up.wait();
        kills += 1;
    }
    assert_eq!(kills, 25);
    let expected: BTreeSet<String> = closure(&fleet, &built);
    // Work must remain after the first kills for the test to mean something; the log shows
    // how far each run got.
    let up = Uploader(ferry.start_uploader(&fleet));
    wait_uploaded(
        "both caches complete after the kills",
        Duration::from_secs(60),
        &[&ferry.file_cache, &www],
        &expected,
    );
    wait_for_done(&ferry, &fleet);
    drop(up);
    assert_eq!(check_cache_dir(&ferry.file_cache), expected.len());
    assert_eq!(check_cache_dir(&www), expected.len());
    // A restarted uploader cleans its staging directory: nothing partial anywhere.
    let tmp = ferry.file_cache.join(".ferry-tmp");
    let leftovers = std::fs::read_dir(&tmp).map(|rd| rd.count()).unwrap_or(0);
    assert_eq!(leftovers, 0, "staging files left in {}", tmp.display());
    let log = ferry.uploader_log();
    if std::env::var_os("FERRY_TEST_SHOW_LOG").is_some() {
        eprintln!("{log}");
    }
    // Most kills hit a running uploader (a few may land before it logs its start on a
    // loaded machine).
    let starts = log.matches("uploader started").count();
    assert!(
        starts >= 14,
        "only {starts} of 26 uploader runs got going:\n{log}"
    );
}

/// The hook takes the outputs from `OUT_PATHS` when Nix sets it and reads them from
/// `DRV_PATH` only when it is empty (measured on the fleet's versions: empty on Nix 2.8.0,
/// NixOS/nix#6446; set on 2.26 and 2.34, all outputs of the derivation). The spool records,
/// caught before any uploader runs, show which way the hook went: a record from `OUT_PATHS`
/// has `out` lines only, one read from the derivation also names it. Both upload.
#[test]
fn hook_spools_out_paths_when_nix_sets_them() {
    let ferry = Ferry::new();
    let fleet = ferry.fleet(0);
    let (outputs, _) = build_locally(
        &fleet,
        &[
            (multi_output("outpaths"), "multi-output"),
            (trivial_list(2, "outpaths"), "trivials"),
        ],
    );
    assert_eq!(outputs.len(), 4, "{outputs:?}");

    let records = spool_records(&ferry.state);
    assert_eq!(records.len(), 3, "one record per derivation: {records:?}");
    let nix_sets_out_paths = fleet.client.nix.minor() >= (2, 26);
    let mut spooled = BTreeSet::new();
    for r in &records {
        let field = |k: &str| -> Vec<String> {
            r.lines()
                .filter_map(|l| l.strip_prefix(k).map(str::to_owned))
                .collect()
        };
        let (drvs, outs) = (field("drv "), field("out "));
        assert!(!outs.is_empty(), "no outputs in the record:\n{r}");
        if nix_sets_out_paths {
            assert!(
                drvs.is_empty(),
                "{}: OUT_PATHS is set, yet the record names the derivation:\n{r}",
                fleet.client.nix
            );
        } else {
            assert_eq!(drvs.len(), 1, "{}: no derivation in\n{r}", fleet.client.nix);
            // The outputs the hook read from the derivation are Nix's.
            let mut q = fleet.client_command("nix-store");
            q.args(["-q", "--outputs", &drvs[0]]);
            let mut want: Vec<String> = String::from_utf8_lossy(&run(&mut q).expect("q").stdout)
                .lines()
                .map(str::to_owned)
                .collect();
            let mut got = outs.clone();
            want.sort();
            got.sort();
            assert_eq!(got, want, "{r}");
        }
        spooled.extend(outs);
    }
    // Every output (the multi-output derivation's `dev` too) is in a record.
    assert_eq!(spooled, outputs.iter().cloned().collect::<BTreeSet<_>>());

    ferry.drain(&fleet);
    assert!(missing_narinfos(&ferry.file_cache, &outputs).is_empty());
    assert_eq!(check_cache_dir(&ferry.file_cache), outputs.len());
}
