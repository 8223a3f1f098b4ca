//! The HTTP benchmark driver (`scripts/bench_client.py`), run in the fleet client's namespace
//! (on the LAN, like a laptop), and the numbers of the JSON line it prints.

use ferry_integration::{Fleet, stdout_of};

/// Runs the driver with `args` and returns its JSON output line.
pub fn client_driver(fleet: &Fleet, args: &[&str]) -> String {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_client.py");
    let mut c = fleet.client.command("/usr/bin/python3");
    c.arg(script).args(args);
    stdout_of(c, "bench_client.py")
}

/// The number after `"key": ` in the driver's JSON line.
pub fn json_num(json: &str, key: &str) -> f64 {
    let pat = format!("\"{key}\": ");
    json.split(&pat)
        .nth(1)
        .and_then(|r| r.split([',', '}']).next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {json}"))
}
