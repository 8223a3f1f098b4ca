//! `ferry-post-build` when things go wrong: refused uploads dead-lettered until `retry`, a
//! local store that cannot answer, a hook that always exits 0, and keys and configuration
//! checked before anything runs. Needs root and nginx (dev/setup).

use ferry_integration::support::post_build as post_build_support;
use ferry_integration::{chain_drv, check, ferry_bin, nonce, run, trivial_drv};
use post_build_support::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A cache that refuses uploads (a real nginx answering every `PUT` with 403) is a
/// permanent failure: each job is tried once and moves to the dead letters, `status` (text
/// and `--json`) lists every one with the 403, nginx sees no more attempts, the dead
/// letters survive an uploader restart and keep their GC roots through `nix-store --gc`.
/// Once nginx takes uploads, `retry PATH` and `retry --all` queue them again, everything
/// is uploaded and a second host substitutes it with `require-sigs`.
#[test]
fn refused_uploads_are_dead_lettered_until_retry() {
    let ferry = Ferry::new();
    let mut fleet = ferry.fleet(0);
    let nginx = GuardedNginx::start(
        fleet.add_host("cache").expect("cache host"),
        Uploads::Forbidden,
    );
    ferry.write_config(std::slice::from_ref(&nginx.url));
    // Every path of the closure is built here, so each is a job of its own.
    let (outputs, expected) = build_locally(
        &fleet,
        &[
            (chain_drv(&nonce()), "chain"),
            (trivial_list(2, "refused"), "trivials"),
        ],
    );
    assert_eq!(expected.len(), 5, "{expected:?}");

    let up = Uploader(ferry.start_uploader(&fleet));
    let all_dead = format!(
        "queued jobs: 0 (0 retrying), dead letters: {}",
        expected.len()
    );
    wait_for("every job dead-lettered", Duration::from_secs(30), || {
        ferry.status(&fleet).contains(&all_dead)
    });
    // The file:// target took everything meanwhile.
    assert!(missing_narinfos(&ferry.file_cache, &expected).is_empty());
    let status = ferry.status(&fleet);
    assert_dead_letters(
        &status,
        &expected,
        &["after 1 attempt(s) (target)", "HTTP 403"],
        "its 403",
    );
    assert!(
        status.lines().any(|l| l.starts_with("last error: ")
            && l.contains("(target)")
            && l.contains("HTTP 403")),
        "{status}"
    );
    let json = status_json(&ferry, &fleet);
    let dead = json["dead_letters"].as_array().expect("dead_letters");
    assert_eq!(dead.len(), expected.len(), "{json}");
    for d in dead {
        assert_eq!(d["cause"], "target", "{d}");
        assert_eq!(d["attempts"], 1, "{d}");
        assert!(
            d["error"].as_str().is_some_and(|e| e.contains("HTTP 403")),
            "{d}"
        );
        assert!(
            expected.contains(d["path"].as_str().unwrap_or_default()),
            "{d}"
        );
    }
    assert_eq!(json["queue"]["depth"], 0, "{json}");
    assert!(
        json["queue"]["last_error"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("HTTP 403")),
        "{json}"
    );

    // Dead letters are not retried: nginx sees no new PUT, also after a restart.
    let puts = nginx.puts();
    assert!(
        !puts.is_empty() && puts.iter().all(|s| s == "403"),
        "{puts:?}"
    );
    drop(up);
    let up = Uploader(ferry.start_uploader(&fleet));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        nginx.puts().len(),
        puts.len(),
        "a dead letter was tried again"
    );
    assert!(ferry.status(&fleet).contains(&all_dead));
    // Their paths stay rooted: nothing is lost while someone fixes the cache.
    gc_keeps(&fleet, &expected, "dead-lettered");

    // `retry` names what it cannot find.
    let mut r = ferry.command(
        &fleet.client,
        &["retry", "/nix/store/00000000000000000000000000000000-nope"],
    );
    let out = r.output().expect("retry");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("not dead-lettered: /nix/store/00000000000000000000000000000000-nope"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The operator lets the uploader in, then retries one path, then all.
    nginx.set_uploads(host_mut(&mut fleet, "cache"), Uploads::Accepted);
    let first = &outputs[0];
    let mut r = ferry.command(&fleet.client, &["retry", first]);
    let out = run(&mut r).expect("retry PATH");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("queued again: {first}")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let first_closure = closure(&fleet, std::slice::from_ref(first));
    wait_or_explain(
        &ferry,
        &fleet,
        "the retried path's closure on nginx",
        Duration::from_secs(20),
        || missing_narinfos(&nginx.www, &first_closure).is_empty(),
    );
    assert!(
        ferry
            .status(&fleet)
            .contains(&format!("dead letters: {}", expected.len() - 1)),
        "{}",
        ferry.status(&fleet)
    );
    let mut r = ferry.command(&fleet.client, &["retry", "--all"]);
    run(&mut r).expect("retry --all");
    wait_for_done(&ferry, &fleet);
    drop(up);
    assert_eq!(check_cache_dir(&nginx.www), expected.len());

    add_substituting_client(&mut fleet, "client2", &nginx.url, &ferry.public_key);
    realise_on(
        fleet.host("client2"),
        &outputs,
        &expected,
        "client2 substitutes the retried uploads",
    );
}

