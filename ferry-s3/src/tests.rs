use super::*;

// Expected signatures are the ones AWS publishes (SigV4 test suite: get-vanilla,
// post-vanilla, get-vanilla-query-order-key-case; S3 developer guide: "Example: GET
// Object", "Example: PUT Object"), each cross-checked by computing the same request
// with botocore's `SigV4Auth`/`S3SigV4Auth` (an independent implementation).
fn suite_creds() -> Credentials {
    Credentials {
        access_key_id: "AKIDEXAMPLE".into(),
        secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
        session_token: None,
    }
}
fn s3_doc_creds() -> Credentials {
    Credentials {
        access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
        secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
        session_token: None,
    }
}
const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn suite(method: &str, query: &[(&str, &str)]) -> Signed {
    let headers = [
        ("Host", "example.amazonaws.com"),
        ("X-Amz-Date", "20150830T123600Z"),
    ];
    sign(
        &SignRequest {
            method,
            canonical_uri: "/",
            query,
            headers: &headers,
            payload_sha256: EMPTY,
        },
        &suite_creds(),
        "20150830T123600Z",
        "us-east-1",
        "service",
    )
}

#[test]
fn sigv4_test_suite_vanilla() {
    let s = suite("GET", &[]);
    assert_eq!(
        s.canonical_request,
        format!(
            "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\n{EMPTY}"
        )
    );
    assert_eq!(
        s.string_to_sign,
        "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n\
             bb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63"
    );
    assert_eq!(
        s.authorization,
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
    );
    assert_eq!(
        suite("POST", &[]).signature,
        "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"
    );
    let q = suite("GET", &[("Param2", "value2"), ("Param1", "value1")]);
    assert!(
        q.canonical_request
            .contains("\nParam1=value1&Param2=value2\n")
    );
    assert_eq!(
        q.signature,
        "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"
    );
}

