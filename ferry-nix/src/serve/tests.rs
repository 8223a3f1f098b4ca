use super::handshake::banner_text;
use super::*;
use crate::hash::HashAlgo;

#[test]
fn status_codes() {
    for (i, s) in STATUSES.iter().enumerate() {
        assert_eq!(BuildStatus::from_code(i as u64), *s);
        assert_eq!(s.code(), i as u64);
    }
    assert_eq!(BuildStatus::from_code(8), BuildStatus::TimedOut);
    assert_eq!(BuildStatus::from_code(99), BuildStatus::Unknown(99));
    assert_eq!(BuildStatus::Unknown(99).code(), 99);
    assert!(BuildStatus::Built.is_success());
    assert!(BuildStatus::ResolvesToAlreadyValid.is_success());
    assert!(!BuildStatus::PermanentFailure.is_success());
}

#[test]
fn banners() {
    assert_eq!(banner_text(b"Welcome!\n"), "Welcome!");
    let mut echoed = b"motd\n".to_vec();
    echoed.extend_from_slice(&SERVE_MAGIC_1.to_le_bytes());
    assert_eq!(
        banner_text(&echoed),
        "motd\n(then 8 bytes that are not text)"
    );
    assert_eq!(banner_text(&[0xff, 0, 1]), "3 bytes that are not text");
    assert_eq!(banner_text("naïve\tok".as_bytes()), "naïve\tok");
}

#[test]
fn ansi_is_stripped() {
    let r = BuildResult {
        status: BuildStatus::PermanentFailure,
        error_msg: "\u{1b}[0mbuilder for '\u{1b}[35;1m/s/x.drv\u{1b}[0m' failed".into(),
        times_built: 1,
        is_non_deterministic: false,
        start_time: 0,
        stop_time: 0,
        built_outputs: Vec::new(),
    };
    assert_eq!(r.plain_error_msg(), "builder for '/s/x.drv' failed");
}

// Malformed replies, from a scripted peer: one test per class of bad input.

use crate::wire::WireWriter;
use tokio::io::{DuplexStream, duplex};

const P1: &str = "/s/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-one";
const P2: &str = "/s/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-two";

fn sd() -> StoreDir {
    StoreDir::new("/s").expect("store dir")
}

fn sp(p: &str) -> StorePath {
    sd().parse(p).expect("path")
}

/// The server's greeting followed by `body`.
fn reply(version: u64, body: impl FnOnce(&mut WireWriter<Vec<u8>>)) -> Vec<u8> {
    let mut w = WireWriter::new(Vec::new());
    w.write_u64(SERVE_MAGIC_2).expect("write");
    w.write_u64(version).expect("write");
    body(&mut w);
    w.into_inner()
}

/// A client whose peer sends `bytes` and then end of input. The second value keeps the
/// peer's reading end alive so the client's writes succeed.
async fn scripted(
    bytes: Vec<u8>,
    limits: ServeLimits,
) -> (
    Result<ServeClient<DuplexStream, DuplexStream>, ServeError>,
    DuplexStream,
) {
    let (client_r, mut server_w) = duplex(bytes.len() + 64);
    let (client_w, server_r) = duplex(1 << 20);
    server_w.write_all(&bytes).await.expect("script");
    drop(server_w);
    let c = ServeClient::handshake_with_limits(client_r, client_w, sd(), "scripted", limits).await;
    (c, server_r)
}

fn one(p: &str) -> BTreeSet<StorePath> {
    BTreeSet::from([sp(p)])
}

#[tokio::test]
async fn unsupported_versions() {
    for v in [0x104, 0x204, 0x307, 0x1_0207] {
        let (c, _peer) = scripted(reply(v, |_| {}), ServeLimits::default()).await;
        let e = c.err().expect("refused");
        assert!(
            matches!(e, ServeError::UnsupportedVersion { version, .. } if version == v),
            "{e}"
        );
    }
    // A newer 2.x server is fine, and we keep speaking 2.7.
    let (c, _peer) = scripted(reply(0x208, |_| {}), ServeLimits::default()).await;
    assert_eq!(c.expect("2.8 server").version(), 0x207);
}

