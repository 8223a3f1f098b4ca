//! Targets for the other formats and protocols of `ferry-nix`: narinfo, derivations,
//! machines files, nix.conf, the wire readers, the serve client, signing keys, store paths
//! and hashes.

use super::{VirtualFs, runtime, store, text};
use ferry_nix::store_path::StoreDir;
use std::path::Path;

/// narinfo and nix-cache-info parsing: what parses renders and parses back equal.
pub fn narinfo(data: &[u8]) -> bool {
    use ferry_nix::narinfo::{CacheInfo, NarInfo};
    let dir = store();
    let t = text(data);
    if let Ok(ci) = CacheInfo::parse(&t) {
        let again = CacheInfo::parse(&ci.render()).expect("rendered nix-cache-info parses");
        assert_eq!(again, ci);
    }
    let Ok(info) = NarInfo::parse(&dir, &t) else {
        return false;
    };
    let rendered = info.render(&dir);
    let again = NarInfo::parse(&dir, &rendered).expect("a rendered narinfo parses");
    assert_eq!(again, info, "render/parse round trip\n{rendered}");
    // Signatures are checked in `substituter_check` (slow in debug builds).
    let _ = info.fingerprint(&dir);
    true
}

// ---------------------------------------------------------------- derivations

/// `.drv` ATerm parsing: what parses renders and parses back equal, and encodes for the wire.
pub fn derivation(data: &[u8]) -> bool {
    use ferry_nix::derivation::Derivation;
    let dir = store();
    let Ok(drv) = Derivation::parse(data, &dir) else {
        return false;
    };
    let rendered = drv.render(&dir);
    let again = Derivation::parse(rendered.as_bytes(), &dir).expect("a rendered drv parses");
    assert_eq!(again, drv);
    let _ = drv.to_basic().to_wire(&dir);
    true
}

// ---------------------------------------------------------------- configuration

/// Machines files (`parse_machines`, `@file` entries from a virtual file system): every
/// machine renders as a line that parses back to it.
pub fn machines(data: &[u8]) -> bool {
    use ferry_nix::machines::parse_machines;
    let fs = VirtualFs::parse(&text(data));
    let Ok(ms) = parse_machines(&fs.main, "/etc/nix/machines", "x86_64-linux", &fs) else {
        return false;
    };
    for m in &ms {
        let line = m.to_line();
        let back = parse_machines(&line, "line", "x86_64-linux", &fs).expect("to_line parses");
        assert_eq!(back.len(), 1, "{line:?}");
        assert_eq!(back[0], *m, "{line:?}");
        let _ = m.slot_lock_name(1);
        let _ = m.host();
    }
    true
}

/// nix.conf with includes (virtual file system, `NIX_CONFIG` after it when a file of that
/// name is given), and every typed getter over every setting.
pub fn nixconf(data: &[u8]) -> bool {
    use ferry_nix::nixconf::{NIX_CONFIG_SOURCE, NixConf};
    let fs = VirtualFs::parse(&text(data));
    let Ok(mut conf) = NixConf::parse(&fs.main, Path::new("/etc/nix/nix.conf"), &fs) else {
        return false;
    };
    if let Some((_, env)) = fs.files.iter().find(|(n, _)| n == NIX_CONFIG_SOURCE) {
        let _ = conf.apply_text(env, Path::new(NIX_CONFIG_SOURCE), &fs);
    }
    let names: Vec<String> = conf.iter().map(|(n, _)| n.to_owned()).collect();
    for n in &names {
        let _ = conf.get(n);
        let _ = conf.get_bool(n);
        let _ = conf.get_u64(n);
        let _ = conf.get_list(n);
        let _ = conf.get_set(n);
        let _ = conf.provenance(n);
    }
    let _ = conf.get_max_jobs(2);
    true
}

// ---------------------------------------------------------------- wire and hook protocol