#[test]
fn s3_developer_guide_examples() {
    let get = sign(
        &SignRequest {
            method: "GET",
            canonical_uri: "/test.txt",
            query: &[],
            headers: &[
                ("Host", "examplebucket.s3.amazonaws.com"),
                ("Range", "bytes=0-9"),
                ("x-amz-content-sha256", EMPTY),
                ("x-amz-date", "20130524T000000Z"),
            ],
            payload_sha256: EMPTY,
        },
        &s3_doc_creds(),
        "20130524T000000Z",
        "us-east-1",
        "s3",
    );
    assert_eq!(
        get.signature,
        "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    );
    let body_hash = sha256_hex(b"Welcome to Amazon S3.");
    assert_eq!(
        body_hash,
        "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072"
    );
    let path = format!("/{}", uri_encode("test$file.text", false));
    assert_eq!(path, "/test%24file.text");
    let put = sign(
        &SignRequest {
            method: "PUT",
            canonical_uri: &path,
            query: &[],
            headers: &[
                ("Host", "examplebucket.s3.amazonaws.com"),
                ("Date", "Fri, 24 May 2013 00:00:00 GMT"),
                ("x-amz-date", "20130524T000000Z"),
                ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
                ("x-amz-content-sha256", &body_hash),
            ],
            payload_sha256: &body_hash,
        },
        &s3_doc_creds(),
        "20130524T000000Z",
        "us-east-1",
        "s3",
    );
    assert_eq!(
        put.signature,
        "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"
    );
}

/// A request shaped like Ferry's (path-style, a port, a key needing encoding), signed by
/// `s3_headers`; expected value computed with botocore's `S3SigV4Auth`.
#[test]
fn ferry_shaped_request_matches_botocore() {
    let params = vec![
        ("endpoint".to_owned(), "http://10.0.0.5:5000".to_owned()),
        ("region".to_owned(), "eu-west-1".to_owned()),
    ];
    let loc = S3Location::new("s3://ferry-bucket", "ferry-bucket", &params).expect("loc");
    let path = loc.object_path("nar/a bé.nar.zst");
    assert_eq!(path, "/ferry-bucket/nar/a%20b%C3%A9.nar.zst");
    let t = UNIX_EPOCH + std::time::Duration::from_secs(1_369_353_600); // 2013-05-24T00:00:00Z
    let sha = sha256_hex(b"abc");
    let h = s3_headers(
        &loc,
        &s3_doc_creds(),
        &S3Request {
            method: "PUT",
            path: &path,
            query: &[],
            content_type: Some("application/x-nix-nar"),
            content_md5: None,
            payload_sha256: &sha,
        },
        t,
    );
    let auth = &h
        .iter()
        .find(|(k, _)| *k == "authorization")
        .expect("auth")
        .1;
    assert_eq!(
        auth,
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/eu-west-1/s3/aws4_request, \
             SignedHeaders=content-type;host;x-amz-content-sha256;x-amz-date, \
             Signature=58381978702dadb8248a3d27d8554e7ab1203c2505ec20d56cd907c8b2eead25"
    );
}

#[test]
fn dates() {
    assert_eq!(amz_date(UNIX_EPOCH), "19700101T000000Z");
    assert_eq!(
        amz_date(UNIX_EPOCH + std::time::Duration::from_secs(1_440_938_160)),
        "20150830T123600Z"
    );
    // A leap day and the end of a century year.
    assert_eq!(
        amz_date(UNIX_EPOCH + std::time::Duration::from_secs(951_782_400)),
        "20000229T000000Z"
    );
    assert_eq!(
        amz_date(UNIX_EPOCH + std::time::Duration::from_secs(4_107_542_399)),
        "21000228T235959Z"
    );
}

#[test]
fn locations() {
    let p = |kv: &[(&str, &str)]| {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
    };
    let l = S3Location::new("u", "my-bucket", &p(&[])).expect("aws");
    assert_eq!(l.base, "https://my-bucket.s3.us-east-1.amazonaws.com");
    assert_eq!(l.object_path("x.narinfo"), "/x.narinfo");
    assert!(!l.path_style);
    let l = S3Location::new("u", "my.bucket", &p(&[("region", "eu-west-1")])).expect("dots");
    assert_eq!(
        (l.base.as_str(), l.object_path("k").as_str()),
        ("https://s3.eu-west-1.amazonaws.com", "/my.bucket/k")
    );
    let l = S3Location::new(
        "u",
        "b12",
        &p(&[("endpoint", "minio:9000"), ("scheme", "http")]),
    )
    .expect("minio");
    assert_eq!(
        (l.base.as_str(), l.host.as_str()),
        ("http://minio:9000", "minio:9000")
    );
    assert_eq!(l.object_path("nar/x.nar.xz"), "/b12/nar/x.nar.xz");
    let l = S3Location::new("u", "b12", &p(&[("endpoint", "http://h:80/")])).expect("default port");
    assert_eq!((l.base.as_str(), l.host.as_str()), ("http://h", "h"));
    let l =
        S3Location::new("u", "b12", &p(&[("endpoint", "h"), ("profile", "ci")])).expect("https");
    assert_eq!(
        (l.base.as_str(), l.profile.as_deref()),
        ("https://h", Some("ci"))
    );
    assert!(S3Location::new("u", "", &p(&[])).is_err());
    assert!(S3Location::new("u", "Upper", &p(&[])).is_err());
    assert!(S3Location::new("u", "b12", &p(&[("scheme", "ftp")])).is_err());
    assert!(S3Location::new("u", "b12", &p(&[("endpoint", "http://h/x")])).is_err());
}

#[test]
fn credentials_order_and_secrecy() {
    let d = tempfile::tempdir().expect("dir");
    let id = d.path().join("id");
    let secret = d.path().join("secret");
    std::fs::write(&id, "AKIAFILE\n").expect("w");
    std::fs::write(&secret, "file-secret\n").expect("w");
    let shared = d.path().join("credentials");
    std::fs::write(
            &shared,
            "# comment\n[default]\naws_access_key_id = AKIADEFAULT\naws_secret_access_key = dsecret\n\
             [ci]\naws_access_key_id=AKIACI\naws_secret_access_key=cisecret\naws_session_token = tok\n",
        )
        .expect("w");
    let shared_s = shared.display().to_string();
    let env_with = |vars: Vec<(&'static str, String)>| {
        move |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    };
    let env_none = env_with(vec![("AWS_SHARED_CREDENTIALS_FILE", shared_s.clone())]);
    let env_keys = env_with(vec![
        ("AWS_SHARED_CREDENTIALS_FILE", shared_s.clone()),
        ("AWS_ACCESS_KEY_ID", "AKIAENV".into()),
        ("AWS_SECRET_ACCESS_KEY", "envsecret".into()),
    ]);
    let files = CredentialSources {
        access_key_id_file: Some(&id),
        secret_access_key_file: Some(&secret),
        env: &env_keys,
    };
    let c = resolve_credentials(&files, Some("ci")).expect("files");
    assert_eq!(
        (c.access_key_id.as_str(), c.secret_access_key.as_str()),
        ("AKIAFILE", "file-secret")
    );
    let dbg = format!("{c:?}");
    assert!(
        dbg.contains("AKIAFILE") && !dbg.contains("file-secret"),
        "{dbg}"
    );
    let env_src = CredentialSources {
        access_key_id_file: None,
        secret_access_key_file: None,
        env: &env_keys,
    };
    assert_eq!(
        resolve_credentials(&env_src, None)
            .expect("env")
            .access_key_id,
        "AKIAENV"
    );
    let c = resolve_credentials(&env_src, Some("ci")).expect("profile");
    assert_eq!(
        (c.access_key_id.as_str(), c.session_token.as_deref()),
        ("AKIACI", Some("tok"))
    );
    assert!(matches!(
        resolve_credentials(&env_src, Some("nope")),
        Err(CredentialsError::NoProfile { .. })
    ));
    let shared_src = CredentialSources {
        access_key_id_file: None,
        secret_access_key_file: None,
        env: &env_none,
    };
    assert_eq!(
        resolve_credentials(&shared_src, None)
            .expect("default")
            .access_key_id,
        "AKIADEFAULT"
    );
    let half = CredentialSources {
        access_key_id_file: Some(&id),
        secret_access_key_file: None,
        env: &env_none,
    };
    assert!(matches!(
        resolve_credentials(&half, None),
        Err(CredentialsError::Half)
    ));
    let nothing = env_with(vec![(
        "HOME",
        d.path().join("nohome").display().to_string(),
    )]);
    let none = CredentialSources {
        access_key_id_file: None,
        secret_access_key_file: None,
        env: &nothing,
    };
    assert!(matches!(
        resolve_credentials(&none, None),
        Err(CredentialsError::None(_))
    ));
    // A missing secret file is named; its would-be contents never appear.
    let missing = CredentialSources {
        access_key_id_file: Some(&id),
        secret_access_key_file: Some(&d.path().join("gone")),
        env: &env_none,
    };
    let e = resolve_credentials(&missing, None).expect_err("missing");
    assert!(e.to_string().contains("gone"), "{e}");
}

#[test]
fn error_codes() {
    let body = "<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code><Message>x</Message></Error>";
    assert_eq!(error_code(body).as_deref(), Some("SignatureDoesNotMatch"));
    assert_eq!(error_code("<html>"), None);
}
