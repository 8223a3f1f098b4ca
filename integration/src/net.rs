//! Network faults (black holes, healing) and servers on fleet hosts (nginx), and whether a
//! port listens.

use crate::host::Host;
use crate::process::{run, wait_until};
use anyhow::{Context, Result};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Whether something listens on TCP `port` in `host`'s network namespace.
pub fn listening(host: &Host, port: u16) -> bool {
    listeners(host, port) == Some(true)
}

/// Whether nothing listens on TCP `port` in `host`'s network namespace, as `ss` says (a failed
/// `ss` proves nothing).
pub fn not_listening(host: &Host, port: u16) -> bool {
    listeners(host, port) == Some(false)
}

/// What `ss` says of listeners on `port` in `host`'s namespace; `None` if it could not say.
fn listeners(host: &Host, port: u16) -> Option<bool> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &host.netns,
            "ss",
            "-Hltn",
            "sport",
            "=",
            &format!(":{port}"),
        ])
        .output()
        .ok()?;
    out.status.success().then_some(!out.stdout.is_empty())
}

/// Fault: `host` drops every incoming TCP packet (a machine that is off or cut off).
pub fn blackhole_host(host: &Host) -> Result<()> {
    drop_incoming(host, None, &[])
}

/// Fault: `host` drops every incoming TCP packet to `port` (connections hang).
/// [`heal_host`] undoes it.
pub fn blackhole_port(host: &Host, port: u16) -> Result<()> {
    drop_incoming(host, Some(port), &[])
}

/// Adds an iptables rule on `host` that drops incoming TCP packets to `port` (every port:
/// `None`) which also satisfy `matches` (none: every packet).
pub(crate) fn drop_incoming(host: &Host, port: Option<u16>, matches: &[&str]) -> Result<()> {
    let port = port.map(|p| p.to_string());
    let mut args = vec![
        "netns",
        "exec",
        &host.netns,
        "iptables",
        "-w",
        "-A",
        "INPUT",
        "-p",
        "tcp",
    ];
    if let Some(p) = &port {
        args.extend(["--dport", p.as_str()]);
    }
    args.extend_from_slice(matches);
    args.extend(["-j", "DROP"]);
    run(Command::new("ip").args(&args)).map(|_| ())
}

/// Fault: `host`'s outgoing link is slow, shaped to `rate` (a `tc` rate such as `50mbit`)
/// with a token bucket of `burst` (`tc netem` would also give delay, but the kernels of this
/// machine kind ship without `sch_netem`). [`heal_host`] undoes it.
pub fn throttle_host(host: &Host, rate: &str, burst: &str) -> Result<()> {
    let ns = &host.netns;
    run(Command::new("ip").args([
        "netns",
        "exec",
        ns,
        "tc",
        "qdisc",
        "replace",
        "dev",
        "to-client",
        "root",
        "tbf",
        "rate",
        rate,
        "burst",
        burst,
        "latency",
        "2s",
    ]))
    .map(|_| ())
}

/// Removes every packet filter and traffic shaper from `host`.
pub fn heal_host(host: &Host) -> Result<()> {
    let ns = &host.netns;
    run(Command::new("ip").args(["netns", "exec", ns, "iptables", "-w", "-F", "INPUT"]))?;
    let _ = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "tc",
            "qdisc",
            "del",
            "dev",
            "to-client",
            "root",
        ])
        .output();
    Ok(())
}

/// Waits until `host` listens on TCP `port`.
pub fn wait_listening(host: &Host, port: u16) -> Result<()> {
    wait_until(
        &format!("{} to listen on {port}", host.role),
        Duration::from_secs(10),
        || listening(host, port),
    )
}

/// An nginx configuration that serves `www` on `addr:port` in the foreground, with its pid,
/// logs and temporary files under `dir`, and `location` as the body of `location / { }`.
pub fn nginx_conf(dir: &Path, addr: &str, port: u16, www: &Path, location: &str) -> String {
    format!(
        "daemon off;\nuser root;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 512; }}\n\
         http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n\
         \x20 fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n\
         \x20 server {{\n    listen {addr}:{port};\n    root {www};\n    client_max_body_size 0;\n\
         \x20   location / {{\n      {location}    }}\n  }}\n}}\n",
        d = dir.display(),
        www = www.display(),
    )
}

/// Starts a real nginx on `host` serving `www` on `host.addr:port` (a binary cache as users
/// run it), accepting WebDAV `PUT` when `allow_put` (an upload target). Waits until it listens.
pub fn start_nginx(host: &mut Host, port: u16, www: &Path, allow_put: bool) -> Result<()> {
    let dir = host.dir.join(format!("nginx-{port}"));
    std::fs::create_dir_all(dir.join("tmp"))?;
    std::fs::create_dir_all(www)?;
    let put = if allow_put {
        "dav_methods PUT;\n      create_full_put_path on;\n      dav_access user:rw group:r all:r;\n"
    } else {
        ""
    };
    let conf = nginx_conf(&dir, &host.addr, port, www, put);
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let child = host
        .command("nginx")
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nginx")?;
    host.adopt(child);
    wait_listening(host, port)
}
