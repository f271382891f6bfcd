//! The fleet scenario, small, as a test: three nodes behind HAProxy with PostgreSQL (meta and
//! telemetry) and Redis, 200 devices in three generator processes (one HAProxy each) logging in with their tokens, telemetry every second,
//! commands through the REST API, one node killed with SIGKILL, then a rolling restart. Every
//! device must come back through the balancer, every node must rejoin (seeing and seen by its
//! peers), every command must arrive and every acknowledged point must be stored.
use std::process::Command;

#[test]
fn a_small_fleet_survives_a_node_kill_and_a_rolling_restart() {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    for (var, what) in [("TEST_PG_URL", "PostgreSQL"), ("TEST_REDIS_URL", "Redis")] {
        if std::env::var(var).map_or(true, |v| v.is_empty()) {
            assert!(!ci, "{what} is missing in CI (${var}); scripts/test starts it");
            eprintln!("SKIP: {what} not available (${var} unset; scripts/test starts one)");
            return;
        }
    }
    if !std::path::Path::new("/usr/sbin/haproxy").exists() {
        assert!(!ci, "/usr/sbin/haproxy is missing in CI; scripts/test installs it");
        eprintln!("SKIP: /usr/sbin/haproxy not installed (apt-get install haproxy)");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(["--scenario", "fleet", "--devices", "200", "--period", "1", "--commands", "50"])
        // Three generator processes (and HAProxies), as the large fleet runs.
        .env("LOADTEST_FLEET_PER_WORKER", "80")
        .output()
        .expect("run loadtest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{report}");
    assert!(stdout.contains("(3 generator processes"), "{report}");
    assert!(stdout.contains("50 sent") && stdout.contains("50 delivered"), "every command arrives: {report}");
    assert!(stdout.contains("all connected again"), "the killed node's devices come back: {report}");
    assert!(stdout.contains("(none lost)"), "every acknowledged point is stored: {report}");
    // The killed node and then every node in turn (a rolling restart) come back, see all
    // their peers up and are seen by them.
    assert!(stdout.contains("started again and rejoined"), "the killed node rejoins: {report}");
    assert_eq!(stdout.matches("SIGTERM -> rejoined").count(), 3, "each node rejoins after its restart: {report}");
}
