//! The Debian package as an operator installs it: built from this build's binaries with
//! `scripts/deb`, installed with dpkg (files, the `thingsd` system user, the data directory,
//! the configuration as a conffile), its systemd unit checked by `systemd-analyze verify`, the
//! service started as the unit says — through systemd when systemd runs the machine, else the
//! unit's `ExecStart` as its `User` (CI containers have no systemd as PID 1) — on the packaged
//! configuration (listeners moved to free ports), healthy, stopped with SIGTERM, and purged.
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd} {args:?}: {text}");
    text
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The value of `key=` in the installed unit's [Service] section.
fn unit_value(unit: &str, key: &str) -> String {
    unit.lines().find_map(|l| l.strip_prefix(&format!("{key}="))).unwrap_or_else(|| panic!("the unit has no {key}=")).to_string()
}

#[test]
fn the_debian_package_installs_and_its_service_runs() {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let root = Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false);
    if !root || Command::new("dpkg-deb").arg("--version").output().is_err() {
        assert!(!ci, "CI runs as root on Debian: the package test must run there");
        eprintln!("SKIP: installing a Debian package needs root and dpkg");
        return;
    }
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_thingsd")).parent().unwrap().to_str().unwrap().to_string();
    let out = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/deb");
    let deb = run(script, &["--bin", &bin, "--out", out.path().to_str().unwrap(), "--fast"]).trim().lines().last().unwrap().to_string();
    let info = run("dpkg-deb", &["--info", &deb]);
    assert!(info.contains("Package: thingsd") && info.contains("Depends: adduser"), "{info}");
    let _ = Command::new("dpkg").args(["--purge", "thingsd"]).output();
    run("dpkg", &["-i", &deb]);
    // Removed again however the test ends.
    struct Purge;
    impl Drop for Purge {
        fn drop(&mut self) {
            let _ = Command::new("dpkg").args(["--purge", "thingsd"]).output();
        }
    }
    let _purge = Purge;

    let files = run("dpkg", &["-L", "thingsd"]);
    for f in ["/usr/bin/thingsd", "/usr/bin/thingsctl", "/lib/systemd/system/thingsd.service", "/etc/thingsd/thingsd.toml"] {
        assert!(files.lines().any(|l| l == f), "{f} is not in the package: {files}");
    }
    assert!(
        run("dpkg-query", &["-W", "-f=${Conffiles}", "thingsd"]).contains("/etc/thingsd/thingsd.toml"),
        "the configuration is a conffile"
    );
    assert!(run("getent", &["passwd", "thingsd"]).contains("/var/lib/thingsd"), "the system user");
    assert_eq!(run("stat", &["-c", "%U:%G %a", "/var/lib/thingsd"]).trim(), "thingsd:thingsd 750");
    assert_eq!(run("stat", &["-c", "%U:%G %a", "/etc/thingsd/thingsd.toml"]).trim(), "root:thingsd 640");
    run("systemd-analyze", &["verify", "/lib/systemd/system/thingsd.service"]);
    assert!(run("thingsctl", &["--help"]).to_lowercase().contains("usage"));

    // The packaged configuration, its listeners on free loopback ports.
    let (mqtt, ws, http, coap) = (free_port(), free_port(), free_port(), free_udp_port());
    let env = [
        ("THINGSD_LISTENERS__TCP", format!(r#"[{{bind="127.0.0.1:{mqtt}"}}]"#)),
        ("THINGSD_LISTENERS__WS", format!(r#"[{{bind="127.0.0.1:{ws}", path="/mqtt"}}]"#)),
        ("THINGSD_LISTENERS__HTTP", format!(r#"[{{bind="127.0.0.1:{http}"}}]"#)),
        ("THINGSD_LISTENERS__COAP", format!(r#"[{{bind="127.0.0.1:{coap}"}}]"#)),
    ];
    let unit = std::fs::read_to_string("/lib/systemd/system/thingsd.service").unwrap();
    let systemd = std::path::Path::new("/run/systemd/system").exists();
    let mut child = None;
    if systemd {
        let dropin = "/etc/systemd/system/thingsd.service.d";
        std::fs::create_dir_all(dropin).unwrap();
        let vars: String = env.iter().map(|(k, v)| format!("Environment='{k}={v}'\n")).collect();
        std::fs::write(format!("{dropin}/test-ports.conf"), format!("[Service]\n{vars}")).unwrap();
        run("systemctl", &["daemon-reload"]);
        run("systemctl", &["restart", "thingsd"]);
    } else {
        let exec = unit_value(&unit, "ExecStart");
        let mut parts = exec.split_whitespace();
        let mut c = Command::new("runuser");
        c.args(["-u", &unit_value(&unit, "User"), "--", parts.next().unwrap()])
            .args(parts)
            .current_dir(unit_value(&unit, "WorkingDirectory"))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped());
        let mut c = c.spawn().unwrap();
        // Its first lines until it is ready (the first start prints the admin's credentials).
        let mut lines = BufReader::new(c.stdout.take().unwrap()).lines();
        let ready = lines.by_ref().map_while(Result::ok).find(|l| l.contains("thingsd ready"));
        assert!(ready.is_some(), "the service ended before it was ready");
        std::thread::spawn(move || lines.for_each(drop));
        child = Some(c);
    }
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = std::net::TcpStream::connect(("127.0.0.1", http))
            .and_then(|mut s| {
                use std::io::{Read, Write};
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.write_all(b"GET /health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
                let mut r = String::new();
                s.read_to_string(&mut r)?;
                Ok(r.starts_with("HTTP/1.1 200"))
            })
            .unwrap_or(false);
        if ok {
            break;
        }
        assert!(Instant::now() < end, "the packaged service did not become ready on 127.0.0.1:{http}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Its state is in the data directory, owned by its user.
    assert_eq!(run("stat", &["-c", "%U", "/var/lib/thingsd/meta.db"]).trim(), "thingsd");
    if let Some(mut c) = child {
        // SIGTERM to the service's own process (as systemd would), not to runuser.
        let pid = run("pgrep", &["-P", &c.id().to_string()]);
        run("kill", &["-TERM", pid.trim()]);
        let end = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = c.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < end, "the service did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "the service's exit after SIGTERM: {status}");
    } else {
        run("systemctl", &["stop", "thingsd"]);
        let _ = std::fs::remove_dir_all("/etc/systemd/system/thingsd.service.d");
    }
    run("dpkg", &["--purge", "thingsd"]);
    assert!(!std::path::Path::new("/usr/bin/thingsd").exists());
}