/// Local-side failures count as errors. With the client's nix-daemon stopped the uploader
/// cannot read path infos: `status` shows the error (text and time) as the last error and
/// the local store's, every job with its attempts, error side and next attempt, and the
/// targets blameless; once the daemon is back the queue drains. A store path whose contents
/// no longer match its recorded NAR hash is a permanent local failure: dead-lettered with
/// the mismatch, and uploaded by `retry` once the contents are restored.
#[test]
fn local_store_failures_show_in_status() {
    let ferry = Ferry::new();
    let mut fleet = ferry.fleet(0);
    let (_, expected) = build_locally(
        &fleet,
        &[
            (chain_drv(&nonce()), "chain"),
            (trivial_list(2, "local-err"), "trivials"),
        ],
    );

    stop_nix_daemon(&fleet.client);
    let up = Uploader(ferry.start_uploader(&fleet));
    // On a time-out the message carries the last status seen: a flake here once left
    // nothing to read but the time-out.
    let mut last = serde_json::Value::Null;
    ferry_integration::wait_until(
        "every job retried at least twice",
        Duration::from_secs(30),
        || {
            last = status_json(&ferry, &fleet);
            last["retrying_jobs"].as_array().is_some_and(|a| {
                a.len() == expected.len() && a.iter().all(|r| r["attempts"].as_u64() >= Some(2))
            })
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}; {} paths expected; last status:\n{last:#}",
            expected.len()
        )
    });
    let status = ferry.status(&fleet);
    let last = status
        .lines()
        .find(|l| l.starts_with("last error: "))
        .unwrap_or_default();
    assert!(
        last.contains("(local store)") && last.contains("nix path-info"),
        "the local failure is not the last error:\n{status}"
    );
    assert!(
        status.lines().any(
            |l| l.starts_with("local store: last success never, errors ")
                && l.contains("nix path-info")
        ),
        "{status}"
    );
    assert!(status.contains("next retry: "), "{status}");
    for p in &expected {
        assert!(
            status.lines().any(|l| l.starts_with(&format!("  {p}: "))
                && l.contains("(local), next attempt ")
                && l.contains("nix path-info")),
            "{p} has no retry line:\n{status}"
        );
    }
    assert!(
        status.contains(&format!(
            "target file://{}: last success never, paths uploaded 0, last error never",
            ferry.file_cache.display()
        )),
        "a target was blamed for a local failure:\n{status}"
    );
    let json = status_json(&ferry, &fleet);
    assert!(
        json["queue"]["local"]["errors"].as_i64() >= Some(2 * expected.len() as i64),
        "{json}"
    );
    assert_eq!(json["queue"]["last_error"]["source"], "local", "{json}");
    for r in json["retrying_jobs"].as_array().expect("retrying") {
        assert_eq!(r["last_error_side"], "local", "{r}");
        assert!(
            r["next_attempt_ms"].as_i64().is_some() && r["last_error_ms"].as_i64().is_some(),
            "{r}"
        );
    }

    // The daemon comes back: the queue drains.
    fleet
        .client
        .start_nix_daemon(&[("FERRY_CONFIG".into(), ferry.config.display().to_string())])
        .expect("restart nix-daemon");
    wait_for_done(&ferry, &fleet);
    assert_eq!(check_cache_dir(&ferry.file_cache), expected.len());
    assert!(
        !ferry
            .status(&fleet)
            .contains("local store: last success never"),
        "{}",
        ferry.status(&fleet)
    );
    drop(up);

    // A corrupt store path: permanent, on the local side.
    let bad = build(
        &fleet,
        &trivial_drv(&nonce(), "intact"),
        &LOCAL_ONLY,
        "to be corrupted",
    );
    let file = fleet.client.nix_path(&bad[0]);
    let intact = std::fs::read(&file).expect("read output");
    std::fs::write(&file, b"tampered\n").expect("corrupt the output");
    ferry.drain(&fleet);
    let status = ferry.status(&fleet);
    assert!(
        status.contains("queued jobs: 0 (0 retrying), dead letters: 1")
            && status
                .lines()
                .any(|l| l.starts_with(&format!("  {}: dead since ", bad[0]))
                    && l.contains("(local)")
                    && l.contains("NAR hash")),
        "{status}"
    );
    assert!(
        missing_narinfos(&ferry.file_cache, &bad).len() == 1,
        "a corrupt NAR was uploaded"
    );
    std::fs::write(&file, &intact).expect("restore the output");
    let mut r = ferry.command(&fleet.client, &["retry", &bad[0]]);
    run(&mut r).expect("retry");
    ferry.drain(&fleet);
    assert!(
        missing_narinfos(&ferry.file_cache, &bad).is_empty(),
        "{}",
        ferry.status(&fleet)
    );
    assert!(ferry.status(&fleet).contains(QUEUE_DONE));
}

