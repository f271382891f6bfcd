//! Wiring of a node: bind listeners, start the actors, restore persisted state, accept
//! connections, persist periodically, and shut down gracefully.
pub mod coap;
pub mod connection;
mod features;
pub mod listener;
pub mod proxy;
pub mod writer;

use crate::actors::inspect::Tell;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ractor::{Actor, ActorRef};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::actors::registry::RegistryMessage;
use crate::actors::retained::RetainedSet;
use crate::actors::supervisor::SupervisorActor;
use crate::broker::Broker;
use crate::config::Config;
use crate::services::{Services, Stores};
use crate::storage::state::StateStore;
use listener::Kind;

/// Listeners bound before the node starts (tests bind port 0 and read the addresses back).
pub struct Bound {
    /// MQTT listeners, their kind and options.
    pub listeners: Vec<(TcpListener, Kind, listener::Opts)>,
    pub http: Vec<TcpListener>,
    /// CoAP sockets.
    pub coap: Vec<tokio::net::UdpSocket>,
    /// Node-to-node links, when clustering is enabled.
    pub cluster: Option<TcpListener>,
}

impl Bound {
    /// Addresses of the bound MQTT listeners, in config order: TCP, then WebSocket, then TLS.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter_map(|(l, _, _)| l.local_addr().ok()).collect()
    }

    /// Addresses of the bound HTTP listeners.
    pub fn http_addrs(&self) -> Vec<SocketAddr> {
        self.http.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    /// Addresses of the bound CoAP sockets.
    pub fn coap_addrs(&self) -> Vec<SocketAddr> {
        self.coap.iter().filter_map(|l| l.local_addr().ok()).collect()
    }
}

pub use crate::net::install_crypto;

