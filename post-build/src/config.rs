//! The `[post-build]` section of `/etc/ferry/ferry.toml` and the settings derived from it.
//!
//! ```toml
//! [post-build]
//! targets = ["file:///var/cache/nix?compression=xz", "https://cache.example/upload",
//!            "s3://my-cache?endpoint=http://minio.lan:9000&region=us-east-1"]
//! secret-key-files = ["/etc/nix/cache-key.sec"]
//! state-dir = "/var/lib/ferry/post-build"
//! concurrency = 4
//! compression = "zstd"          # default for targets whose URL has no ?compression=
//! xz-level = 6                  # for xz targets (Nix's preset)
//! # S3 targets (s3://bucket?endpoint=…&region=…): secrets only by file path.
//! access-key-id-file = "/etc/ferry/s3-access-key-id"
//! secret-access-key-file = "/etc/ferry/s3-secret-access-key"
//! ```

use crate::compress::Compression;
use ferry_nix::store_path::StoreDir;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub(crate) const DEFAULT_STATE_DIR: &str = "/var/lib/ferry/post-build";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub(crate) struct PostBuildConfig {
    /// Upload targets: `file:///dir`, `http://…`, `https://…` (PUT), `s3://bucket?…` (S3
    /// API). Every path goes to all. Each may add `?compression=zstd|xz|none`.
    pub(crate) targets: Vec<String>,
    /// Nix secret key files (`nix key generate-secret` or `ferry-post-build keygen`); every
    /// narinfo is signed with each. Imported outputs carry no signature of the host's key
    /// (`build-remote.cc` copies with `NoCheckSigs` and never signs), so the uploader must.
    pub(crate) secret_key_files: Vec<PathBuf>,
    /// Spool, queue database, temporary NARs. The hook writes here as root.
    pub(crate) state_dir: PathBuf,
    /// The Nix store directory; default `NIX_STORE_DIR` or `/nix/store`.
    pub(crate) store_dir: Option<String>,
    /// Nix's state directory, for GC roots; default `NIX_STATE_DIR` or `/nix/var/nix`.
    pub(crate) nix_state_dir: Option<PathBuf>,
    /// Protect queued paths from garbage collection with a root under
    /// `<nix-state-dir>/gcroots/ferry/` until they are uploaded.
    pub(crate) gc_roots: bool,
    /// Jobs uploaded at once. Uploads are compression-bound (zstd −3 ≈ 123 MiB/s/core), so
    /// about the number of cores is enough.
    pub(crate) concurrency: usize,
    /// Default NAR compression (a target's `?compression=` overrides it).
    pub(crate) compression: Compression,
    /// S3 access key id, read from this file. Without these two, S3 targets use
    /// `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` or the shared credentials file.
    pub(crate) access_key_id_file: Option<PathBuf>,
    /// S3 secret access key, read from this file (never put secrets in ferry.toml itself).
    pub(crate) secret_access_key_file: Option<PathBuf>,
    /// zstd level; 3 is zstd's default and Cachix/niks3's choice (ratio 0.40 at 123 MiB/s).
    pub(crate) zstd_level: i32,
    /// xz preset (0–9) for `xz` targets; 6 is Nix's.
    pub(crate) xz_level: u32,
    /// zstd worker threads per NAR: 0 means one per core (up to 8), so that one large path
    /// uses every core; 1 compresses each NAR on the job's own thread (several jobs still
    /// run side by side, see `concurrency`). NARs under 16 MiB always use one thread.
    pub(crate) zstd_threads: u32,
    /// First retry delay of a job that failed for a transient reason, in milliseconds;
    /// doubles per attempt. Permanent failures are not retried: they wait in the dead
    /// letters for `ferry-post-build retry` (see `failure`).
    pub(crate) retry_initial_ms: u64,
    /// Longest retry delay, in seconds (15 min like niks3's batch back-off).
    pub(crate) retry_max_secs: u64,
    /// How often the uploader looks for new spool files, in milliseconds.
    pub(crate) poll_ms: u64,
    /// Connect time-out for HTTP targets, in seconds: a blackholed cache must not hold a
    /// worker for the kernel's two minutes.
    pub(crate) connect_timeout_secs: u64,
    /// NARs of at least this many MiB go to `s3://` targets as multipart uploads (resumable
    /// part by part after a restart; S3 refuses single PUTs over 5 GiB).
    pub(crate) multipart_threshold_mib: u64,
    /// Size of each part, in MiB (S3: at least 5; grown when a NAR would need more than
    /// 10,000 parts).
    pub(crate) multipart_part_mib: u64,
    /// Parts of one NAR in flight at once. Parts stream from the work file, so memory does
    /// not grow with this or with the part size.
    pub(crate) multipart_parallel: usize,
}

