use super::*;

#[test]
fn a_work_file_is_linked_into_a_file_target_and_outlives_its_work_name() {
    let d = tempfile::tempdir().expect("dir");
    let src = d.path().join("work.nar");
    std::fs::write(&src, b"nar bytes").expect("w");
    let cache = d.path().join("cache");
    std::fs::create_dir_all(&cache).expect("cache");
    file_put_from(&cache, "nar/x.nar", &src).expect("put");
    std::fs::remove_file(&src).expect("rm work file");
    let dest = cache.join("nar/x.nar");
    assert_eq!(std::fs::read(&dest).expect("read"), b"nar bytes");
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let m = std::fs::metadata(&dest).expect("meta");
    assert_eq!(m.permissions().mode() & 0o777, 0o644);
    assert_eq!(m.nlink(), 1, "only the cache's name is left");
    // Nothing stays in the staging directory.
    assert_eq!(
        std::fs::read_dir(cache.join(FILE_TMP_DIR))
            .expect("tmp")
            .count(),
        0
    );
}

#[test]
fn keys_follow_nix() {
    let sp = StorePath::from_base_name("7hmcr4m0qxnr5yb9mr37k2bw4ylp7wjc-hello-2.12").expect("sp");
    assert_eq!(narinfo_key(&sp), "7hmcr4m0qxnr5yb9mr37k2bw4ylp7wjc.narinfo");
    let h = Hash::sha256_of(b"");
    assert_eq!(
        nar_key(&h, Compression::Zstd),
        "nar/0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73.nar.zst"
    );
    assert_eq!(
        nar_key(&h, Compression::None),
        "nar/0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73.nar"
    );
}

#[test]
fn urls() {
    let loc = |u: &str| parse_url(u).expect(u).location;
    assert_eq!(loc("file:///var/c/"), TargetUrl::File("/var/c".into()));
    assert_eq!(
        loc("http://10.0.0.1:8080/up/"),
        TargetUrl::Http("http://10.0.0.1:8080/up".into())
    );
    let p = parse_url("file:///c?compression=none").expect("param");
    assert_eq!(
        (p.location, p.compression),
        (TargetUrl::File("/c".into()), Some(Compression::None))
    );
    assert_eq!(parse_url("http://h/x").expect("h").compression, None);
    let p = parse_url(
        "s3://my-cache?endpoint=http%3A%2F%2F10.0.0.2%3A5000&region=eu-west-1&compression=zstd",
    )
    .expect("s3");
    let TargetUrl::S3(s3) = p.location else {
        panic!("not s3")
    };
    assert_eq!(
        (s3.bucket.as_str(), s3.region.as_str()),
        ("my-cache", "eu-west-1")
    );
    assert_eq!(
        (s3.base.as_str(), s3.path_style),
        ("http://10.0.0.2:5000", true)
    );
    for bad in [
        "file://rel",
        "file:///",
        // Found by fuzzing: the empty path, i.e. the uploader's working directory.
        "file:////",
        "file://///",
        "s4://x",
        "http://",
        "",
        "file:///c?compression=lz5",
        "file:///c?endpoint=x",
        "http://h?region=x",
        "s3://b?endpiont=http://h",
        "s3://?region=x",
        "s3://B?region=x",
        "s3://bucket?scheme=ftp",
    ] {
        assert!(parse_url(bad).is_err(), "{bad}");
    }
    let e = parse_url("s3://bucket?endpiont=x")
        .expect_err("typo")
        .to_string();
    assert!(
        e.contains("endpiont") && e.contains("endpoint, region"),
        "{e}"
    );
}

/// Options whose S3 credentials are files in `dir`: key id `AKIATEST`, secret
/// `very-secret-value`.
fn s3_options(dir: &Path) -> TargetOptions {
    let (id, secret) = (dir.join("id"), dir.join("secret"));
    std::fs::write(&id, "AKIATEST\n").expect("w");
    std::fs::write(&secret, "very-secret-value\n").expect("w");
    TargetOptions {
        access_key_id_file: Some(id),
        secret_access_key_file: Some(secret),
        ..Default::default()
    }
}

#[test]
fn s3_targets_need_credentials_and_never_show_the_secret() {
    let d = tempfile::tempdir().expect("dir");
    let opts = s3_options(d.path());
    let t = Target::new(
        "s3://bucket?endpoint=http://127.0.0.1:1&compression=none",
        &opts,
    )
    .expect("s3");
    assert_eq!(t.s3_access_key_id(), Some("AKIATEST"));
    assert_eq!(t.compression, Compression::None);
    let opts = TargetOptions {
        access_key_id_file: Some(d.path().join("id")),
        secret_access_key_file: Some(d.path().join("missing")),
        ..Default::default()
    };
    let e = Target::new("s3://bucket", &opts)
        .err()
        .expect("missing file")
        .to_string();
    assert!(e.contains("missing") && !e.contains("AKIATEST"), "{e}");
}

