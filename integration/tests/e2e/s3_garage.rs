//! A 3-node Garage cluster (a real distributed S3 store, replication factor 3) as the fleet's
//! shared cache: the client's uploader sends a large NAR as a multipart upload through one
//! node while another node is black-holed and the uploader is SIGKILLed mid-upload; a second
//! client then substitutes everything through `ferry-substituter` reading the private bucket
//! through a third node's S3 API, with signatures required.
//!
//! These tests need root (network and mount namespaces) and Garage (dev/garage).

use ferry_integration::support::post_build as post_build_support;

use ferry_integration::garage::Garage;
use ferry_integration::{chain_drv, check, nonce, out_paths};
use post_build_support::*;

use std::time::Duration;

#[test]
fn garage_cluster_multipart_survives_node_loss_and_kill_then_substitutes_through_ferry() {
    if !garage_or_skip(
        "garage_cluster_multipart_survives_node_loss_and_kill_then_substitutes_through_ferry",
    ) {
        return;
    }
    let ferry = Ferry::new();
    let mut fleet = ferry.fleet(0);
    let garage =
        Garage::start(&mut fleet, 3, "ferry-fleet").unwrap_or_else(|e| panic!("garage: {e:#}"));
    let (id_file, secret_file) = garage
        .credential_files(ferry.dir.path())
        .expect("key files");
    let target = garage.s3_url(0);
    ferry.write_config_with(
        std::slice::from_ref(&target),
        &format!(
            "{}multipart-threshold-mib = 8\nmultipart-part-mib = 5\nmultipart-parallel = 2\n",
            s3_key_files_toml(&id_file, &secret_file)
        ),
    );
    let out = fleet.nix_build(&random_blob(64, "garage"), &LOCAL_ONLY);
    check(&out, "64 MiB blob").unwrap_or_else(|e| panic!("{e}\n{}", fleet.daemon_log()));
    let blob = out_paths(&out).remove(0);
    let out = fleet.nix_build(&chain_drv(&nonce()), &LOCAL_ONLY);
    check(&out, "chain").unwrap_or_else(|e| panic!("{e}"));
    let chain = out_paths(&out).remove(0);
    let expected = closure(&fleet, &[blob.clone(), chain.clone()]);

    // 100 Mbit/s towards node 0: the 13 parts take a few seconds.
    shape_towards(&fleet, "garage0", Some("100mbit"));
    let mut up = ferry.start_uploader(&fleet);
    wait_for("two parts", Duration::from_secs(60), || {
        multipart_progress(&ferry.status(&fleet)).is_some_and(|(d, _)| d >= 2)
    });
    // Node 2 goes dark mid-upload: writes still reach a quorum (nodes 0 and 1).
    garage.blackhole(&fleet, 2).expect("black-hole garage2");
    let mut seen = (0, 0);
    wait_for(
        "more parts with a node down",
        Duration::from_secs(90),
        || {
            seen = multipart_progress(&ferry.status(&fleet)).unwrap_or((0, 0));
            seen.0 >= 5
        },
    );
    up.kill().expect("SIGKILL");
    let _ = up.wait();
    assert_eq!(seen.1, 13, "64 MiB in 5 MiB parts: {seen:?}");
    let at_kill = multipart_progress(&ferry.status(&fleet)).expect("still recorded after SIGKILL");
    assert!(at_kill.0 >= 5 && at_kill.0 < 13, "{at_kill:?}");

    shape_towards(&fleet, "garage0", None);
    let up = ferry.start_uploader(&fleet);
    ferry.wait_queue_done(&fleet, "everything uploaded", Duration::from_secs(120));
    drop(up);
    let log = ferry.uploader_log();
    assert!(
        log.lines()
            .any(|l| l.contains("resuming a multipart upload")
                && l.contains(&format!("done={}", at_kill.0))),
        "no resume from the recorded parts:\n{log}"
    );
    assert!(log.contains("multipart upload complete"), "{log}");
    let status = ferry.status(&fleet);
    assert!(target_succeeded(&status, &target), "{status}");

    // A second client substitutes through Ferry, which reads the private bucket through
    // node 1 (node 2 is still dark) with SigV4. Until Garage declares node 2 down, a read it
    // sends there first waits for Garage's RPC time-out (1 s here) before going to node 0:
    // the upstream's read time-out must be longer than that.
    let sub = add_client_behind_substituter(
        &mut fleet,
        "client2",
        &ferry.public_key,
        ferry.dir.path(),
        &s3_upstream_toml(
            &garage.s3_url(1),
            "read-timeout-ms = 4000\n",
            &id_file,
            &secret_file,
        ),
    );
    let client2 = fleet.host("client2");
    let out = realise(client2, [&blob, &chain]);
    let sub_text = sub.log_text();
    drop(sub);
    check(&out, "client2 substitutes through Ferry from Garage")
        .unwrap_or_else(|e| panic!("{e}\nsubstituter log:\n{sub_text}"));
    for p in &expected {
        assert!(client2.has_store_path(p), "{p} not substituted");
    }
    assert!(!sub_text.contains(&garage.secret), "the secret was logged");
}
