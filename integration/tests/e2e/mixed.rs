//! Fleets whose hosts run different Nix versions, as real home labs do: a laptop that follows
//! the latest Nix offloading to a desktop that lags behind, and the reverse; a cache written
//! by one version's uploader substituted by another version's client.
//!
//! The versions are pinned by each test (the first and the last of `integration/nix-versions`),
//! so these run once, in the pass for this machine's own Nix (`dev/test` runs one pass per
//! version); a pass for another version skips them and says so.

use ferry_integration::{Fleet, FleetConfig, Nix, chain_drv, check, ferry_bin, nonce, out_paths};

/// The oldest and the newest Nix of the matrix, or `None` (with a note) outside the pass for
/// this machine's own Nix.
fn oldest_and_newest() -> Option<(Nix, Nix)> {
    if Nix::under_test() != Nix::native() {
        eprintln!(
            "mixed-version fleets run in the pass for {} only",
            Nix::native()
        );
        return None;
    }
    let all = Nix::all();
    Some((all.first()?.clone(), all.last()?.clone()))
}

fn stdout_of(mut c: std::process::Command, what: &str) -> String {
    let out = c.output().expect(what);
    check(&out, what).unwrap_or_else(|e| panic!("{e}"));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A two-level closure built through Ferry's hook from a `client` Nix on a `builder` Nix: the
/// inputs go over, the output comes back valid with its references and the same NAR hash.
fn chain_through_ferry(client: Nix, builder: Nix) {
    let fleet = Fleet::start(FleetConfig {
        builders: 1,
        client_conf: format!("build-hook = {}", ferry_bin("ferry-build-hook").display()),
        client_nix: Some(client.clone()),
        builder_nix: Some(builder.clone()),
        ..Default::default()
    })
    .expect("fleet");
    assert_eq!(fleet.client.nix, client);
    assert_eq!(fleet.builders[0].nix, builder);
    let out = fleet.nix_build(&chain_drv(&nonce()), &["-j0"]);
    check(
        &out,
        &format!("{client} client, {builder} builder: nix-build"),
    )
    .unwrap_or_else(|e| panic!("{e}\ndaemon log:\n{}", fleet.daemon_log()));
    let top = out_paths(&out).pop().expect("an output");
    assert!(
        fleet.builders[0].has_store_path(&top),
        "{top} not built on b0"
    );
    let mut q = fleet.client_command("nix-store");
    q.args(["-q", "--hash", &top]);
    let here = stdout_of(q, "client nix-store -q --hash");
    let mut q = fleet.builders[0].command("nix-store");
    q.args(["-q", "--hash", &top]);
    let there = stdout_of(q, "builder nix-store -q --hash");
    assert_eq!(here, there, "NAR hash differs between client and builder");
    let mut q = fleet.client_command("nix-store");
    q.args(["-q", "--references", &top]);
    let refs = stdout_of(q, "client references");
    assert!(refs.contains("-ferry-mid-"), "references: {refs}");
    let mut v = fleet.client_command("nix-store");
    v.args(["--verify-path", &top]);
    stdout_of(v, "nix-store --verify-path on the client");
}

#[test]
fn newest_client_offloads_to_oldest_builder() {
    let Some((old, new)) = oldest_and_newest() else {
        return;
    };
    chain_through_ferry(new, old);
}

#[test]
fn oldest_client_offloads_to_newest_builder() {
    let Some((old, new)) = oldest_and_newest() else {
        return;
    };
    chain_through_ferry(old, new);
}

use ferry_integration::support::post_build as post_build_support;

/// Outputs built and uploaded by `ferry-post-build` on a `writer` Nix, substituted with
/// `require-sigs` by a client on a `reader` Nix from the `file://` cache, and verified by it.
fn cache_across_versions(writer: Nix, reader: Nix) {
    use post_build_support::{
        Ferry, LOCAL_ONLY, closure, realise_and_verify, substitute_only_from, wait_uploaded,
    };
    let ferry = Ferry::new();
    let mut fleet = Fleet::start(FleetConfig {
        client_nix: Some(writer.clone()),
        builder_nix: Some(writer.clone()),
        ..ferry.fleet_config(1)
    })
    .expect("fleet");
    let mut uploader = ferry.start_uploader(&fleet);
    // One output built locally, one remotely through Ferry's hook: both are uploaded.
    let local = fleet.nix_build(&chain_drv(&nonce()), &LOCAL_ONLY);
    check(&local, "local build").unwrap_or_else(|e| panic!("{e}"));
    let remote = fleet.nix_build(&chain_drv(&nonce()), &["-j0"]);
    check(&remote, "remote build")
        .unwrap_or_else(|e| panic!("{e}\ndaemon log:\n{}", fleet.daemon_log()));
    let outputs: Vec<String> = out_paths(&local)
        .into_iter()
        .chain(out_paths(&remote))
        .collect();
    let expected = closure(&fleet, &outputs);
    wait_uploaded(
        "every path uploaded",
        std::time::Duration::from_secs(60),
        &[&ferry.file_cache],
        &expected,
    );
    let _ = uploader.kill();
    let _ = uploader.wait();

    let reader_host = fleet.add_host_with("reader", &reader).expect("reader host");
    substitute_only_from(
        reader_host,
        &format!("file://{}", ferry.file_cache.display()),
        &ferry.public_key,
    );
    realise_and_verify(
        fleet.host("reader"),
        &outputs,
        &expected,
        &format!("{reader} substitutes what {writer} uploaded"),
    );
}

#[test]
fn cache_written_on_oldest_nix_is_substituted_by_newest() {
    let Some((old, new)) = oldest_and_newest() else {
        return;
    };
    cache_across_versions(old, new);
}

#[test]
fn cache_written_on_newest_nix_is_substituted_by_oldest() {
    let Some((old, new)) = oldest_and_newest() else {
        return;
    };
    cache_across_versions(new, old);
}