#[tokio::test]
async fn file_target_writes_atomically() {
    let d = tempfile::tempdir().expect("dir");
    let url = format!("file://{}", d.path().display());
    let t = Target::new(&url, &TargetOptions::default()).expect("target");
    let sd = StoreDir::new("/nix/store").expect("sd");
    t.init(&sd).await.expect("init");
    assert_eq!(
        std::fs::read_to_string(d.path().join(CACHE_INFO)).expect("ci"),
        "StoreDir: /nix/store\n"
    );
    t.init(&sd).await.expect("init again");
    let other = StoreDir::new("/other").expect("sd");
    assert!(matches!(
        t.init(&other).await,
        Err(TargetError::StoreDirMismatch { .. })
    ));
    assert!(!t.exists("nar/x.nar").await.expect("exists"));
    t.put_bytes("nar/x.nar", b"abc".to_vec(), NAR_TYPE)
        .await
        .expect("put");
    assert!(t.exists("nar/x.nar").await.expect("exists"));
    assert_eq!(
        std::fs::read(d.path().join("nar/x.nar")).expect("read"),
        b"abc"
    );
    assert_eq!(
        std::fs::read_dir(d.path().join(FILE_TMP_DIR))
            .expect("tmp")
            .count(),
        0
    );
}

/// `create_bucket` goes through the one signed request path: `PUT /<bucket>` with the
/// region's CreateBucketConfiguration, its payload hash and a SigV4 `Authorization`.
#[tokio::test]
async fn create_bucket_sends_a_signed_put_of_the_bucket() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.expect("accept");
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        // Head and body: the body ends with the configuration's closing tag.
        while !req.ends_with(b"</CreateBucketConfiguration>") {
            let n = conn.read(&mut buf).await.expect("read");
            assert!(n > 0, "eof: {}", String::from_utf8_lossy(&req));
            req.extend_from_slice(&buf[..n]);
        }
        conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .expect("write");
        String::from_utf8(req).expect("utf-8")
    });
    let d = tempfile::tempdir().expect("dir");
    let opts = s3_options(d.path());
    let t = Target::new(
        &format!("s3://my-cache?endpoint=http://127.0.0.1:{port}&region=eu-west-1"),
        &opts,
    )
    .expect("s3");
    t.create_bucket().await.expect("create");
    let req = server.await.expect("server");
    let lower = req.to_ascii_lowercase();
    let body = &req[req.find("\r\n\r\n").expect("head") + 4..];
    assert!(req.starts_with("PUT /my-cache HTTP/1.1\r\n"), "{req}");
    assert!(
        body.contains("<LocationConstraint>eu-west-1</LocationConstraint>"),
        "{req}"
    );
    let sha = crate::s3::sha256_hex(body.as_bytes());
    assert!(
        lower.contains(&format!("x-amz-content-sha256: {sha}\r\n")),
        "{req}"
    );
    assert!(
        lower.contains("authorization: aws4-hmac-sha256 credential=akiatest/"),
        "{req}"
    );
    assert!(!req.contains("very-secret-value"), "{req}");
}

/// Issue 12 item 7: errors name a target without its credentials.
#[test]
fn errors_and_display_hide_credentials() {
    let Err(e) = parse_url("gopher://u:hunter2@h/x") else {
        panic!("a bad scheme parsed")
    };
    assert!(!e.to_string().contains("hunter2"), "{e}");
    let t = Target::new(
        "https://u:hunter2@cache.example/up",
        &TargetOptions::default(),
    )
    .expect("target");
    assert_eq!(t.shown(), "https://***@cache.example/up");
}

/// A server that answers every request with `status` and a body that never ends (`prefix`
/// first, then filler): memory must stay bounded whatever a cache sends.
async fn endless_server(status: &'static str, prefix: &'static str) -> u16 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                let head_end = loop {
                    if let Some(i) = req.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&req[..head_end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while req.len() < head_end + len {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let first = format!(
                    "HTTP/1.1 {status}\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{prefix}\r\n",
                    prefix.len()
                );
                if conn.write_all(first.as_bytes()).await.is_err() {
                    return;
                }
                let filler = format!("{:x}\r\n{}\r\n", 65536, "x".repeat(65536));
                while conn.write_all(filler.as_bytes()).await.is_ok() {}
            });
        }
    });
    port
}

/// A cache whose `nix-cache-info` never ends is an error naming the bound, not a hang or a
/// growing buffer; an S3 refusal with an endless error document still yields its code.
#[tokio::test]
async fn endless_answers_are_read_only_up_to_a_bound() {
    let port = endless_server("200 OK", "StoreDir: /nix/store\n").await;
    let t = Target::new(
        &format!("http://127.0.0.1:{port}/cache"),
        &TargetOptions::default(),
    )
    .expect("http");
    let store = StoreDir::new("/nix/store").expect("store dir");
    let e = tokio::time::timeout(Duration::from_secs(20), t.init(&store))
        .await
        .expect("init returned")
        .expect_err("an endless nix-cache-info was accepted");
    assert!(
        e.to_string().contains("answer larger than 65536 bytes"),
        "{e}"
    );

    let port = endless_server(
        "403 Forbidden",
        "<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code>",
    )
    .await;
    let d = tempfile::tempdir().expect("dir");
    let t = Target::new(
        &format!("s3://my-cache?endpoint=http://127.0.0.1:{port}&region=eu-west-1"),
        &s3_options(d.path()),
    )
    .expect("s3");
    let e = tokio::time::timeout(
        Duration::from_secs(20),
        t.put_bytes("x.narinfo", b"x".to_vec(), NARINFO_TYPE),
    )
    .await
    .expect("put returned")
    .expect_err("a refused PUT succeeded");
    assert!(e.to_string().contains("(SignatureDoesNotMatch)"), "{e}");
}