fn tls_acceptor(cert: &Path, key: &Path, client_ca: Option<&Path>) -> anyhow::Result<TlsAcceptor> {
    install_crypto();
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert).with_context(|| format!("TLS certificate {}", cert.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("TLS certificate {}", cert.display()))?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key).with_context(|| format!("TLS key {}", key.display()))?,
    ))
    .with_context(|| format!("TLS key {}", key.display()))?
    .with_context(|| format!("no private key in {}", key.display()))?;
    let builder = rustls::ServerConfig::builder();
    let builder = match client_ca {
        // Client certificates signed by this CA identify devices; clients without one may
        // still log in with a token or password.
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pemfile::certs(&mut std::io::BufReader::new(
                std::fs::File::open(ca).with_context(|| format!("TLS client CA {}", ca.display()))?,
            )) {
                roots.add(c.with_context(|| format!("TLS client CA {}", ca.display()))?).context("TLS client CA")?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).allow_unauthenticated().build().context("TLS client CA")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let cfg = builder.with_single_cert(certs, key).context("TLS certificate/key")?;
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// Bind every listener of `config`.
pub async fn bind(config: &Config) -> anyhow::Result<Bound> {
    let mut listeners = Vec::new();
    for l in &config.listeners.tcp {
        listeners.push((
            crate::net::listen(l.bind).with_context(|| format!("bind MQTT TCP {}", l.bind))?,
            Kind::Tcp,
            listener::Opts { proxy: l.proxy_protocol, allow_anonymous: l.allow_anonymous },
        ));
    }
    for l in &config.listeners.ws {
        listeners.push((
            crate::net::listen(l.bind).with_context(|| format!("bind MQTT WebSocket {}", l.bind))?,
            Kind::Ws { path: l.path.clone() },
            listener::Opts { proxy: l.proxy_protocol, allow_anonymous: l.allow_anonymous },
        ));
    }
    for l in &config.listeners.tls {
        let acc = tls_acceptor(&l.cert, &l.key, l.client_ca.as_deref())?;
        listeners.push((
            crate::net::listen(l.bind).with_context(|| format!("bind MQTT TLS {}", l.bind))?,
            Kind::Tls(acc),
            listener::Opts { proxy: l.proxy_protocol, allow_anonymous: l.allow_anonymous },
        ));
    }
    let mut http = Vec::new();
    for l in &config.listeners.http {
        anyhow::ensure!(!l.proxy_protocol, "listeners.http {}: proxy_protocol is supported on MQTT listeners only", l.bind);
        http.push(crate::net::listen(l.bind).with_context(|| format!("bind HTTP {}", l.bind))?);
    }
    let mut coap = Vec::new();
    for l in &config.listeners.coap {
        coap.push(tokio::net::UdpSocket::bind(l.bind).await.with_context(|| format!("bind CoAP {}", l.bind))?);
    }
    let cluster = match config.cluster.enabled {
        true => {
            // A weak cookie is a configuration error, reported as such before the port is
            // taken (a busy port would otherwise hide it).
            crate::cluster::check_cookie(&config.cluster, config.cluster.listen)?;
            Some(crate::net::listen(config.cluster.listen).with_context(|| format!("bind cluster {}", config.cluster.listen))?)
        }
        false => None,
    };
    Ok(Bound { listeners, http, coap, cluster })
}

/// Run a node on already-bound listeners until `shutdown` fires, then stop gracefully:
/// close every connection (DISCONNECT 0x8B in 5.0) and write persistent state to disk.
pub async fn run(bound: Bound, config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    install_crypto();
    anyhow::ensure!(
        (1..=crate::protocols::mqtt::topic::MAX_LEVELS).contains(&config.mqtt.max_topic_levels),
        "mqtt.max_topic_levels must be 1..={}",
        crate::protocols::mqtt::topic::MAX_LEVELS
    );
    let config = Arc::new(config);
    let interval = Duration::from_millis(config.node.persist_interval_ms.max(10));
    let (state, sessions, retained) = StateStore::open(&config.node.data_dir, config.node.durability, interval, config.mqtt.max_queued)?;
    let restored = sessions.len();
    let broker = Arc::new(Broker::new(config.clone(), state.clone(), sessions));
    Broker::watch_lag(&broker);
    if !retained.is_empty() {
        let mut set = RetainedSet::default();
        for m in retained {
            set.apply(Arc::new(m));
        }
        broker.retained.store(Arc::new(set));
    }
    let mut addrs = Vec::new();
    // The cluster side starts first: shards announce the routes of restored sessions to it.
    if let Some(l) = bound.cluster {
        let local = l.local_addr().context("cluster listener")?;
        let (_, advertise) = crate::cluster::start(broker.clone(), l, shutdown.clone()).await?;
        addrs.push(format!("cluster://{local}"));
        if advertise != local.to_string() {
            tracing::info!(%advertise, "other nodes reach this one through the advertised address");
        }
    }
    crate::actors::inspect::set_enabled(config.node.actor_stats);
    let (sup, sup_handle) = Actor::spawn(
        Some(format!("supervisor:{}", config.node.name)),
        crate::actors::inspect::Instrumented(SupervisorActor, "supervisor"),
        broker.clone(),
    )
    .await
    .context("start actors")?;
    let registry = broker.registry().context("registry did not start")?;
    // The registry restores the sessions the store loaded; a round-trip waits for it.
    registry.ask(RegistryMessage::Count, Some(Duration::from_secs(60))).await.context("restore sessions")?;

    // The device platform over the stores opened here (the one place that picks backends),
    // before any listener accepts.
    let services = Arc::new(start_services(&broker).await?);
    if let Some(c) = broker.cluster.get() {
        c.on_features(Arc::new(features::FeatureFrames { broker: Arc::downgrade(&broker), services: Arc::downgrade(&services) }));
    }
    let tracker = TaskTracker::new();
    let Bound { listeners, http, coap, .. } = bound;
    addrs.extend(serve_listeners((listeners, http, coap), &broker, &services, &shutdown, &tracker));
    broker.serving.store(true, std::sync::atomic::Ordering::Relaxed);
    let retained_n = broker.retained.load().len();
    tracing::info!(node = %config.node.name, listeners = ?addrs, restored_sessions = restored, retained = retained_n, "thingsd ready");

    shutdown.cancelled().await;
    // Not ready any more (load balancers stop sending); sessions ending now are the node's
    // shutdown, not a fault.
    broker.serving.store(false, std::sync::atomic::Ordering::Relaxed);
    // In a cluster the peers take over this node's registrar and backup duties first, so the
    // clients reconnecting elsewhere find their sessions handed over from here, live.
    if let Some(c) = broker.cluster.get() {
        c.drain().await;
    }
    tracing::info!("shutting down: closing connections");
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await.is_err() {
        tracing::warn!("some connections did not close within 10s");
    }
    // Every persistent session writes its state (to disk and, in a cluster, to its backup
    // node); sessions handed over meanwhile flush to their new owners; then the cluster is
    // told we leave: the backups adopt the sessions left, so clients reconnecting later to
    // another node find them.
    if let Some(r) = broker.registry() {
        let _ = r.ask(RegistryMessage::PersistAll, Some(Duration::from_secs(30))).await;
        if broker.cluster.get().is_some() {
            moved(&r).await;
        }
    }
    if let Some(c) = broker.cluster.get() {
        c.leave().await;
        c.stop_links();
    }
    state.close();
    services.alerts.shutdown().await;
    // Every accepted point reaches the store before the node stops.
    services.telemetry.shutdown().await;
    services.devices.meta.close().await;
    sup.stop(None);
    let _ = sup_handle.await;
    // The supervisor's children stop after it (ractor stops linked actors asynchronously): wait
    // until their names are free, so a node restarted in the same process can take them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !ractor::registry::registered().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let left = ractor::registry::registered();
    if !left.is_empty() {
        tracing::warn!(actors = ?left, "actors still registered after the stop");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Wait (bounded by the hand-over's own wait) until every session handed to another node has
/// flushed to it: leaving earlier would make its new owner wait out the hand-over.
async fn moved(registry: &ActorRef<RegistryMessage>) {
    let deadline = tokio::time::Instant::now() + crate::actors::session::HANDOVER_WAIT;
    loop {
        let left = match registry.ask(RegistryMessage::Moving, Some(Duration::from_secs(5))).await {
            Ok(ractor::rpc::CallResult::Success(n)) => n,
            _ => return,
        };
        if left == 0 {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(sessions = left, "sessions handed over to other nodes did not flush before the stop");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The bound MQTT, HTTP and CoAP listeners.
type Listeners = (Vec<(TcpListener, Kind, listener::Opts)>, Vec<TcpListener>, Vec<tokio::net::UdpSocket>);

/// Start accepting on every bound MQTT, HTTP and CoAP listener; returns what each serves
/// (for the ready line). MQTT connections are tracked so shutdown can wait for them.
fn serve_listeners(
    (listeners, http, coap): Listeners,
    broker: &Arc<Broker>,
    services: &Arc<Services>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> Vec<String> {
    let mut addrs = Vec::new();
    for (l, kind, opts) in listeners {
        let proxy = opts.proxy;
        let what = match &kind {
            Kind::Tcp => "mqtt",
            Kind::Tls(_) => "mqtts",
            Kind::Ws { .. } => "ws",
        };
        if let Ok(a) = l.local_addr() {
            addrs.push(format!("{what}{}://{a}", if proxy { "+proxy" } else { "" }));
        }
        tokio::spawn(listener::accept_loop(l, kind, opts, broker.clone(), services.clone(), shutdown.clone(), tracker.clone()));
    }
    for l in http {
        if let Ok(a) = l.local_addr() {
            addrs.push(format!("http://{a}"));
        }
        let app = crate::http::app(broker.clone(), services.clone());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            use axum::serve::ListenerExt;
            let app = app.into_make_service_with_connect_info::<SocketAddr>();
            // `tap_io` only for axum's ConnectInfo of a custom listener.
            let l = crate::http::linger::Lingering(l).tap_io(|_| {});
            if let Err(e) = axum::serve(l, app).with_graceful_shutdown(async move { stop.cancelled().await }).await {
                tracing::error!(error = %e, "HTTP listener failed");
            }
        });
    }
    for sock in coap {
        if let Ok(a) = sock.local_addr() {
            addrs.push(format!("coap://{a}"));
        }
        tokio::spawn(coap::serve(sock, services.devices.clone(), shutdown.clone()));
    }
    addrs
}

/// Open the stores and build the platform's services on them.
async fn start_services(broker: &Arc<Broker>) -> anyhow::Result<Services> {
    let config = &broker.config;
    let stores = Stores::open(config).await?;
    let hooks = crate::webhooks::Webhooks::start(&config.webhooks)?;
    let live = crate::live::Live::start(broker);
    let devices = crate::devices::Devices::start(broker, stores.meta.clone(), stores.cache.clone(), live.clone()).await?;
    let telemetry =
        crate::telemetry::Telemetry::start(config.clone(), stores.meta.clone(), stores.cache.clone(), stores.tsdb, stores.rollup).await?;
    let _ = devices.telemetry.set(telemetry.clone());
    let users = Arc::new(crate::users::Users::start(stores.meta, stores.cache, config.api.clone()).await?);
    let alerts = crate::alerts::Alerts::start(broker, devices.clone(), live.clone());
    Ok(Services { devices, telemetry, users, alerts, hooks, live })
}