impl Default for PostBuildConfig {
    fn default() -> Self {
        PostBuildConfig {
            targets: Vec::new(),
            secret_key_files: Vec::new(),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            store_dir: None,
            nix_state_dir: None,
            gc_roots: true,
            concurrency: 4,
            compression: Compression::Zstd,
            access_key_id_file: None,
            secret_access_key_file: None,
            zstd_level: 3,
            xz_level: 6,
            zstd_threads: 0,
            retry_initial_ms: 1000,
            retry_max_secs: 900,
            poll_ms: 200,
            connect_timeout_secs: 5,
            multipart_threshold_mib: 64,
            multipart_part_mib: 16,
            multipart_parallel: 4,
        }
    }
}

/// Settings resolved from the config and the environment.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) config: PostBuildConfig,
    pub(crate) store_dir: StoreDir,
    pub(crate) nix_state_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SettingsError {
    #[error(transparent)]
    Config(#[from] ferry_nix::config::ConfigError),
    #[error("store directory {0:?} is not an absolute path")]
    StoreDir(String),
    #[error("concurrency must be at least 1")]
    Concurrency,
    #[error("zstd level {0} is outside 1..=19")]
    ZstdLevel(i32),
    #[error("xz level {0} is outside 0..=9")]
    XzLevel(u32),
    #[error("multipart-part-mib = {0}: S3 parts are 5 to 5120 MiB")]
    PartSize(u64),
    #[error(
        "multipart-threshold-mib = {0}: must be at least 5 (S3's smallest part) and at most 5120 (its largest single PUT)"
    )]
    Threshold(u64),
    #[error("multipart-parallel must be at least 1")]
    Parallel,
}

impl Settings {
    pub(crate) fn load(path: &Path) -> Result<Settings, SettingsError> {
        let config: PostBuildConfig = ferry_nix::config::load_section(path, "post-build")?;
        Self::resolve(config)
    }

    pub(crate) fn resolve(config: PostBuildConfig) -> Result<Settings, SettingsError> {
        let store = config
            .store_dir
            .clone()
            .or_else(|| {
                std::env::var("NIX_STORE_DIR")
                    .ok()
                    .filter(|s| !s.is_empty())
            })
            .unwrap_or_else(|| "/nix/store".to_owned());
        let store_dir = StoreDir::new(store.clone()).map_err(|_| SettingsError::StoreDir(store))?;
        let nix_state_dir = config
            .nix_state_dir
            .clone()
            .or_else(|| {
                std::env::var_os("NIX_STATE_DIR")
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
            })
            .unwrap_or_else(|| PathBuf::from("/nix/var/nix"));
        if !(5..=5120).contains(&config.multipart_part_mib) {
            return Err(SettingsError::PartSize(config.multipart_part_mib));
        }
        if !(5..=5120).contains(&config.multipart_threshold_mib) {
            return Err(SettingsError::Threshold(config.multipart_threshold_mib));
        }
        if config.multipart_parallel == 0 {
            return Err(SettingsError::Parallel);
        }
        if config.concurrency == 0 {
            return Err(SettingsError::Concurrency);
        }
        if !(1..=19).contains(&config.zstd_level) {
            return Err(SettingsError::ZstdLevel(config.zstd_level));
        }
        if config.xz_level > 9 {
            return Err(SettingsError::XzLevel(config.xz_level));
        }
        Ok(Settings {
            config,
            store_dir,
            nix_state_dir,
        })
    }

    pub(crate) fn spool_dir(&self) -> PathBuf {
        self.config.state_dir.join("spool")
    }

    pub(crate) fn queue_db(&self) -> PathBuf {
        self.config.state_dir.join("queue.sqlite")
    }

    pub(crate) fn work_dir(&self) -> PathBuf {
        self.config.state_dir.join("work")
    }

    pub(crate) fn multipart(&self) -> crate::multipart::MultipartSettings {
        crate::multipart::MultipartSettings {
            threshold: self.config.multipart_threshold_mib << 20,
            part_size: self.config.multipart_part_mib << 20,
            parallel: self.config.multipart_parallel,
        }
    }

    pub(crate) fn gc_roots_dir(&self) -> PathBuf {
        self.nix_state_dir.join("gcroots").join("ferry")
    }

