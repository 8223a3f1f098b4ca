//! The rendered services run on the fleet: the substituter as a NAS and as a laptop's
//! loopback proxy, the hook offloading to a builder whose key is restricted as the `builder`
//! role renders it, and the uploader signing and uploading.

use super::*;

/// A NAS serves the LAN with the substituter exactly as the module renders it (listening on
/// every address, a loopback upstream: a signed cache on the NAS itself), and a laptop runs
/// the module's loopback substituter in front of the NAS with the rendered nix.conf (Ferry as
/// its only substituter, signatures required): `nix-store -r` substitutes the closure through
/// both, with no warning or retry.
#[test]
fn rendered_substituters_serve_a_laptop_through_a_nas() {
    use substituter_support::{add_producer, build_on_producer, copy_to_cache, generate_key};
    let h = harness_or_skip!("rendered_substituters_serve_a_laptop_through_a_nas");
    let ev = Evaluator::Native;
    let keys = tempfile::tempdir().expect("tempdir");
    let key = generate_key(keys.path(), "nas.lan-1");
    let mut fleet = Fleet::start(FleetConfig {
        builders: 0,
        ..Default::default()
    })
    .expect("fleet");
    add_producer(&mut fleet);
    let expr = substituter_support::producer_only_drv(&nonce(), 2000);
    let paths = build_on_producer(&fleet, &expr);
    let cache_dir = fleet.root.path().join("nas-cache");
    copy_to_cache(&fleet, &paths, &cache_dir, &key.secret, "zstd");

    // The NAS: its own cache served on 127.0.0.1:5000, Ferry on 0.0.0.0:37515 for the LAN.
    let nas = fleet.add_host("nas").expect("nas");
    let server = workspace_root().join("integration/scripts/fault_server.py");
    let child = nas
        .command("/usr/bin/python3")
        .arg(&server)
        .args(["good", "127.0.0.1", "5000"])
        .arg(&cache_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cache server");
    nas.adopt(child);
    wait_listening(nas, 5000).expect("cache server listens");
    let nas_conf = format!(
        "{{ services.ferry.substituter = {{ enable = true; address = \"0.0.0.0\"; openFirewall = true;\n\
         addToNixSettings = false; settings.trusted-public-keys = [ \"{k}\" ];\n\
         upstreams = [ {{ url = \"http://127.0.0.1:5000\"; priority = 30; publicKeys = [ \"{k}\" ]; }} ]; }}; }}",
        k = key.public
    );
    let r = eval_with(&ev, h, &nas_conf);
    no_failed_assertions(&r, "nas");
    assert_eq!(r["firewallTCP"], serde_json::json!([37515]));
    assert!(
        r["nixSettings"]["substituters"]
            .as_array()
            .is_some_and(|s| !s.iter().any(|u| u == "http://127.0.0.1:37515"))
    );
    let nas_addr = nas.addr.clone();
    let nas_ferry = start_rendered(&mut fleet, "nas", &r, h, "nas");

    // The laptop: the module's defaults (loopback), the NAS as its upstream, Ferry only.
    let laptop_conf = format!(
        "{{ services.ferry.substituter = {{ enable = true; replaceNixSubstituters = true;\n\
         upstreams = [ {{ url = \"http://{nas_addr}:37515\"; priority = 10; publicKeys = [ \"{k}\" ]; }} ]; }}; }}",
        k = key.public
    );
    let r = eval_with(&ev, h, &laptop_conf);
    no_failed_assertions(&r, "laptop");
    let nix_conf = r["nixConf"].as_str().expect("nixConf").to_owned();
    assert!(
        nix_conf.contains("substituters = http://127.0.0.1:37515\n"),
        "{nix_conf}"
    );
    assert!(nix_conf.contains(&key.public), "{nix_conf}");
    let laptop = fleet.add_client("laptop").expect("laptop");
    laptop
        .write_nix_conf(&format!("{nix_conf}require-sigs = true\n"))
        .expect("nix.conf");
    laptop.start_nix_daemon(&[]).expect("laptop daemon");
    let laptop_ferry = start_rendered(&mut fleet, "laptop", &r, h, "laptop");

    let laptop = fleet.host("laptop");
    let mut c = laptop.nix_command("nix-store");
    c.arg("-r").args(&paths);
    let t = Instant::now();
    let out = c.stdin(Stdio::null()).output().expect("nix-store -r");
    check(&out, "nix-store -r on the laptop").unwrap_or_else(|e| {
        panic!(
            "{e}\nnas ferry:\n{}\nlaptop ferry:\n{}",
            read(&nas_ferry),
            read(&laptop_ferry)
        )
    });
    // nix-store -r's reminder about GC roots is not about substitution.
    let stderr: String = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.contains("you did not specify '--add-root'"))
        .map(|l| format!("{l}\n"))
        .collect();
    substituter_support::assert_quiet(&stderr, "substitution through the rendered substituters");
    for p in &paths {
        assert!(laptop.has_store_path(p), "{p} not on the laptop");
        let mut v = laptop.nix_command("nix-store");
        v.args(["--verify-path", p]);
        run(&mut v).unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(
        stderr.contains("from 'http://127.0.0.1:37515'"),
        "not substituted from the laptop's Ferry:\n{stderr}"
    );
    eprintln!(
        "laptop substituted the closure of {} through two rendered Ferrys in {:?}",
        paths[0],
        t.elapsed()
    );
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Starts the rendered `ferry-substituter` service of `r` on host `role` (the NAS or a
/// laptop): its ExecStart and environment, with FERRY_CONFIG at the rendered file. Returns
/// the log path; the process belongs to the host and dies with the fleet.
fn start_rendered(fleet: &mut Fleet, role: &str, r: &Value, h: &Harness, tag: &str) -> PathBuf {
    let conf = h.dir.path().join(format!("ferry-{tag}-{}.toml", nonce()));
    std::fs::write(&conf, toml_text(r)).expect("ferry.toml");
    let argv = exec_start(r, "ferry-substituter");
    let host = fleet
        .others
        .iter_mut()
        .find(|x| x.role == role)
        .expect("host");
    let log = h.dir.path().join(format!("ferry-{tag}.log"));
    let logf = std::fs::File::create(&log).expect("log");
    let mut c = host.command(&argv[0]);
    c.args(&argv[1..]);
    for (k, v) in r["services"]["ferry-substituter"]["environment"]
        .as_object()
        .expect("environment")
    {
        c.env(k, v.as_str().unwrap_or_default());
    }
    assert_eq!(
        r["services"]["ferry-substituter"]["environment"]["FERRY_CONFIG"],
        "/etc/ferry/ferry.toml"
    );
    c.env("FERRY_CONFIG", &conf)
        .stdin(Stdio::null())
        .stdout(logf.try_clone().expect("log"))
        .stderr(logf);
    let child = c.spawn().expect("ferry-substituter");
    host.adopt(child);
    let port = r["ferryToml"]["substituter"]["listen"]
        .as_str()
        .and_then(|l| l.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .expect("port");
    wait_listening(host, port).unwrap_or_else(|e| panic!("{e}\n{}", read(&log)));
    log
}

/// The client side and the builder side as the module renders them, on the fleet: the client
/// daemon gets `build-hook` and `post-build-hook` from the rendered nix settings and the daemon
/// environment (NIX_CONFIG, which Nix 2.25–2.33 need), the machines file from
/// `lib.mkMachinesFile`, ferry.toml from the module; the builder accepts the client's key only
/// for the forced command the `builder` role renders; the rendered uploader signs and
/// uploads what the builder built to a `file://` cache.
#[test]
fn rendered_hook_builder_and_uploader_work_on_the_fleet() {
    let h = harness_or_skip!("rendered_hook_builder_and_uploader_work_on_the_fleet");
    let ev = Evaluator::Native;
    let work = tempfile::Builder::new()
        .prefix("ferry-nixos-fleet-")
        .tempdir()
        .expect("tempdir");
    let key = work.path().join("cache.sec");
    let public = ferry_integration::support::post_build::keygen("ferry-nixos-test-1", &key);
    let cache = work.path().join("cache");
    let state = work.path().join("state");
    let client_conf = format!(
        "{{ services.ferry.buildHook = {{ enable = true; settings.probe-timeout-ms = 2000; }};\n\
         services.ferry.postBuild = {{ enable = true; targets = [ \"file://{cache}\" ];\n\
           secretKeyFiles = [ \"{key}\" ]; settings = {{ state-dir = \"{state}\"; poll-ms = 50; }}; }}; }}",
        cache = cache.display(),
        key = key.display(),
        state = state.display()
    );
    let r = eval_with(&ev, h, &client_conf);
    no_failed_assertions(&r, "client");
    let toml = with_credentials(&r, &toml_text(&r), &work.path().join("credentials"));
    let conf = work.path().join("ferry.toml");
    std::fs::write(&conf, &toml).expect("ferry.toml");
    // The settings the module owns, as nix.conf lines.
    let settings = &r["nixSettings"];
    let nix_lines = format!(
        "build-hook = {}\npost-build-hook = {}\n",
        settings["build-hook"].as_str().expect("build-hook"),
        settings["post-build-hook"]
            .as_str()
            .expect("post-build-hook")
    );
    let mut daemon_env: Vec<(String, String)> = r["services"]["nix-daemon"]["environment"]
        .as_object()
        .expect("nix-daemon environment")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .collect();
    daemon_env.push(("FERRY_CONFIG".into(), conf.display().to_string()));
    let mut fleet = Fleet::start(FleetConfig {
        builders: 1,
        client_conf: nix_lines,
        daemon_env,
        ..Default::default()
    })
    .expect("fleet");

    // The builder as the `builder` role renders it: the client's key, forced command.
    let client_pub = std::fs::read_to_string(fleet.client_key.with_extension("pub")).expect("pub");
    let b = eval_with(
        &ev,
        h,
        &format!(
            "{{ services.ferry.builder = {{ enable = true; authorizedKeys = [ \"{}\" ]; }}; }}",
            client_pub.trim()
        ),
    );
    no_failed_assertions(&b, "builder");
    assert_eq!(b["sshd"], true);
    let user = &b["users"]["nix-builder"];
    assert_eq!(user["isSystemUser"], true);
    assert!(strs(&b["nixSettings"]["trusted-users"]).contains(&"nix-builder".to_owned()));
    let auth = strs(&user["openssh"]["authorizedKeys"]["keys"]).join("\n");
    assert!(
        auth.starts_with("restrict,command=\"/usr/bin/nix-store --serve --write\" "),
        "{auth}"
    );
    let bdir = fleet.builders[0].dir.clone();
    std::fs::write(bdir.join("authorized_keys"), format!("{auth}\n")).expect("authorized_keys");
    let sshd = std::fs::read_to_string(bdir.join("sshd_config")).expect("sshd_config");
    let sshd: String = sshd
        .lines()
        .map(|l| {
            if l.starts_with("AuthorizedKeysFile") {
                format!(
                    "AuthorizedKeysFile {}",
                    bdir.join("authorized_keys").display()
                )
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(bdir.join("sshd_config"), format!("{sshd}\n")).expect("sshd_config");
    fleet.stop_sshd(0).expect("stop sshd");
    fleet.start_sshd(0).expect("start sshd");

    // The machines file from lib.mkMachinesFile, with the builder's pinned host key.
    let line = fleet.machine_line(0).expect("machine line");
    let f: Vec<&str> = line.split_whitespace().collect();
    let m = eval_with(
        &ev,
        h,
        &format!(
            "{{ nix.distributedBuilds = true; nix.buildMachines = [ {{ hostName = \"{host}\"; sshUser = \"root\";\n\
             sshKey = \"{key}\"; system = \"{SYSTEM}\"; maxJobs = 2; publicHostKey = \"{pk}\"; }} ]; }}",
            host = fleet.builders[0].addr,
            key = f[2],
            pk = f[7]
        ),
    );
    std::fs::write(
        fleet.client.dir.join("etc-nix/machines"),
        m["machines"].as_str().expect("machines"),
    )
    .expect("machines");

    // The rendered uploader on the client.
    let argv = exec_start(&r, "ferry-post-build");
    let log = work.path().join("uploader.log");
    let logf = std::fs::File::create(&log).expect("log");
    let mut c = fleet.client.command(&argv[0]);
    c.args(&argv[1..]);
    for (k, v) in r["services"]["ferry-post-build"]["environment"]
        .as_object()
        .expect("environment")
    {
        c.env(k, v.as_str().unwrap_or_default());
    }
    let path: Vec<String> = strs(&r["services"]["ferry-post-build"]["path"])
        .iter()
        .map(|p| format!("{p}/bin"))
        .collect();
    c.env("PATH", format!("{}:/usr/bin:/bin", path.join(":")))
        .env("FERRY_CONFIG", &conf)
        .stdin(Stdio::null())
        .stdout(logf.try_clone().expect("log"))
        .stderr(logf);
    let mut uploader = c.spawn().expect("uploader");

    let expr = trivial_drv(&nonce(), "nixos-module");
    let out = fleet.nix_build(&expr, &["-j0"]);
    let result = check(&out, "remote build through the rendered hook");
    if let Err(e) = result {
        let _ = uploader.kill();
        let _ = uploader.wait();
        panic!(
            "{e}\ndaemon log:\n{}\nsshd log:\n{}",
            fleet.daemon_log(),
            read(&bdir.join("log/sshd.log"))
        );
    }
    let built = out_paths(&out);
    assert!(
        fleet.builders[0].has_store_path(&built[0]),
        "not built on the builder"
    );
    let narinfo = cache.join(format!(
        "{}.narinfo",
        &built[0]["/nix/store/".len()..][..32]
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !narinfo.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = uploader.kill();
    let _ = uploader.wait();
    let text = std::fs::read_to_string(&narinfo)
        .unwrap_or_else(|e| panic!("{}: {e}\nuploader log:\n{}", narinfo.display(), read(&log)));
    assert!(text.contains("Sig: ferry-nixos-test-1:"), "{text}");
    // Nix checks the cache: NAR hash and the signature of the key the credential carried.
    ferry_integration::support::post_build::verify_cache(
        fleet.client_command("nix"),
        &format!("file://{}", cache.display()),
        &public,
        &built[..1],
        "the file:// cache",
    );
}
