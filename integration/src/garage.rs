//! A Garage cluster on fleet hosts: a real distributed S3 store (replication, quorum writes
//! and reads) for the tests of S3 targets and upstreams. Garage is a test tool built by
//! `dev/garage` (AGPL-3.0, never linked into Ferry); each node runs on its own LAN host, one
//! zone per node, with every object on every node (replication factor = nodes): with three,
//! a write or a read needs two of them (Garage's default "consistent" mode).
//!
//! RPC time-outs are 1 s, as on a tuned LAN cluster: Garage sends a read to the nodes it
//! believes fastest, and a black-holed node is only declared down after several missed pings
//! 15 s apart (`garage_net/peering.rs`), so until then each read that picks it waits for the
//! RPC time-out (5 minutes by default) before asking another node.

use crate::{Fleet, run, wait_until};
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

pub const S3_PORT: u16 = 3900;
pub const RPC_PORT: u16 = 3901;
/// Garage's S3 region (`[s3_api] s3_region`); requests must be signed for it.
pub const REGION: &str = "garage";

/// The Garage binary: `FERRY_GARAGE`, else what `dev/garage` built.
pub fn garage_bin() -> Option<PathBuf> {
    let p = std::env::var_os("FERRY_GARAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/ferry/garage-2.5.0/bin/garage"));
    p.is_file().then_some(p)
}

pub struct Garage {
    pub bin: PathBuf,
    /// Fleet roles of the nodes (`garage0`…).
    pub roles: Vec<String>,
    pub addrs: Vec<String>,
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
}

/// 64 hex digits from the test's nonce and a label (not secret: a test cluster).
fn hex_id(seed: &str, label: &str, len: usize) -> String {
    use std::hash::{Hash, Hasher};
    let mut out = String::new();
    let mut i = 0u64;
    while out.len() < len {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (seed, label, i).hash(&mut h);
        out.push_str(&format!("{:016x}", h.finish()));
        i += 1;
    }
    out.truncate(len);
    out
}

impl Garage {
    /// Starts `n` nodes on new fleet hosts, joins them, applies a layout, and creates
    /// `bucket` with a read-write key.
    pub fn start(fleet: &mut Fleet, n: usize, bucket: &str) -> Result<Garage> {
        let bin = garage_bin().context("garage is not built (run dev/garage)")?;
        let seed = crate::nonce();
        let rpc_secret = hex_id(&seed, "rpc", 64);
        let mut g = Garage {
            bin,
            roles: Vec::new(),
            addrs: Vec::new(),
            bucket: bucket.to_owned(),
            key_id: format!("GK{}", hex_id(&seed, "key", 24)),
            secret: hex_id(&seed, "secret", 64),
        };
        for i in 0..n {
            let role = format!("garage{i}");
            let host = fleet.add_host(&role)?;
            let dir = host.dir.join("garage");
            std::fs::create_dir_all(&dir)?;
            let addr = host.addr.clone();
            let conf = format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = {n}\n\
                 rpc_bind_addr = \"{addr}:{RPC_PORT}\"\nrpc_public_addr = \"{addr}:{RPC_PORT}\"\n\
                 rpc_secret = \"{rpc_secret}\"\n\
                 rpc_timeout_msec = 1000\nrpc_ping_timeout_msec = 1000\n\
                 [s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"{addr}:{S3_PORT}\"\n\
                 root_domain = \".s3.garage\"\n",
                d = dir.display()
            );
            std::fs::write(dir.join("garage.toml"), conf)?;
            let log = std::fs::File::create(dir.join("garage.log"))?;
            let child = host
                .command(&g.bin.to_string_lossy())
                .arg("-c")
                .arg(dir.join("garage.toml"))
                .arg("server")
                .env("RUST_LOG", "garage=warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting garage")?;
            host.adopt(child);
            g.roles.push(role);
            g.addrs.push(addr);
        }
        for role in &g.roles {
            let host = fleet.host(role);
            wait_until(
                &format!("{role} to listen"),
                Duration::from_secs(20),
                || crate::listening(host, RPC_PORT) && crate::listening(host, S3_PORT),
            )?;
        }
        let mut ids = Vec::new();
        for i in 0..n {
            let out = run(g.cli(fleet, i).args(["node", "id", "-q"]))?;
            let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if !id.contains('@') {
                bail!("garage node id printed {id:?}");
            }
            ids.push(id);
        }
        for id in &ids[1..] {
            run(g.cli(fleet, 0).args(["node", "connect", id]))?;
        }
        for (i, id) in ids.iter().enumerate() {
            let short = &id[..16.min(id.len())];
            // Each node its own zone: replication factor 3 puts a copy in each.
            let zone = format!("z{i}");
            wait_until(
                &format!("garage node {i} known to node 0"),
                Duration::from_secs(20),
                || {
                    g.cli(fleet, 0)
                        .args(["layout", "assign", "-z", &zone, "-c", "1G", short])
                        .output()
                        .map(|o| o.status.success())
                        .unwrap_or(false)
                },
            )?;
        }
        run(g.cli(fleet, 0).args(["layout", "apply", "--version", "1"]))?;
        run(g.cli(fleet, 0).args([
            "key", "import", "--yes", "-n", "ferry", &g.key_id, &g.secret,
        ]))?;
        // The layout reaches every node within moments; bucket creation needs a quorum.
        let mut last = String::new();
        wait_until(
            "garage bucket creation",
            Duration::from_secs(30),
            || match g.cli(fleet, 0).args(["bucket", "create", bucket]).output() {
                Ok(o) if o.status.success() => true,
                Ok(o) => {
                    last = String::from_utf8_lossy(&o.stderr).into_owned();
                    false
                }
                Err(_) => false,
            },
        )
        .with_context(|| format!("last error: {last}"))?;
        run(g.cli(fleet, 0).args([
            "bucket", "allow", "--read", "--write", "--owner", bucket, "--key", "ferry",
        ]))?;
        Ok(g)
    }

    /// `garage -c <node i's config> …` on node i's host.
    pub fn cli(&self, fleet: &Fleet, i: usize) -> Command {
        let host = fleet.host(&self.roles[i]);
        let mut c = host.command(&self.bin.to_string_lossy());
        c.arg("-c").arg(host.dir.join("garage/garage.toml"));
        c.env("RUST_LOG", "warn");
        c
    }

    pub fn endpoint(&self, i: usize) -> String {
        format!("http://{}:{S3_PORT}", self.addrs[i])
    }

    /// Nix's `s3://` URL for the bucket through node `i`'s S3 API.
    pub fn s3_url(&self, i: usize) -> String {
        format!(
            "s3://{}?endpoint={}&region={REGION}",
            self.bucket,
            self.endpoint(i)
        )
    }

    /// Writes the key's id and secret into two files under `dir` (as a user would keep
    /// them); returns their paths.
    pub fn credential_files(&self, dir: &std::path::Path) -> Result<(PathBuf, PathBuf)> {
        let id = dir.join("garage-key-id");
        let secret = dir.join("garage-secret");
        std::fs::write(&id, format!("{}\n", self.key_id))?;
        std::fs::write(&secret, format!("{}\n", self.secret))?;
        Ok((id, secret))
    }

    /// Node `i` drops every incoming TCP packet (a node that is off or cut off).
    pub fn blackhole(&self, fleet: &Fleet, i: usize) -> Result<()> {
        crate::blackhole_host(fleet.host(&self.roles[i]))
    }
}
