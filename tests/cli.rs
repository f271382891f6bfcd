//! The `thingsd` command line: `config` prints the effective configuration; bad configuration
//! is a clear error naming the key and line (file) or the variable (environment).
use std::process::Command;

fn thingsd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_thingsd"));
    c.current_dir(std::env::temp_dir());
    c
}

#[test]
fn config_subcommand_and_errors() {
    let out = thingsd().arg("config").env("THINGSD_MQTT__MAX_INFLIGHT", "42").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("[mqtt]") && text.contains("max_inflight = 42"), "{text}");
    assert!(text.contains("bind = \"0.0.0.0:1883\""), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    std::fs::write(&f, "[node]\nname = \"x\"\n\n[mqtt]\nmax_inflihgt = 5\n").unwrap();
    let out = thingsd().arg("--config").arg(&f).arg("config").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("max_inflihgt") && err.contains("line 5") && err.contains("bad.toml"), "{err}");

    std::fs::write(&f, "[mqtt]\nmax_connections = -3\n").unwrap();
    let out = thingsd().arg("--config").arg(&f).arg("config").output().unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success() && err.contains("line 2"), "{err}");

    let out = thingsd().arg("config").env("THINGSD_MQTT__SHARDZ", "3").output().unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success() && err.contains("THINGSD_MQTT__SHARDZ"), "{err}");

    let out = thingsd().arg("--config").arg(dir.path().join("missing.toml")).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
}