    /// NARs compressed at once: one per core. More contexts than cores time-slice several
    /// zstd contexts (each a few MiB of tables and window) through the same caches: on one
    /// core three at a time cost 19% more CPU per GiB than one, and on two cores three cost
    /// about 5% more than two (10.6–10.8 against 9.8–10.6 CPU s/GiB on 1 GiB of 4 MiB paths,
    /// post-build/README.md). Small NARs compress on their job's thread, so no core waits on
    /// a hand-off to zstd's workers.
    pub(crate) fn compress_slots(&self) -> usize {
        cores()
    }

    pub(crate) fn levels(&self) -> crate::compress::Levels {
        crate::compress::Levels {
            zstd: self.config.zstd_level,
            zstd_threads: match self.config.zstd_threads {
                0 => cores().min(8) as u32,
                n => n,
            },
            xz: self.config.xz_level,
        }
    }

    pub(crate) fn target_options(&self) -> crate::target::TargetOptions {
        crate::target::TargetOptions {
            connect_timeout: Duration::from_secs(self.config.connect_timeout_secs.max(1)),
            compression: self.config.compression,
            access_key_id_file: self.config.access_key_id_file.clone(),
            secret_access_key_file: self.config.secret_access_key_file.clone(),
        }
    }

    pub(crate) fn retry_policy(&self) -> crate::retry::RetryPolicy {
        crate::retry::RetryPolicy {
            initial: Duration::from_millis(self.config.retry_initial_ms.max(1)),
            max: Duration::from_secs(self.config.retry_max_secs.max(1)),
        }
    }
}

/// The cores this process may run on: its CPU affinity (`taskset`, systemd's `CPUAffinity=`),
/// not the machine's count.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn section_parses_and_typos_are_named() {
        let text = "[post-build]\ntargets = [\"file:///tmp/c\"]\ncompression = \"none\"\nconcurrency = 2\n";
        let c: PostBuildConfig =
            ferry_nix::config::parse_section(text, Path::new("f.toml"), "post-build").expect("ok");
        assert_eq!(c.targets, vec!["file:///tmp/c"]);
        assert_eq!(c.compression, Compression::None);
        assert_eq!(c.concurrency, 2);
        assert!(c.gc_roots);
        let e = ferry_nix::config::parse_section::<PostBuildConfig>(
            "[post-build]\n\ntarget = []\n",
            Path::new("f.toml"),
            "post-build",
        )
        .expect_err("typo");
        assert!(e.to_string().contains("f.toml line 3"), "{e}");
    }

    #[test]
    fn multipart_settings_are_checked_and_named() {
        let bad = |c: PostBuildConfig| Settings::resolve(c).expect_err("bad").to_string();
        let e = bad(PostBuildConfig {
            multipart_part_mib: 4,
            ..Default::default()
        });
        assert!(e.contains("multipart-part-mib = 4"), "{e}");
        let e = bad(PostBuildConfig {
            multipart_threshold_mib: 6000,
            ..Default::default()
        });
        assert!(e.contains("multipart-threshold-mib = 6000"), "{e}");
        let e = bad(PostBuildConfig {
            multipart_parallel: 0,
            ..Default::default()
        });
        assert!(e.contains("multipart-parallel"), "{e}");
        let s = Settings::resolve(PostBuildConfig {
            multipart_threshold_mib: 8,
            multipart_part_mib: 5,
            multipart_parallel: 2,
            ..Default::default()
        })
        .expect("ok");
        assert_eq!(
            s.multipart(),
            crate::multipart::MultipartSettings {
                threshold: 8 << 20,
                part_size: 5 << 20,
                parallel: 2
            }
        );
    }

    #[test]
    fn resolve_checks_values() {
        let c = PostBuildConfig {
            concurrency: 0,
            ..Default::default()
        };
        assert!(matches!(
            Settings::resolve(c),
            Err(SettingsError::Concurrency)
        ));
        let c = PostBuildConfig {
            store_dir: Some("relative".into()),
            ..Default::default()
        };
        assert!(matches!(
            Settings::resolve(c),
            Err(SettingsError::StoreDir(_))
        ));
        let s = Settings::resolve(PostBuildConfig {
            store_dir: Some("/s".into()),
            nix_state_dir: Some("/v".into()),
            ..Default::default()
        })
        .expect("ok");
        assert_eq!(s.gc_roots_dir(), PathBuf::from("/v/gcroots/ferry"));
    }
}
