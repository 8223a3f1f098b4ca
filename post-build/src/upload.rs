//! Uploading one job: the closure of a store path, to every target.
//!
//! Per path, in topological order (references first): skip targets that already have its
//! narinfo; otherwise serialise the NAR straight from the store (byte-identical to
//! `nix-store --dump`), hash it, compress it into a work file while hashing the compressed
//! bytes, refuse it if its NarHash or NarSize differ from what the store recorded, sign the
//! fingerprint with every key, then per target upload the NAR and only then the narinfo.
//! Because paths go in topological order and a target that fails stops receiving paths for
//! the rest of the job, a narinfo is only ever written when its references' narinfos exist
//! (Nix's `BinaryCacheStore::uploadNarInfo` rule; docs/upload.md §3.3).

use crate::compress::{Compression, Compressor, Levels};
use crate::failure::{Classify, Side};
use crate::queue::Outcome;
use crate::target::{NAR_TYPE, NARINFO_TYPE, Target, TargetError, nar_key, narinfo_key};
use ferry_nix::hash::{Hash, Sha256Sink};
use ferry_nix::nar::TeeWriter;
use ferry_nix::narinfo::NarInfo;
use ferry_nix::path_info::topo_sort;
use ferry_nix::serve::PathInfo;
use ferry_nix::signing::{SecretKey, Signature};
use ferry_nix::store_path::{StoreDir, StorePath};
use ferry_store::{LocalError, LocalStore};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use thiserror::Error;

#[derive(Debug, Error)]
pub(crate) enum PrepareError {
    #[error("{path}: NAR hash {got} / size {got_size}, the store recorded {want} / {want_size}")]
    Mismatch {
        path: String,
        got: String,
        got_size: u64,
        want: String,
        want_size: u64,
    },
    #[error("{path}: serialising the NAR: {source}")]
    Dump {
        path: String,
        #[source]
        source: ferry_nix::nar::NarWriteError,
    },
    #[error("{path}: compressing the NAR: {source}")]
    Compress {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("work file {path}: {source}")]
    WorkFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: bad path info: {message}")]
    Info { path: String, message: String },
}

/// A compressed NAR in the work directory and the narinfo that describes it.
pub(crate) struct Prepared {
    pub(crate) file: PathBuf,
    pub(crate) narinfo: NarInfo,
}

