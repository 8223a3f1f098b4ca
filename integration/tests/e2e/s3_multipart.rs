//! Large NARs to `s3://` targets as multipart uploads, on a real S3 server (moto, checking
//! every SigV4 signature and part MD5), with the uploader killed mid-upload.
//!
//! These tests need root (network and mount namespaces) and moto (dev/setup).

use ferry_integration::support::post_build as post_build_support;

use ferry_integration::{Fleet, check, out_paths, run};
use post_build_support::*;
use std::process::Command;
use std::time::Duration;

/// Lists the bucket's unfinished multipart uploads and the object's ETag (boto3, signed).
const MOTO_INSPECT: &str = r#"
import sys, boto3
endpoint, bucket, key_id, secret, key = sys.argv[1:6]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key_id, aws_secret_access_key=secret)
ups = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
head = s3.head_object(Bucket=bucket, Key=key)
print(len(ups), head["ETag"].strip('"'), head["ContentLength"])
"#;

/// A 96 MiB output goes to moto in 5 MiB parts over a link shaped to 100 Mbit/s. The
/// uploader is SIGKILLed once some parts are recorded; `status` still shows the upload; a
/// restarted uploader resumes it (it uploads only the missing parts), completes it with
/// the right multipart ETag, leaves no unfinished upload in the bucket, and a second host
/// with `require-sigs` substitutes the path.
#[test]
fn multipart_upload_resumes_after_sigkill_and_substitutes() {
    let Some(python) = moto_or_skip("multipart_upload_resumes_after_sigkill_and_substitutes")
    else {
        return;
    };
    let ferry = Ferry::new();
    let mut fleet = ferry.fleet(0);
    let bucket = "ferry-big";
    let MotoBucket {
        endpoint,
        key_id,
        secret,
    } = start_moto_bucket(&mut fleet, &python, bucket, BucketAccess::Public, None);
    let (id_file, secret_file) = write_s3_key_files(ferry.dir.path(), &key_id, &secret);
    let s3_url = format!("s3://{bucket}?endpoint={endpoint}&region=us-east-1&compression=none");
    ferry.write_config_with(
        std::slice::from_ref(&s3_url),
        &format!(
            "{}multipart-threshold-mib = 8
multipart-part-mib = 5
multipart-parallel = 2
",
            s3_key_files_toml(&id_file, &secret_file)
        ),
    );
    let out = fleet.nix_build(&random_blob(96, "mp"), &LOCAL_ONLY);
    check(&out, "96 MiB blob").unwrap_or_else(|e| panic!("{e}\n{}", fleet.daemon_log()));
    let blob = out_paths(&out).remove(0);

    shape_towards(&fleet, "s3", Some("100mbit"));
    let mut up = ferry.start_uploader(&fleet);
    let mut seen = (0, 0);
    wait_for("some parts recorded", Duration::from_secs(60), || {
        seen = multipart_progress(&ferry.status(&fleet)).unwrap_or((0, 0));
        seen.0 >= 3
    });
    up.kill().expect("SIGKILL the uploader");
    let _ = up.wait();
    assert_eq!(seen.1, 20, "96 MiB in 5 MiB parts: {seen:?}");
    let status = ferry.status(&fleet);
    let after_kill = multipart_progress(&status).expect("the upload is still recorded");
    assert!(after_kill.0 >= 3 && after_kill.0 < 20, "{status}");

    shape_towards(&fleet, "s3", None);
    let up = ferry.start_uploader(&fleet);
    ferry.wait_queue_done(&fleet, "the blob uploaded", Duration::from_secs(120));
    drop(up);
    let log = ferry.uploader_log();
    let resumed = log
        .lines()
        .find(|l| l.contains("resuming a multipart upload"))
        .unwrap_or_else(|| panic!("no resume in the log:\n{log}"));
    assert!(
        resumed.contains(&format!("done={}", after_kill.0)),
        "resumed with other parts than recorded ({after_kill:?}): {resumed}"
    );
    assert!(log.contains("multipart upload complete"), "{log}");
    let status = ferry.status(&fleet);
    assert!(multipart_progress(&status).is_none(), "{status}");

    // The bucket: no unfinished upload, the object assembled from 20 parts.
    let narinfo = read_narinfo(&ferry.file_cache, &blob);
    let nar_size: u64 = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("NarSize: "))
        .and_then(|s| s.parse().ok())
        .expect("NarSize");

    moto_allow_anonymous(fleet.host("s3"), &python, &endpoint);
    let cache = format!("{endpoint}/{bucket}");
    let s3_narinfo = fetch_text(&fleet, &format!("{cache}/{}.narinfo", hash_part(&blob)));
    let nar_key = s3_narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .expect("URL in the S3 narinfo")
        .to_owned();
    assert!(s3_narinfo.contains("Compression: none"), "{s3_narinfo}");
    let mut c = fleet.host("s3").command(&python.to_string_lossy());
    c.args([
        "-c",
        MOTO_INSPECT,
        &endpoint,
        bucket,
        &key_id,
        &secret,
        &nar_key,
    ]);
    let out = run(&mut c).expect("inspect the bucket");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let f: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(
        f.first(),
        Some(&"0"),
        "unfinished uploads left in the bucket: {text}"
    );
    assert!(
        f.get(1).is_some_and(|e| e.ends_with("-20")),
        "not a 20-part object: {text}"
    );
    assert_eq!(
        f.get(2).and_then(|s| s.parse::<u64>().ok()),
        Some(nar_size),
        "{text}"
    );

    add_substituting_client(&mut fleet, "client2", &cache, &ferry.public_key);
    let blob = [blob];
    realise_on(
        fleet.host("client2"),
        &blob,
        &blob,
        "client2 substitutes the blob from the bucket",
    );
}

/// GET of a small text file from the client's network namespace (this machine's curl).
fn fetch_text(fleet: &Fleet, url: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &fleet.client.netns, "curl", "-fsS", url])
        .output()
        .expect("curl");
    check(&out, &format!("GET {url}")).unwrap_or_else(|e| panic!("{e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
