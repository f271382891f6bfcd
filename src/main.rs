//! `thingsd` binary: run a node, or print the effective configuration.
use std::path::PathBuf;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

/// mimalloc: per-thread free lists without glibc's arena locks (malloc and free were half of
/// the node's CPU under telemetry load), and freed pages go back to the system shortly after a
/// connection storm instead of staying in glibc's arenas. Measured in loadtest/README.md.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn usage() -> ! {
    eprintln!("usage: thingsd [--config FILE] [config]\n  config   print the effective configuration and exit\n  thingsd dev-cluster [--nodes N] [--dir DIR] [--write-only]   run N local nodes on free ports\n  thingsd hash-password [PASSWORD]   argon2 hash for devices.services (reads stdin without an argument)\n  With no --config, ./cluster.toml is used if it exists; otherwise built-in defaults.");
    std::process::exit(2)
}

fn main() -> anyhow::Result<()> {
    let all: Vec<String> = std::env::args().skip(1).collect();
    if all.first().map(String::as_str) == Some("dev-cluster") {
        return thingsd::dev::main(&all[1..]);
    }
    if all.first().map(String::as_str) == Some("hash-password") {
        // For `devices.services[].password_hash`: the password from the argument or stdin.
        let pw = match all.get(1) {
            Some(p) => p.clone(),
            None => {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line).context("read the password from stdin")?;
                line.trim_end_matches(['\r', '\n']).to_string()
            }
        };
        anyhow::ensure!(!pw.is_empty(), "empty password");
        println!("{}", thingsd::devices::hash_password(pw.as_bytes()));
        return Ok(());
    }
    let mut args = std::env::args().skip(1);
    let mut config_path: Option<PathBuf> = None;
    let mut print = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" | "-c" => config_path = Some(args.next().map(PathBuf::from).unwrap_or_else(|| usage())),
            "config" => print = true,
            "--help" | "-h" => usage(),
            _ => usage(),
        }
    }
    if config_path.is_none() && std::path::Path::new("cluster.toml").exists() {
        config_path = Some("cluster.toml".into());
    }
    let config = match thingsd::config::Config::load(config_path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("thingsd: configuration error: {e}");
            std::process::exit(1);
        }
    };
    if print {
        print!("{}", config.to_toml());
        return Ok(());
    }
    // ractor_cluster logs every link handshake at info; ours (cluster member up/down) suffice.
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| format!("ractor_cluster=warn,{}", config.log.level));
    // Colours only on a terminal (not in files and journald); NO_COLOR is honoured too.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout()) && std::env::var_os("NO_COLOR").is_none();
    let fmt = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::new(filter)).with_target(false).with_ansi(ansi);
    match config.log.format {
        thingsd::config::LogFormat::Text => fmt.init(),
        thingsd::config::LogFormat::Json => fmt.json().with_current_span(true).with_span_list(false).init(),
    }
    // Client connections beyond the open-file limit would fail in accept (EMFILE) before the
    // node could refuse them properly: cap them below it, and say so.
    let mut config = config;
    if let Some(fit) = thingsd::net::connections_that_fit() {
        if config.mqtt.max_connections > fit {
            tracing::warn!(
                configured = config.mqtt.max_connections,
                using = fit,
                reserved = thingsd::net::RESERVED_FILES,
                "mqtt.max_connections is above what this process's open-file limit allows (raise LimitNOFILE / ulimit -n); using the lower figure"
            );
            config.mqtt.max_connections = fit;
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("start runtime")?;
    rt.block_on(async move {
        let bound = thingsd::server::bind(&config).await?;
        let shutdown = CancellationToken::new();
        let s = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            s.cancel();
        });
        thingsd::server::run(bound, config, shutdown).await
    })
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