/// The wire readers: the synchronous and the asynchronous reader agree on every value and
/// error for the same bytes.
pub fn wire(data: &[u8]) -> bool {
    use ferry_nix::wire::{AsyncWireReader, WireReader};
    let (&script, rest) = data.split_first().unwrap_or((&0, &[]));
    let mut s = WireReader::new(rest);
    let mut a = AsyncWireReader::new(rest);
    let mut ok = true;
    for step in 0..8u32 {
        let op = (u32::from(script) >> step) & 3 | ((step & 1) << 2);
        let (x, y) = match op {
            0 => (
                format!("{:?}", s.read_settings(64, 4096)),
                format!("{:?}", runtime(a.read_settings(64, 4096))),
            ),
            1 => (
                format!("{:?}", s.read_strings(1024, 4096)),
                format!("{:?}", runtime(a.read_strings(1024, 4096))),
            ),
            2 => (
                format!("{:?}", s.read_bool()),
                format!("{:?}", runtime(a.read_bool())),
            ),
            3 => (
                format!("{:?}", s.expect_str("try")),
                format!("{:?}", runtime(a.expect_str("try"))),
            ),
            4 => (
                format!("{:?}", s.read_string(64)),
                format!("{:?}", runtime(a.read_string(64))),
            ),
            5 => (
                format!("{:?}", s.read_bytes(1 << 20)),
                format!("{:?}", runtime(a.read_bytes(1 << 20))),
            ),
            _ => (
                format!("{:?}", s.read_u64()),
                format!("{:?}", runtime(a.read_u64())),
            ),
        };
        assert_eq!(x, y, "sync and async readers disagree at step {step}");
        assert_eq!(s.offset(), a.offset());
        if x.starts_with("Err") {
            ok = false;
            break;
        }
    }
    ok
}

// ---------------------------------------------------------------- serve protocol client

const SERVE_REQUESTED: [&str; 3] = [
    "hfv8m9zs7zqlqq8ybh49yx19zfh95fwc-hello.txt",
    "pci9hq6r0sb60ls8nq6867hdn4akb335-wire-golden",
    "00000000000000000000000000000000-ferry-missing",
];
const SIMPLE_DRV: &[u8] = include_bytes!("../../../ferry-nix/tests/golden/derivation/simple.drv");
const FILE_NAR: &[u8] = include_bytes!("../../../ferry-nix/tests/golden/nar/file.nar");

/// The serve client (ferry-nix/src/serve/) reading a builder's bytes: the first input byte
/// picks the first operation, the rest is everything the remote writes, handshake included.
/// Operations follow each other in a fixed rotation while they succeed.
pub fn serve_client(data: &[u8]) -> bool {
    use ferry_nix::serve::{BuildOptions, PathInfo, ServeClient};
    use ferry_nix::store_path::StorePath;
    use std::collections::BTreeSet;
    let (&first, rest) = data.split_first().unwrap_or((&0, &[]));
    let paths: BTreeSet<StorePath> = SERVE_REQUESTED
        .iter()
        .map(|b| StorePath::from_base_name(b).expect("golden path"))
        .collect();
    let dir = store();
    let drv = ferry_nix::derivation::Derivation::parse(SIMPLE_DRV, &dir).expect("golden drv");
    let drv_path = StorePath::from_base_name("4id9fvxwrbwj7yw3rsvajsg616nk0nid-wire-golden.drv")
        .expect("drv path");
    let any = paths.iter().next().expect("a path").clone();
    runtime(async {
        let Ok(mut c) = ServeClient::handshake(rest, tokio::io::sink(), dir.clone(), "fuzz").await
        else {
            return false;
        };
        let mut op = first % 6;
        for _ in 0..6 {
            let ok = match op {
                0 => c.query_valid_paths(true, false, &paths).await.is_ok(),
                1 => c.query_path_infos(&paths).await.is_ok(),
                2 => c.query_closure(true, &paths).await.is_ok(),
                3 => c
                    .build_derivation(&drv_path, &drv.to_basic(), &BuildOptions::default())
                    .await
                    .is_ok(),
                4 => c.dump_store_path(&any, tokio::io::sink()).await.is_ok(),
                _ => {
                    let info = PathInfo {
                        path: any.clone(),
                        deriver: None,
                        references: BTreeSet::new(),
                        nar_size: FILE_NAR.len() as u64,
                        nar_hash: ferry_nix::hash::Hash::sha256_of(FILE_NAR),
                        ca: None,
                        sigs: BTreeSet::new(),
                    };
                    c.add_to_store_nar(&info, FILE_NAR).await.is_ok()
                }
            };
            if !ok {
                break;
            }
            op = (op + 1) % 6;
        }
        true
    })
}