impl Drop for Prepared {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

pub(crate) struct Shared {
    pub(crate) store_dir: StoreDir,
    pub(crate) store: LocalStore,
    pub(crate) targets: Vec<Arc<Target>>,
    pub(crate) keys: Vec<SecretKey>,
    pub(crate) levels: Levels,
    pub(crate) work_dir: PathBuf,
    /// `(target index, hash part)` of narinfos known to exist: saves a round trip per path
    /// shared between closures. Only positive facts are kept (a cache never loses a path
    /// because of us; if someone deletes it, re-uploading waits for the next restart).
    pub(crate) present: Mutex<HashSet<(usize, String)>>,
    /// Targets whose `nix-cache-info` has been checked.
    pub(crate) initialised: Mutex<HashSet<usize>>,
    /// Store paths being uploaded by some worker right now.
    pub(crate) busy: Mutex<HashSet<String>>,
    /// Path infos fetched ahead for jobs about to run ([`prefetch_infos`]): one
    /// `nix path-info` for a batch of jobs instead of one per job, which costs tens of
    /// milliseconds of CPU each and dominated uploads of many small paths.
    pub(crate) infos: Mutex<HashMap<StorePath, PathInfo>>,
    /// Multipart uploads in progress (in the queue database), and when to use them.
    pub(crate) uploads: crate::multipart::UploadLog,
    pub(crate) multipart: crate::multipart::MultipartSettings,
    /// NARs being serialised and compressed at once (`Settings::compress_slots`).
    /// Compression is CPU-bound; more of it at once than the cores can keep busy only
    /// time-slices several zstd contexts (each a few MiB of tables and window) through the
    /// same caches. Uploads, which wait on the network, still run `concurrency` at once.
    pub(crate) compressing: tokio::sync::Semaphore,
}

/// Per-target outcome of one job: paths uploaded, or the error that stopped the target.
pub(crate) type TargetResults = Vec<(usize, Result<u64, String>)>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Builds the narinfo for `info` from the NAR/file hashes; pure apart from signing.
pub(crate) fn make_narinfo(
    store_dir: &StoreDir,
    info: &PathInfo,
    compression: Compression,
    file_hash: Hash,
    file_size: u64,
    keys: &[SecretKey],
) -> Result<NarInfo, PrepareError> {
    let bad = |message: String| PrepareError::Info {
        path: store_dir.display(&info.path),
        message,
    };
    let store_path = info.path.clone();
    let references = info.references.clone();
    let deriver = info.deriver.clone();
    // Signatures already in the store (e.g. the builder's) travel along, as with `nix copy`.
    let sigs = info
        .sigs
        .iter()
        .filter_map(|s| Signature::parse(s).ok())
        .collect();
    let mut ni = NarInfo {
        store_path,
        url: nar_key(&file_hash, compression),
        compression: compression.narinfo_name().to_owned(),
        file_hash: Some(file_hash),
        file_size: Some(file_size),
        nar_hash: info.nar_hash.clone(),
        nar_size: info.nar_size,
        references,
        deriver,
        system: None,
        sigs,
        ca: info.ca.clone(),
    };
    for k in keys {
        ni.sign(store_dir, k).map_err(|e| bad(e.to_string()))?;
    }
    Ok(ni)
}

/// Serialises, hashes and compresses one path into the work directory (blocking).
pub(crate) fn prepare(
    sh: &Shared,
    info: &PathInfo,
    compression: Compression,
) -> Result<Prepared, PrepareError> {
    let full = sh.store.real_path(&info.path);
    let display = || sh.store_dir.display(&info.path);
    let compress_err = |source| PrepareError::Compress {
        path: display(),
        source,
    };
    let sp = &info.path;
    std::fs::create_dir_all(&sh.work_dir).map_err(|source| PrepareError::WorkFile {
        path: sh.work_dir.clone(),
        source,
    })?;
    let mut r = [0u8; 4];
    let _ = getrandom::fill(&mut r);
    let file = sh.work_dir.join(format!(
        "{}.{:08x}.nar",
        sp.hash_part(),
        u32::from_le_bytes(r)
    ));
    let work_err = |source| PrepareError::WorkFile {
        path: file.clone(),
        source,
    };
    let prepared_file = PreparedFile(file.clone());
    let f = std::fs::File::create(&file).map_err(work_err)?;
    let sink = TeeWriter::new(BufWriter::with_capacity(256 * 1024, f), Sha256Sink::new());
    let mut comp = Compressor::new(compression, sh.levels.for_nar(info.nar_size), sink)
        .map_err(compress_err)?;
    let (nar_hash, nar_size) =
        ferry_nix::nar::dump_path_hashed(&full, &mut comp).map_err(|source| {
            PrepareError::Dump {
                path: display(),
                source,
            }
        })?;
    let tee = comp.finish().map_err(compress_err)?;
    let (mut buf, file_sink) = tee.into_inner();
    buf.flush().map_err(work_err)?;
    let file_size = file_sink.len();
    let file_hash = file_sink.finish();
    if nar_hash != info.nar_hash || nar_size != info.nar_size {
        return Err(PrepareError::Mismatch {
            path: sh.store_dir.display(&info.path),
            got: nar_hash.to_nix32_prefixed(),
            got_size: nar_size,
            want: info.nar_hash.to_nix32_prefixed(),
            want_size: info.nar_size,
        });
    }
    let narinfo = make_narinfo(
        &sh.store_dir,
        info,
        compression,
        file_hash,
        file_size,
        &sh.keys,
    )?;
    std::mem::forget(prepared_file);
    Ok(Prepared { file, narinfo })
}

/// Removes a half-written work file on early return.
struct PreparedFile(PathBuf);
impl Drop for PreparedFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn transient(error: String, side: Side, retry_after: Option<std::time::Duration>) -> Outcome {
    Outcome::Transient {
        error,
        side,
        retry_after,
    }
}

/// A local-side failure, transient or permanent by its type.
fn local_failure(e: &(impl Classify + std::fmt::Display)) -> Outcome {
    if e.is_permanent() {
        Outcome::Permanent {
            error: e.to_string(),
            side: Side::Local,
        }
    } else {
        transient(e.to_string(), Side::Local, None)
    }
}

/// Is `path` gone from the store's file system? Asked of the file system rather than read
/// from Nix's error message (whose wording differs between versions): a valid path always
/// has its file, so a missing one is certainly not valid.
pub(crate) fn gone_from_store(sh: &Shared, path: &StorePath) -> bool {
    matches!(
        std::fs::symlink_metadata(sh.store.real_path(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound
    )
}

/// Claims `path` for this worker, waiting while another worker uploads it.
async fn claim<'a>(sh: &'a Shared, path: &str) -> Claim<'a> {
    loop {
        if lock(&sh.busy).insert(path.to_owned()) {
            return Claim {
                sh,
                path: path.to_owned(),
            };
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

struct Claim<'a> {
    sh: &'a Shared,
    path: String,
}
impl Drop for Claim<'_> {
    fn drop(&mut self) {
        lock(&self.sh.busy).remove(&self.path);
    }
}

/// Does every target hold `path`'s narinfo?
async fn everywhere(sh: &Shared, path: &str) -> bool {
    let Ok(sp) = sh.store_dir.parse(path) else {
        return false;
    };
    for t in &sh.targets {
        if !matches!(t.exists(&narinfo_key(&sp)).await, Ok(true)) {
            return false;
        }
    }
    true
}

/// Most path infos kept ahead; more are simply asked for again. A path info with its
/// references and signatures takes 1–2 KiB, so this keeps the map near 16 MiB at most,
/// while holding the closures of a whole window of jobs (a NixOS system closure is 2,000 to
/// 3,000 paths, most of them shared between jobs).
const PREFETCH_MAX: usize = 8192;

/// Fetches the closures of `roots` in one `nix path-info` call into [`Shared::infos`]
/// (best effort: on any error the jobs ask for their own closures as before).
pub(crate) async fn prefetch_infos(sh: &Shared, roots: &[String]) {
    let want: BTreeSet<StorePath> = {
        let have = lock(&sh.infos);
        roots
            .iter()
            .filter_map(|r| sh.store_dir.parse(r).ok())
            .filter(|p| !have.contains_key(p))
            .collect()
    };
    if want.is_empty() {
        return;
    }
    if let Ok(infos) = sh.store.closure_infos(&want).await {
        let mut have = lock(&sh.infos);
        if have.len() + infos.len() > PREFETCH_MAX {
            have.clear();
        }
        have.extend(infos.into_iter().map(|i| (i.path.clone(), i)));
    }
}

/// The closure of `root` from [`Shared::infos`], if every member is there.
fn cached_closure(sh: &Shared, root: &StorePath) -> Option<Vec<PathInfo>> {
    let have = lock(&sh.infos);
    let mut seen = BTreeSet::new();
    let mut stack = vec![root.clone()];
    let mut out = Vec::new();
    while let Some(p) = stack.pop() {
        if !seen.insert(p.clone()) {
            continue;
        }
        let info = have.get(&p)?;
        stack.extend(info.references.iter().cloned());
        out.push(info.clone());
    }
    Some(out)
}

/// Uploads the closure of `root` to every target.
pub(crate) async fn upload_closure(sh: &Arc<Shared>, root: &str) -> (Outcome, TargetResults) {
    let mut results: TargetResults = Vec::new();
    let root_path = match sh.store_dir.parse(root) {
        Ok(p) => p,
        Err(e) => {
            return (
                Outcome::Permanent {
                    error: e.to_string(),
                    side: Side::Local,
                },
                results,
            );
        }
    };
    let cached = cached_closure(sh, &root_path);
    let looked_up = match cached {
        Some(c) => Ok(c),
        None => {
            sh.store
                .closure_infos(&BTreeSet::from([root_path.clone()]))
                .await
        }
    };
    let infos = match looked_up {
        Ok(i) => i,
        // Nix says so (2.19+ print `null` for an invalid path), or its file is gone (2.8
        // exits non-zero with a message that is not worth parsing).
        Err(e) if matches!(e, LocalError::NotValid { .. }) || gone_from_store(sh, &root_path) => {
            // Uploaded by an earlier run that was killed before it could delete the job
            // (after removing the GC root, so the collector may have taken the path since).
            if everywhere(sh, root).await {
                return (Outcome::Uploaded, results);
            }
            return (
                Outcome::Gone {
                    error: format!("no longer in the store: {e}"),
                },
                results,
            );
        }
        Err(e) => return (local_failure(&e), results),
    };
    let order = match topo_sort(infos) {
        Ok(o) => o,
        Err(e) => return (local_failure(&LocalError::from(e)), results),
    };

    let mut failed: Vec<Option<TargetError>> = sh.targets.iter().map(|_| None).collect();
    let mut uploaded = vec![0u64; sh.targets.len()];
    for (t, target) in sh.targets.iter().enumerate() {
        if lock(&sh.initialised).contains(&t) {
            continue;
        }
        match target.init(&sh.store_dir).await {
            Ok(()) => {
                lock(&sh.initialised).insert(t);
            }
            Err(e) => failed[t] = Some(e),
        }
    }

    for info in &order {
        let sp = info.path.clone();
        let full_path = sh.store_dir.display(&sp);
        let key = narinfo_key(&sp);
        let _claim = claim(sh, &full_path).await;
        let mut need = Vec::new();
        for (t, target) in sh.targets.iter().enumerate() {
            if failed[t].is_some() || lock(&sh.present).contains(&(t, sp.hash_part().to_owned())) {
                continue;
            }
            match target.exists(&key).await {
                Ok(true) => {
                    lock(&sh.present).insert((t, sp.hash_part().to_owned()));
                }
                Ok(false) => need.push(t),
                Err(e) => failed[t] = Some(e),
            }
        }
        if need.is_empty() {
            continue;
        }
        // One NAR per compression in use: targets may differ (`?compression=`).
        let mut compressions: Vec<Compression> =
            need.iter().map(|&t| sh.targets[t].compression).collect();
        compressions.sort_by_key(|c| c.narinfo_name());
        compressions.dedup();
        for compression in compressions {
            let sh2 = Arc::clone(sh);
            let info2 = info.clone();
            // Never closed; were it, compressing without a slot is still correct.
            let slot = sh.compressing.acquire().await.ok();
            let prepared =
                match tokio::task::spawn_blocking(move || prepare(&sh2, &info2, compression)).await
                {
                    Ok(Ok(p)) => p,
                    // The path may have been collected between the query and the dump.
                    Ok(Err(e)) if gone_from_store(sh, &info.path) => {
                        return (
                            Outcome::Gone {
                                error: format!("no longer in the store: {e}"),
                            },
                            results,
                        );
                    }
                    Ok(Err(e)) => return (local_failure(&e), results),
                    Err(e) => {
                        return (
                            transient(format!("NAR worker: {e}"), Side::Local, None),
                            results,
                        );
                    }
                };
            drop(slot);
            let text = prepared.narinfo.render(&sh.store_dir);
            for &t in need
                .iter()
                .filter(|&&t| sh.targets[t].compression == compression)
            {
                let target = &sh.targets[t];
                let r = async {
                    let size = prepared.narinfo.file_size.unwrap_or(0);
                    if target.is_s3() && size >= sh.multipart.threshold {
                        crate::multipart::Upload {
                            target,
                            log: &sh.uploads,
                            path: &full_path,
                            job: root,
                            key: &prepared.narinfo.url,
                            file: &prepared.file,
                            content_type: NAR_TYPE,
                            settings: sh.multipart,
                        }
                        .run()
                        .await?;
                    } else {
                        target
                            .put_file(
                                &prepared.narinfo.url,
                                &prepared.file,
                                NAR_TYPE,
                                prepared.narinfo.file_hash.as_ref(),
                            )
                            .await?;
                    }
                    target
                        .put_bytes(&key, text.clone().into_bytes(), NARINFO_TYPE)
                        .await
                }
                .await;
                match r {
                    Ok(()) => {
                        tracing::info!(target = %target.shown(), path = %full_path, nar_size = info.nar_size,
                            compression = compression.narinfo_name(),
                            file_size = prepared.narinfo.file_size.unwrap_or(0), "uploaded");
                        lock(&sh.present).insert((t, sp.hash_part().to_owned()));
                        uploaded[t] += 1;
                    }
                    Err(e) => failed[t] = Some(e),
                }
            }
        }
    }

    // A job is dead-lettered only when every failure was permanent: a transient failure on
    // another target brings it back anyway, and the permanent one is tried again with it.
    let mut transient_errors = Vec::new();
    let mut permanent_errors = Vec::new();
    let mut retry_after = None;
    for (t, f) in failed.into_iter().enumerate() {
        match f {
            None => results.push((t, Ok(uploaded[t]))),
            Some(e) => {
                let msg = e.to_string();
                if e.is_permanent() {
                    permanent_errors.push(msg.clone());
                } else {
                    retry_after = retry_after.max(e.retry_after());
                    transient_errors.push(msg.clone());
                }
                results.push((t, Err(msg)));
            }
        }
    }
    if !transient_errors.is_empty() {
        transient_errors.extend(permanent_errors);
        (
            transient(transient_errors.join("; "), Side::Target, retry_after),
            results,
        )
    } else if !permanent_errors.is_empty() {
        (
            Outcome::Permanent {
                error: permanent_errors.join("; "),
                side: Side::Target,
            },
            results,
        )
    } else {
        (Outcome::Uploaded, results)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info_in(sd: &StoreDir, path: &str, refs: &[&str]) -> PathInfo {
        PathInfo {
            path: sd.parse(path).expect("store path"),
            deriver: None,
            nar_hash: Hash::sha256_of(path.as_bytes()),
            nar_size: 100,
            references: refs
                .iter()
                .map(|r| sd.parse(r).expect("reference"))
                .collect(),
            ca: None,
            sigs: Default::default(),
        }
    }

    fn info(path: &str, refs: &[&str]) -> PathInfo {
        info_in(&StoreDir::new("/nix/store").expect("sd"), path, refs)
    }

    const A: &str = "/nix/store/7hmcr4m0qxnr5yb9mr37k2bw4ylp7wjc-a";
    const B: &str = "/nix/store/1k0mzzy0kkv0rb3jcpd4ibbxhqsfkg9a-b";
    const C: &str = "/nix/store/ap5lw0pk0i0b3nmpmqa5ryz3a9gd5yvc-c";

    #[test]
    fn narinfos_go_references_first() {
        // c → b → a, plus c → a; input in the worst order.
        let order =
            topo_sort(vec![info(C, &[B, A, C]), info(B, &[A]), info(A, &[])]).expect("sort");
        let sd = StoreDir::new("/nix/store").expect("sd");
        let paths: Vec<String> = order.iter().map(|i| sd.display(&i.path)).collect();
        assert_eq!(paths, [A, B, C]);
        // Every narinfo comes after all of its references' narinfos.
        for (i, p) in order.iter().enumerate() {
            for r in &p.references {
                if r != &p.path {
                    assert!(
                        order[..i].iter().any(|q| &q.path == r),
                        "{} before {r}",
                        p.path
                    );
                }
            }
        }
    }

    #[test]
    fn narinfo_is_signed_and_renders() {
        let sd = StoreDir::new("/nix/store").expect("sd");
        let key = SecretKey::from_seed("test-1", [7; 32]).expect("key");
        let ni = make_narinfo(
            &sd,
            &info(C, &[A, C]),
            Compression::Zstd,
            Hash::sha256_of(b"f"),
            42,
            std::slice::from_ref(&key),
        )
        .expect("narinfo");
        assert!(ni.verify_with(&sd, &key.to_public()).expect("verify"));
        let text = ni.render(&sd);
        assert!(text.contains("Compression: zstd\n"), "{text}");
        assert!(text.contains("FileSize: 42\n"), "{text}");
        assert!(text.contains(&format!(
            "URL: nar/{}.nar.zst\n",
            Hash::sha256_of(b"f").to_nix32()
        )));
        assert!(text.contains("References: 7hmcr4m0qxnr5yb9mr37k2bw4ylp7wjc-a ap5lw0pk0i0b3nmpmqa5ryz3a9gd5yvc-c\n"), "{text}");
        let back = NarInfo::parse(&sd, &text).expect("parse back");
        assert_eq!(back, ni);
    }

    #[test]
    fn prepare_refuses_a_wrong_nar_hash_and_leaves_no_file() {
        let d = tempfile::tempdir().expect("dir");
        let store = d.path().join("store");
        std::fs::create_dir_all(&store).expect("store");
        let p = store.join("7hmcr4m0qxnr5yb9mr37k2bw4ylp7wjc-a");
        std::fs::write(&p, "hello\n").expect("write");
        let sd = StoreDir::new(store.to_string_lossy().to_string()).expect("sd");
        let mut nar = Vec::new();
        let (h, n) = ferry_nix::nar::dump_path_hashed(&p, &mut nar).expect("dump");
        let sh = Shared {
            store_dir: sd.clone(),
            store: LocalStore::default().with_store_dir(sd.clone()),
            targets: vec![],
            keys: vec![],
            levels: Levels::default(),
            work_dir: d.path().join("work"),
            present: Default::default(),
            initialised: Default::default(),
            busy: Default::default(),
            infos: Default::default(),
            uploads: crate::multipart::UploadLog::open_in_memory().expect("log"),
            multipart: Default::default(),
            compressing: tokio::sync::Semaphore::new(1),
        };
        let mut i = info_in(&sd, &p.to_string_lossy(), &[]);
        i.nar_hash = h;
        i.nar_size = n;
        let prep = prepare(&sh, &i, Compression::Zstd).expect("prepare");
        let z = std::fs::read(&prep.file).expect("read");
        assert_eq!(zstd::decode_all(&z[..]).expect("unzstd"), nar);
        assert_eq!(prep.narinfo.file_hash, Some(Hash::sha256_of(&z)));
        drop(prep);
        let prep = prepare(&sh, &i, Compression::Xz).expect("prepare xz");
        let x = std::fs::read(&prep.file).expect("read");
        let mut back = Vec::new();
        std::io::copy(&mut liblzma::read::XzDecoder::new(&x[..]), &mut back).expect("unxz");
        assert_eq!(back, nar);
        assert_eq!(prep.narinfo.file_hash, Some(Hash::sha256_of(&x)));
        assert_eq!(prep.narinfo.compression, "xz");
        assert!(
            prep.narinfo.url.ends_with(".nar.xz"),
            "{}",
            prep.narinfo.url
        );
        drop(prep);
        i.nar_size += 1;
        assert!(matches!(
            prepare(&sh, &i, Compression::Zstd),
            Err(PrepareError::Mismatch { .. })
        ));
        assert_eq!(
            std::fs::read_dir(d.path().join("work"))
                .expect("work")
                .count(),
            0
        );
    }
}
