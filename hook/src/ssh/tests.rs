use super::*;
use ferry_nix::machines::parse_builders_setting;

fn machine(spec: &str) -> Machine {
    parse_builders_setting(spec, "x86_64-linux")
        .expect("machine")
        .remove(0)
}

#[test]
fn remote_command_honours_store_parameters() {
    assert_eq!(
        remote_command(&machine("ssh://h")),
        ["nix-store", "--serve", "--write"]
    );
    assert_eq!(
        remote_command(&machine(
            "ssh://h?remote-store=/tmp/s&remote-program=/opt/bin/nix-store"
        )),
        [
            "/opt/bin/nix-store",
            "--serve",
            "--write",
            "--store",
            "'/tmp/s'"
        ]
    );
}

/// Issue 12 item 10: `remote-store` reaches the remote shell as one word, whatever it
/// holds; before, `…?remote-store=$(touch${IFS}/tmp/x)` ran `touch` on the builder.
#[test]
fn remote_store_is_shell_escaped() {
    let cmd = remote_command(&machine("ssh://h?remote-store=/s$(touch${IFS}/tmp/x)'y"));
    assert_eq!(cmd[3..], ["--store", r"'/s$(touch${IFS}/tmp/x)'\''y'"]);
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("printf '%s\\n' {}", cmd[4]))
        .output()
        .expect("sh");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "/s$(touch${IFS}/tmp/x)'y\n"
    );
}

/// Issue 12 item 10: every ssh command line has `--` before the host, so a machines
/// entry `ssh://-oProxyCommand=…` is a (bad) host name and not an option that runs a
/// command as the daemon's user.
#[tokio::test]
async fn the_host_follows_a_double_dash() {
    let tmp = tempfile::tempdir().expect("tmp");
    let log = tmp.path().join("args");
    let fake = tmp.path().join("ssh");
    std::fs::write(
        &fake,
        format!(
            // One write per run: the hook may run two ssh commands at once (the master and
            // `ssh -G`), and lines appended one by one interleaved in the log.
            "#!/bin/sh\nrun=''\nfor a in \"$@\"; do run=\"$run$a\n\"; done\nprintf '%sEND\\n' \"$run\" >> {}\nexit 255\n",
            log.display()
        ),
    )
    .expect("fake ssh");
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let mut ssh = OpenSsh::new(tmp.path().join("ctl"), None);
    ssh.program = fake.display().to_string();
    let m = machine("ssh://-oProxyCommand=touch${IFS}pwned");
    let _ = ssh.connect(&m).await;
    ssh.drop_master(&m).await;
    let text = std::fs::read_to_string(&log).expect("ssh was run");
    let runs: Vec<Vec<&str>> = text
        .split("END\n")
        .filter(|r| !r.is_empty())
        .map(|r| r.lines().collect())
        .collect();
    assert!(!runs.is_empty());
    for args in runs {
        let at = args
            .iter()
            .position(|a| *a == "-oProxyCommand=touch${IFS}pwned")
            .expect("the host");
        assert_eq!(args.get(at.wrapping_sub(1)), Some(&"--"), "{args:?}");
    }
}

#[test]
fn failures_are_described_in_one_line() {
    assert_eq!(
        describe_failure(
            "Warning: Permanently added 'h' to the list of known hosts.\n\
                 root@h: Permission denied (publickey).",
            Some(255)
        ),
        "root@h: Permission denied (publickey)."
    );
    assert_eq!(
        describe_failure("", Some(255)),
        "ssh exited with status 255"
    );
}

#[test]
fn aes_gcm_goes_first_only_when_offered() {
    assert_eq!(
        aes_gcm_first(
            "chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr,\
                 aes128-gcm@openssh.com,aes256-gcm@openssh.com"
        )
        .as_deref(),
        Some(
            "aes128-gcm@openssh.com,aes256-gcm@openssh.com,\
                 chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr"
        )
    );
    assert_eq!(
        aes_gcm_first("chacha20-poly1305@openssh.com,aes128-ctr"),
        None
    );
    assert_eq!(
        ciphers_line(b"user root\nciphers a,b\nmacs c\n").as_deref(),
        Some("a,b")
    );
    assert_eq!(ciphers_line(b"user root\n"), None);
    let words = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    assert!(opts_choose_ciphers(&words("-p 22 -c aes256-ctr")));
    assert!(opts_choose_ciphers(&words("-oCiphers=aes256-ctr")));
    assert!(opts_choose_ciphers(&words("-o Ciphers=aes256-ctr")));
    assert!(!opts_choose_ciphers(&words("-p 22 -oCompression=yes")));
}

/// A `Ciphers` line in the user's configuration is kept: no preference is added.
#[test]
fn configured_ciphers_are_kept() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let tmp = tempfile::tempdir().expect("tmp");
    let conf = tmp.path().join("config");
    std::fs::write(&conf, "Host *\n  Ciphers aes256-ctr\n").expect("config");
    let ssh = OpenSsh::new(tmp.path().to_owned(), None);
    let common = ["-F".to_owned(), conf.display().to_string()];
    assert_eq!(rt.block_on(ssh.cipher_preference("h", &common)), None);
    let plain = rt.block_on(ssh.cipher_preference("h", &[]));
    if aes_in_hardware() {
        let p = plain.expect("a preference");
        assert!(p.starts_with("-oCiphers=aes128-gcm@openssh.com,"), "{p}");
    } else {
        assert_eq!(plain, None);
    }
    let forced = OpenSsh::new(tmp.path().to_owned(), Some("-c aes256-ctr"));
    assert_eq!(rt.block_on(forced.cipher_preference("h", &[])), None);
}

#[test]
fn control_names_are_short_and_depend_on_credentials() {
    let ssh = OpenSsh::new(PathBuf::from("/nix/var/nix/ferry/ssh"), Some("-p 22"));
    assert_eq!(ssh.extra_opts, ["-p", "22"]);
    let a = ssh.key(&machine("ssh://root@h"), "root@h");
    let b = ssh.key(&machine("ssh://root@h - /k"), "root@h");
    assert_eq!(a.len(), 20);
    assert_ne!(a, b);
    assert!(ssh.socket(&a).as_os_str().len() < 100);
}

#[test]
fn a_missing_ssh_program_is_named() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let tmp = tempfile::tempdir().expect("tmp");
    let mut ssh = OpenSsh::new(tmp.path().to_owned(), None);
    ssh.program = "/nonexistent/ssh".into();
    let e = rt
        .block_on(ssh.connect(&machine("ssh://h")))
        .err()
        .expect("no ssh");
    assert!(e.to_string().contains("/nonexistent/ssh"), "{e}");
    let e = rt
        .block_on(ssh.connect(&machine("ssh-ng://h")))
        .err()
        .expect("not ssh://");
    assert!(e.to_string().contains("ssh-ng://h"), "{e}");
}