/// The hook never fails a build: a broken config, an unwritable spool or garbage in the
/// environment all end in exit 0 with a message on stderr.
#[test]
fn hook_exits_zero_on_every_problem() {
    let dir = tempfile::tempdir().expect("dir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[post-build]\ntargetz = []\n").expect("write");
    let unwritable = dir.path().join("state-is-a-file");
    std::fs::write(&unwritable, "").expect("write");
    let ok = dir.path().join("ok.toml");
    std::fs::write(
        &ok,
        format!(
            "[post-build]\nstate-dir = \"{}\"\ngc-roots = false\n",
            unwritable.display()
        ),
    )
    .expect("write");
    for (config, env, expect) in [
        (&bad, vec![("OUT_PATHS", "/nix/store/aaaa-x")], "targetz"),
        (&ok, vec![("OUT_PATHS", "/nix/store/aaaa-x")], "NOT queued"),
        (&ok, vec![("DRV_PATH", "/nonexistent/x.drv")], "NOT queued"),
        (&ok, vec![], "nothing to upload"),
    ] {
        let out = Command::new(ferry_bin("ferry-post-build"))
            .env_remove("OUT_PATHS")
            .env_remove("DRV_PATH")
            .env("FERRY_CONFIG", config)
            .envs(env)
            .stdin(Stdio::null())
            .output()
            .expect("hook");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}: {stderr}", out.status);
        assert!(stderr.contains(expect), "wanted {expect:?} in {stderr:?}");
    }
}

/// `keygen` writes a 0600 Nix secret key and prints the public key; `check-config` names a
/// typo's file and line and accepts a good config.
#[test]
fn keygen_and_check_config() {
    let check_config = |conf: &Path| {
        Command::new(ferry_bin("ferry-post-build"))
            .args(["check-config", "--config"])
            .arg(conf)
            .output()
            .expect("check-config")
    };
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("dir");
    let sec = dir.path().join("k.sec");
    let out = Command::new(ferry_bin("ferry-post-build"))
        .args(["keygen", "my-cache-1", "--secret-file"])
        .arg(&sec)
        .output()
        .expect("keygen");
    check(&out, "keygen").unwrap_or_else(|e| panic!("{e}"));
    let public = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        public.starts_with("my-cache-1:") && public.len() == "my-cache-1:".len() + 44,
        "{public}"
    );
    let mode = std::fs::metadata(&sec).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&sec).expect("read");
    assert!(
        text.starts_with("my-cache-1:") && !text.ends_with('\n'),
        "{text:?}"
    );
    // Nix accepts the key: it converts it to the same public key.
    let mut c = Command::new("nix");
    c.args([
        "--extra-experimental-features",
        "nix-command",
        "key",
        "convert-secret-to-public",
    ])
    .stdin(std::fs::File::open(&sec).expect("open"));
    let nix_public = String::from_utf8_lossy(&c.output().expect("nix key").stdout)
        .trim()
        .to_owned();
    assert_eq!(nix_public, public);
    // Never overwrites a key.
    let again = Command::new(ferry_bin("ferry-post-build"))
        .args(["keygen", "my-cache-1", "--secret-file"])
        .arg(&sec)
        .output()
        .expect("keygen");
    assert!(!again.status.success());

    let conf = dir.path().join("ferry.toml");
    std::fs::write(
        &conf,
        format!(
            "[post-build]\ntargets = [\"file:///tmp/x\"]\nsecret-key-files = [\"{}\"]\n",
            sec.display()
        ),
    )
    .expect("write");
    let out = check_config(&conf);
    check(&out, "check-config").unwrap_or_else(|e| panic!("{e}"));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&public));
    std::fs::write(&conf, "[post-build]\ntargets = [\"ftp://x\"]\n").expect("write");
    let out = check_config(&conf);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ftp://x"));
    std::fs::write(&conf, "[post-build]\n\nconcurency = 2\n").expect("write");
    let out = check_config(&conf);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 3"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