// ---------------------------------------------------------------- keys, paths, hashes

/// Signing keys, signatures and trusted-key lists (ferry-nix/src/signing.rs), line by line:
/// each renders and parses back equal; a secret key's signature verifies with its public key.
pub fn signing(data: &[u8]) -> bool {
    use ferry_nix::signing::{PublicKey, SecretKey, Signature, TrustedKeys};
    let t = text(data);
    let mut ok = TrustedKeys::parse_list(&t).is_ok();
    for line in t.lines() {
        if let Ok(s) = Signature::parse(line) {
            ok = true;
            assert_eq!(Signature::parse(&s.to_string()).expect("sig"), s);
        }
        if let Ok(k) = PublicKey::parse(line) {
            ok = true;
            assert_eq!(PublicKey::parse(&k.to_string()).expect("key"), k);
        }
        if let Ok(k) = SecretKey::parse(line) {
            ok = true;
            let again = SecretKey::parse(&k.to_key_file_text()).expect("secret key");
            assert_eq!(again.to_public(), k.to_public());
            let sig = k.sign(data);
            assert!(k.to_public().verify(data, &sig));
        }
    }
    ok
}

/// Store directories and paths (ferry-nix/src/store_path.rs): the first line is a store
/// directory, every other line a path in it (or a base name); what parses displays back.
pub fn store_path(data: &[u8]) -> bool {
    use ferry_nix::store_path::StorePath;
    let t = text(data);
    let mut lines = t.lines();
    let dir = StoreDir::new(lines.next().unwrap_or_default()).unwrap_or_else(|_| store());
    let mut ok = false;
    for line in lines {
        if let Ok(p) = dir.parse(line) {
            ok = true;
            assert_eq!(dir.parse(&dir.display(&p)).expect("display parses"), p);
            let again = StorePath::from_parts(*p.digest(), p.name()).expect("from_parts");
            assert_eq!(again, p);
        }
        if let Ok((p, sub)) = dir.parse_with_subpath(line) {
            ok = true;
            assert_eq!(format!("{}{sub}", dir.display(&p)), line);
        }
        if let Ok(p) = StorePath::from_base_name(line) {
            ok = true;
            assert_eq!(p.as_str(), line);
            let _ = p.is_derivation();
        }
    }
    ok
}

/// Hashes (ferry-nix/src/hash.rs), line by line, also with the algorithm given apart: each
/// parsed hash renders in every encoding that parses back to it.
pub fn hash(data: &[u8]) -> bool {
    use ferry_nix::hash::{Hash, HashAlgo, nix32_decode, nix32_encode};
    let t = text(data);
    let mut ok = false;
    let check = |h: &Hash| {
        for s in [
            h.to_nix32_prefixed(),
            h.to_sri(),
            format!("{}:{}", h.algo().name(), h.to_base16()),
        ] {
            assert_eq!(Hash::parse_any_prefixed(&s).as_ref(), Ok(h), "{s}");
        }
    };
    for line in t.lines() {
        if let Ok(h) = Hash::parse_any_prefixed(line) {
            ok = true;
            check(&h);
        }
        for algo in [HashAlgo::Sha256, HashAlgo::Sha512] {
            if let Ok(h) = Hash::parse_non_sri_unprefixed(line, algo) {
                ok = true;
                check(&h);
            }
        }
        for size in [20, 32] {
            if let Ok(b) = nix32_decode(line, size) {
                ok = true;
                assert_eq!(nix32_encode(&b), line);
            }
        }
    }
    ok
}