#[tokio::test]
async fn truncated_reply_names_the_offset() {
    let bytes = reply(0x207, |w| {
        w.write_u64(1).expect("count");
        w.write_u64(P1.len() as u64).expect("len");
    });
    let (c, _peer) = scripted(bytes, ServeLimits::default()).await;
    let mut c = c.expect("handshake");
    let e = c
        .query_valid_paths(false, false, &one(P1))
        .await
        .expect_err("truncated");
    // The version word is at offset 0, the count at 8, the string length at 16, and the
    // string body would start at 24.
    assert!(matches!(e, ServeError::Closed { offset: 24, .. }), "{e}");
    assert!(
        e.to_string().contains("query_valid_paths on 'scripted'"),
        "{e}"
    );
    // Nothing more is attempted on a broken connection.
    let e = c
        .query_valid_paths(false, false, &one(P1))
        .await
        .expect_err("broken");
    assert!(matches!(e, ServeError::Broken { .. }), "{e}");
}

#[tokio::test]
async fn too_many_paths() {
    let bytes = reply(0x207, |w| w.write_u64(11).expect("count"));
    let limits = ServeLimits {
        max_paths: 10,
        ..ServeLimits::default()
    };
    let (c, _peer) = scripted(bytes, limits).await;
    let e = c
        .expect("handshake")
        .query_closure(false, &one(P1))
        .await
        .expect_err("too many");
    assert!(
        matches!(
            e,
            ServeError::Wire {
                source: WireError::TooManyItems {
                    offset: 8,
                    len: 11,
                    limit: 10
                },
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn bad_store_path_in_reply() {
    let bytes = reply(0x207, |w| w.write_strings(["/elsewhere/x"]).expect("paths"));
    let (c, _peer) = scripted(bytes, ServeLimits::default()).await;
    let e = c
        .expect("handshake")
        .query_valid_paths(true, false, &one(P1))
        .await
        .expect_err("bad path");
    assert!(matches!(e, ServeError::BadPath { offset: 16, .. }), "{e}");
}

#[tokio::test]
async fn unasked_path_in_reply() {
    let bytes = reply(0x207, |w| w.write_strings([P2]).expect("paths"));
    let (c, _peer) = scripted(bytes, ServeLimits::default()).await;
    let e = c
        .expect("handshake")
        .query_valid_paths(true, false, &one(P1))
        .await
        .expect_err("unasked");
    assert!(matches!(e, ServeError::BadReply { .. }), "{e}");
    assert!(e.to_string().contains("-two"), "{e}");
}

fn path_info_reply(hash: &str) -> Vec<u8> {
    reply(0x207, |w| {
        w.write_str(P1).expect("path");
        w.write_str("").expect("deriver");
        w.write_strings([P2]).expect("refs");
        w.write_u64(120).expect("download size");
        w.write_u64(120).expect("nar size");
        w.write_str(hash).expect("hash");
        w.write_str("").expect("ca");
        w.write_strings(["cache.example-1:c2ln"]).expect("sigs");
        w.write_str("").expect("end");
    })
}

#[tokio::test]
async fn path_infos_decode_and_bad_hash() {
    let h = Hash::sha256_of(b"x");
    let (c, _peer) = scripted(
        path_info_reply(&h.to_nix32_prefixed()),
        ServeLimits::default(),
    )
    .await;
    let infos = c
        .expect("handshake")
        .query_path_infos(&one(P1))
        .await
        .expect("infos");
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0].nar_hash, h);
    assert_eq!(infos[0].references, one(P2));
    assert_eq!(infos[0].sigs.len(), 1);

    let (c, _peer) = scripted(path_info_reply("sha256:nothex"), ServeLimits::default()).await;
    let e = c
        .expect("handshake")
        .query_path_infos(&one(P1))
        .await
        .expect_err("bad hash");
    assert!(matches!(e, ServeError::BadHash { .. }), "{e}");
    assert!(e.to_string().contains("sha256:nothex"), "{e}");
}

fn build_reply(n_outputs: u64) -> Vec<u8> {
    reply(0x207, |w| {
        w.write_u64(3).expect("status");
        w.write_str("it broke").expect("msg");
        for v in [1, 0, 10, 11] {
            w.write_u64(v).expect("times");
        }
        w.write_u64(n_outputs).expect("count");
    })
}

#[tokio::test]
async fn build_result_and_bounded_built_outputs() {
    let drv = crate::derivation::BasicDerivation::default();
    let opts = BuildOptions::default();
    let (c, _peer) = scripted(build_reply(0), ServeLimits::default()).await;
    let r = c
        .expect("handshake")
        .build_derivation(&sp(P1), &drv, &opts)
        .await
        .expect("result");
    assert_eq!(r.status, BuildStatus::PermanentFailure);
    assert_eq!(
        (
            r.error_msg.as_str(),
            r.times_built,
            r.start_time,
            r.stop_time
        ),
        ("it broke", 1, 10, 11)
    );

    let limits = ServeLimits {
        max_built_outputs: 4,
        ..ServeLimits::default()
    };
    let (c, _peer) = scripted(build_reply(5), limits).await;
    let e = c
        .expect("handshake")
        .build_derivation(&sp(P1), &drv, &opts)
        .await
        .expect_err("too many");
    assert!(
        matches!(
            e,
            ServeError::Wire {
                source: WireError::TooManyItems { len: 5, .. },
                ..
            }
        ),
        "{e}"
    );
}

fn small_nar() -> Vec<u8> {
    let mut e = crate::nar::NarEncoder::new(Vec::new()).expect("nar");
    e.regular_bytes(false, b"contents").expect("file");
    e.finish().expect("finish").0
}

#[tokio::test]
async fn dump_copies_exactly_the_nar() {
    let nar = small_nar();
    let mut bytes = reply(0x207, |_| {});
    bytes.extend_from_slice(&nar);
    // Whatever follows the NAR must stay unread for the next reply.
    bytes.extend_from_slice(&7u64.to_le_bytes());
    let (c, _peer) = scripted(bytes, ServeLimits::default()).await;
    let mut c = c.expect("handshake");
    let mut sink = Vec::new();
    let n = c.dump_store_path(&sp(P1), &mut sink).await.expect("dump");
    assert_eq!(sink, nar);
    assert_eq!(n, nar.len() as u64);
    assert_eq!(c.recv_u64("test").await.expect("next word"), 7);
}

/// The remote's output arrives a few bytes at a time, the NAR's end inside a read: the NAR
/// checker is fed each piece, and the word after the NAR stays for the next reply.
#[tokio::test]
async fn dump_of_a_nar_arriving_in_small_pieces() {
    let mut e = crate::nar::NarEncoder::new(Vec::new()).expect("nar");
    e.begin_directory().expect("dir");
    e.entry(b"bin").expect("entry");
    e.regular_bytes(true, b"#!/bin/sh\n").expect("file");
    e.entry(b"lib").expect("entry");
    e.symlink(b"../lib").expect("link");
    e.end_directory().expect("end");
    let nar = e.finish().expect("finish").0;
    let mut bytes = reply(0x207, |_| {});
    bytes.extend_from_slice(&nar);
    bytes.extend_from_slice(&7u64.to_le_bytes());
    let (client_r, mut server_w) = duplex(5);
    let (client_w, _server_r) = duplex(1 << 20);
    let writer = tokio::spawn(async move { server_w.write_all(&bytes).await });
    let mut c = ServeClient::handshake_with_limits(
        client_r,
        client_w,
        sd(),
        "slow",
        ServeLimits::default(),
    )
    .await
    .expect("handshake");
    let mut sink = Vec::new();
    let n = c.dump_store_path(&sp(P1), &mut sink).await.expect("dump");
    assert_eq!(sink, nar);
    assert_eq!(n, nar.len() as u64);
    assert_eq!(c.recv_u64("test").await.expect("next word"), 7);
    writer.await.expect("join").expect("write");
}

#[tokio::test]
async fn dump_rejects_a_bad_nar() {
    let mut nar = small_nar();
    // Corrupt the "type" keyword of the root node (magic 24 bytes, "(" 16 bytes).
    let at = 24 + 16 + 8;
    nar[at..at + 4].copy_from_slice(b"typo");
    let mut bytes = reply(0x207, |_| {});
    bytes.extend_from_slice(&nar);
    let (c, _peer) = scripted(bytes, ServeLimits::default()).await;
    let e = c
        .expect("handshake")
        .dump_store_path(&sp(P1), &mut Vec::new())
        .await
        .expect_err("bad NAR");
    assert!(
        matches!(&e, ServeError::Nar { source, .. } if source.offset() == 40),
        "{e}"
    );
    assert!(e.to_string().contains("dump_store_path of /s/"), "{e}");
}

#[tokio::test]
async fn dump_of_a_truncated_nar() {
    let nar = small_nar();
    let mut bytes = reply(0x207, |_| {});
    bytes.extend_from_slice(&nar[..nar.len() - 16]);
    let (c, _peer) = scripted(bytes, ServeLimits::default()).await;
    let e = c
        .expect("handshake")
        .dump_store_path(&sp(P1), &mut Vec::new())
        .await
        .expect_err("truncated");
    assert!(matches!(e, ServeError::Closed { .. }), "{e}");
}

#[tokio::test]
async fn dump_over_the_size_limit() {
    let nar = small_nar();
    let mut bytes = reply(0x207, |_| {});
    bytes.extend_from_slice(&nar);
    let limits = ServeLimits {
        max_nar_size: nar.len() as u64 - 1,
        ..ServeLimits::default()
    };
    let (c, _peer) = scripted(bytes, limits).await;
    let e = c
        .expect("handshake")
        .dump_store_path(&sp(P1), &mut Vec::new())
        .await
        .expect_err("too big");
    assert!(matches!(e, ServeError::NarTooLarge { .. }), "{e}");
}

fn info_of(size: u64, hash: Hash) -> PathInfo {
    PathInfo {
        path: sp(P1),
        deriver: None,
        references: BTreeSet::new(),
        nar_size: size,
        nar_hash: hash,
        ca: None,
        sigs: BTreeSet::new(),
    }
}

/// A NAR of one regular file of `len` zero bytes, as a NAR writer would produce it.
fn zero_file_nar(len: usize) -> Vec<u8> {
    let mut e = crate::nar::NarEncoder::new(Vec::new()).expect("nar");
    e.regular_bytes(false, &vec![0u8; len]).expect("file");
    e.finish().expect("finish").0
}

async fn checked(
    bytes_after_greeting: &[u8],
    info: &PathInfo,
) -> (Result<Hash, ServeError>, Vec<u8>) {
    let mut bytes = reply(0x207, |_| {});
    bytes.extend_from_slice(bytes_after_greeting);
    let (c, _peer) = scripted(bytes, ServeLimits::default()).await;
    let mut sink = Vec::new();
    let r = c
        .expect("handshake")
        .dump_store_path_checked(info, &mut sink)
        .await;
    (r, sink)
}

/// Issue 12 item 5: the declared `narSize` bounds what is read (a builder that declared
/// 4096 bytes and sent a 1 MiB NAR is stopped at 4096), a short NAR and a wrong hash
/// fail, and a SHA-512 `narHash` is checked like a SHA-256 one (issue 12 item 10).
#[tokio::test]
async fn checked_dump_holds_the_remote_to_its_declaration() {
    let nar = small_nar();
    let n = nar.len() as u64;
    for algo in [HashAlgo::Sha256, HashAlgo::Sha512] {
        let (r, sink) = checked(&nar, &info_of(n, Hash::of(algo, &nar))).await;
        assert_eq!(r.expect("as declared"), Hash::sha256_of(&nar), "{algo:?}");
        assert_eq!(sink, nar);

        let wrong = Hash::of(algo, b"other bytes");
        let (r, _) = checked(&nar, &info_of(n, wrong)).await;
        let e = r.expect_err("wrong hash");
        assert!(
            matches!(e, ServeError::NarNotAsDeclared { .. }),
            "{algo:?}: {e}"
        );
        assert!(e.to_string().contains(algo.name()), "{e}");
    }

    let big = zero_file_nar(1 << 20);
    let (r, sink) = checked(&big, &info_of(4096, Hash::sha256_of(&big))).await;
    let e = r.expect_err("over the declared size");
    assert!(
        matches!(&e, ServeError::NarNotAsDeclared { detail, .. } if detail.contains("declared a NAR of 4096 bytes and sent more")),
        "{e}"
    );
    assert!(
        sink.len() <= 4096,
        "read {} bytes past the declaration",
        sink.len()
    );

    let (r, _) = checked(&nar, &info_of(n + 8, Hash::sha256_of(&nar))).await;
    let e = r.expect_err("short");
    assert!(e.to_string().contains(&format!("sent one of {n}")), "{e}");
}

#[test]
fn built_output_name() {
    let b = BuiltOutput {
        id: "sha256:abcd!out".into(),
        realisation_json: "{}".into(),
    };
    assert_eq!(b.output_name(), Some("out"));
}
