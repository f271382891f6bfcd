//! The node's configuration: one typed struct, loaded from `cluster.toml`, every field defaulted,
//! overridable by `THINGSD_SECTION__KEY=value` environment variables.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod net;
mod webhooks;
pub use crate::storage::Durability;
pub use net::IpNet;
pub use webhooks::{OnFailure, WebhookConfig};

/// The shipped cluster cookie, which anyone can read (refused off loopback).
pub const DEFAULT_COOKIE: &str = "thingsd-change-me";

/// Effective configuration of one node.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeConfig,
    pub mqtt: MqttConfig,
    pub listeners: Listeners,
    pub cluster: ClusterConfig,
    pub meta: MetaConfig,
    pub cache: CacheConfig,
    pub devices: DevicesConfig,
    pub telemetry: TelemetryConfig,
    pub api: ApiConfig,
    pub alerts: AlertsConfig,
    /// Broker webhooks (VerneMQ-shaped), one `[[webhooks]]` table per endpoint.
    pub webhooks: Vec<WebhookConfig>,
    pub log: LogConfig,
}

/// Alert rule actors and their notifications.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    pub enabled: bool,
    /// How often rules with durations or time conditions look at the clock.
    pub tick_ms: u64,
    /// How often a node re-reads the rules and re-shares them out over the live nodes.
    pub reconcile_ms: u64,
    /// Per attempt, for webhook and e-mail notifications.
    pub notify_timeout_secs: u64,
    /// Attempts per notification (exponential backoff between them).
    pub notify_attempts: u32,
    /// Notifications waiting to be sent; beyond it they are dropped and counted.
    pub notify_queue: usize,
    /// Networks that webhook and e-mail channels may reach although they are not public
    /// (loopback, private, link-local — cloud metadata —, shared, unique-local). Empty: public
    /// addresses only, so a tenant cannot make the node call into its own network. Checked on
    /// the addresses a name resolves to when connecting (no DNS rebinding); redirects are not
    /// followed.
    pub allowed_networks: Vec<IpNet>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            enabled: true,
            tick_ms: 1000,
            reconcile_ms: 2000,
            notify_timeout_secs: 10,
            notify_attempts: 6,
            notify_queue: 4096,
            allowed_networks: vec![],
        }
    }
}

/// The REST API for people and applications: sign-in, sessions, limits, CORS.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// HMAC secret signing access tokens; empty = generated once and kept in the meta store
    /// (nodes sharing a database share it).
    pub jwt_secret: String,
    /// Lifetime of an access token (JWT).
    pub access_ttl_secs: u64,
    /// Lifetime of a session and its refresh token.
    pub refresh_ttl_secs: u64,
    /// The first system administrator, created when there is no user.
    pub admin_user: String,
    /// Its password; empty = generated and printed once at the first start.
    pub admin_password: String,
    /// Failed logins allowed per account from one source address, and per source address
    /// (any account), within the window. An account is never locked for everyone: a stranger
    /// failing for `admin` locks only their own address out of it.
    pub login_fail_limit_account: u32,
    pub login_fail_limit_address: u32,
    pub login_window_secs: u64,
    /// Password checks (argon2, ~20 MiB and tens of ms each) running at once; further logins
    /// wait up to `login_queue_ms` for one, then get 429.
    pub max_concurrent_logins: usize,
    pub login_queue_ms: u64,
    /// Origins allowed by CORS (`*` for any); empty = no CORS headers.
    pub cors_origins: Vec<String>,
    /// Largest request body of the REST API.
    pub max_body_bytes: usize,
    /// Reverse proxies (addresses or networks) whose `X-Forwarded-For` names the client, for
    /// every HTTP route: login limits, the audit log, the device HTTP API. Empty = the socket
    /// peer is the client.
    pub trusted_proxies: Vec<IpNet>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            jwt_secret: String::new(),
            access_ttl_secs: 900,
            refresh_ttl_secs: 30 * 86_400,
            admin_user: "admin".into(),
            admin_password: String::new(),
            login_fail_limit_account: 5,
            login_fail_limit_address: 20,
            login_window_secs: 900,
            max_concurrent_logins: 4,
            login_queue_ms: 2000,
            cors_origins: vec![],
            max_body_bytes: 1 << 20,
            trusted_proxies: vec![],
        }
    }
}

/// What a session's full queue does with one more QoS>0 message.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum QueueFull {
    Refuse,
    DropOldest,
}

/// Telemetry storage: the time-series store, writer actors and retention.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Empty = the embedded store in `data_dir/tsdb`; `postgres://…`; `taos+ws://host:6041/db`.
    pub store: String,
    pub durability: Durability,
    /// Writer actors (devices are spread over them by id).
    pub writers: usize,
    /// Points a writer takes in one write.
    pub batch_points: usize,
    /// Points queued per writer before devices wait (MQTT acknowledgements are held back,
    /// HTTP answers 503 with Retry-After).
    pub writer_queue: usize,
    /// Longest an MQTT device waits for room before it is disconnected (0x89 server busy)
    /// and an HTTP/CoAP request waits before 503 / 5.03.
    pub wait_ms: u64,
    /// Longest a device waits for its points to be written (durability `written`/`synced`);
    /// then busy (HTTP 503, CoAP 5.03; an MQTT PUBACK waits as long as it takes), points queued.
    pub ack_timeout_ms: u64,
    /// Embedded store: points buffered (and in the WAL) before they become a segment.
    pub segment_points: usize,
    /// Embedded store: seconds points stay buffered (and in the WAL) at most before they
    /// become a segment, however few they are (0 = only by count).
    pub segment_secs: u64,
    /// Default days raw points are kept (tenant and product policies may differ); 0 = forever.
    pub retention_days: u32,
    /// How often roll-ups, retention and compaction run.
    pub maintenance_secs: u64,
    /// Days hourly roll-ups are kept (embedded and PostgreSQL stores); 0 = forever.
    pub rollup_days: u32,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            store: String::new(),
            durability: Durability::Written,
            writers: 2,
            batch_points: 10_000,
            writer_queue: 100_000,
            wait_ms: 2_000,
            ack_timeout_ms: 10_000,
            segment_points: 500_000,
            segment_secs: 60,
            retention_days: 0,
            maintenance_secs: 600,
            rollup_days: 0,
        }
    }
}

/// The device registry's database.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetaConfig {
    /// `postgres://user:pass@host/db`, or `sqlite://path` ; empty = `meta.db` (SQLite) in the
    /// data directory. A cluster needs one shared database (PostgreSQL).
    pub url: String,
}

/// Credentials, device status and latest values.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Redis: `redis://host:6379/0`, `redis-sentinel://host:26379/0?sentinelServiceName=mymaster`,
    /// `redis-cluster://host:7000?node=host:7001`; empty = in-process.
    pub url: String,
    /// Prefix of every key and channel in Redis (several deployments can share one Redis).
    pub prefix: String,
    /// Entries of the in-process cache.
    pub capacity: u64,
    /// How long a device's identity stays cached (changes invalidate at once; see cluster.toml).
    pub ttl_secs: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig { url: String::new(), prefix: "thingsd:".into(), capacity: 200_000, ttl_secs: 86_400 }
    }
}

/// A platform service's MQTT account with wider rules than a device's.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccount {
    pub username: String,
    /// argon2 PHC string (`thingsd hash-password`).
    pub password_hash: String,
    /// Topic filters it may publish to and subscribe to.
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default)]
    pub subscribe: Vec<String>,
}

/// Device authentication, payloads and downlink.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DevicesConfig {
    /// Largest device payload (telemetry, attributes, events) on any protocol.
    pub max_payload: usize,
    /// Failed logins per source address within `auth_fail_window_secs` before that address
    /// is refused without checking (MQTT 0x9F / HTTP 429 / CoAP 4.29).
    pub auth_fail_limit: u32,
    pub auth_fail_window_secs: u64,
    /// The same for CoAP sources, counted apart (a UDP source address can be forged, so CoAP
    /// failures never lock an address out of MQTT or HTTP).
    pub coap_auth_fail_limit: u32,
    /// CoAP observations one device may hold; a new one beyond it ends the device's oldest.
    pub coap_max_observations: usize,
    /// Default lifetime of a queued command or attribute set.
    pub command_ttl_secs: u64,
    /// Longest HTTP `GET /api/v1/{token}/rpc` wait.
    pub max_poll_secs: u64,
    /// The first admin API key, used when the database has none (deployments that inject a
    /// secret); empty = generate one at the first start and print it once.
    pub admin_key: String,
    pub services: Vec<ServiceAccount>,
    /// A device's own `ts` is accepted this far in the past and the future of the node's
    /// clock; outside, the message is refused (400 / 4.00 / PUBACK 0x99). Back-filling older
    /// history needs a larger `ts_max_age_secs`.
    pub ts_max_age_secs: u64,
    pub ts_max_ahead_secs: u64,
    /// A device that reports over HTTP or CoAP (no connection to hold it online) is online
    /// from its first report until it has not reported for this long. 0 = such devices never
    /// show online.
    pub report_online_secs: u64,
    /// Largest firmware/software package the admin API takes (bytes).
    pub ota_max_package_bytes: usize,
    /// Largest chunk of a package sent to a device in one message (bytes; a device asking for
    /// more, or for the whole package, gets chunks of this size).
    pub ota_max_chunk_bytes: usize,
}

impl Default for DevicesConfig {
    fn default() -> Self {
        DevicesConfig {
            max_payload: 64 * 1024,
            auth_fail_limit: 10,
            auth_fail_window_secs: 60,
            coap_auth_fail_limit: 5,
            coap_max_observations: 8,
            command_ttl_secs: 86_400,
            max_poll_secs: 60,
            admin_key: String::new(),
            services: vec![],
            ts_max_age_secs: 366 * 86_400,
            ts_max_ahead_secs: 86_400,
            report_online_secs: 300,
            ota_max_package_bytes: 32 << 20,
            ota_max_chunk_bytes: 1 << 20,
        }
    }
}

/// Node-to-node clustering (`ractor_cluster` links). Off by default: a node runs alone.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub enabled: bool,
    /// Where this node accepts links from other nodes (port 0 = any free port, logged at start).
    pub listen: SocketAddr,
    /// `host:port` other nodes dial to reach this one; empty = the bound listen address
    /// (which must then not be 0.0.0.0 / ::).
    pub advertise: String,
    /// `host:port` of nodes to join; one live seed is enough (members are gossiped).
    pub seeds: Vec<String>,
    /// Shared secret every node of the cluster must have (challenge-response, never sent).
    pub cookie: String,
    /// Interval of heartbeats to every peer.
    pub heartbeat_ms: u64,
    /// A peer silent for this long is marked down (routes dropped, link reset): a hung or cut-off
    /// one (a crashed peer's link closes at once). Outlasts a busy node's pauses (cluster.toml).
    pub heartbeat_timeout_ms: u64,
    /// Redial back-off bounds (exponential, with jitter) for seeds and known members.
    pub redial_min_ms: u64,
    pub redial_max_ms: u64,
    /// How long a SUBSCRIBE waits for live peers to acknowledge a new route before SUBACK.
    pub route_ack_timeout_ms: u64,
    /// `/health/ready` waits this long after start for the first peer link when seeds are
    /// configured; after it, a node that reached no seed is ready alone (and says so).
    pub join_timeout_secs: u64,
    /// TLS for node links when `tls_cert` is set: this node's certificate chain and key (PEM),
    /// and the CA that signs every node's certificate (links are mutually authenticated).
    pub tls_cert: String,
    pub tls_key: String,
    pub tls_ca: String,
    /// Forwards queued per peer at most; beyond it, forwards no publisher waits for (QoS 0,
    /// non-persistent subscribers) are dropped and counted (`thingsd_cluster_forward_dropped_total`).
    pub max_forward_queue: usize,
    /// The newest cluster wire version this node speaks (0, the default: the newest this
    /// build speaks). Peers agree per link on the highest version both speak, so a rolling upgrade
    /// needs no setting; pin it to the previous version to make a node talk exactly as the
    /// previous build does (e.g. while a downgrade is possible).
    pub wire_version: u16,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            enabled: false,
            listen: ([0, 0, 0, 0], 4370).into(),
            advertise: String::new(),
            seeds: vec![],
            cookie: DEFAULT_COOKIE.into(),
            heartbeat_ms: 500,
            heartbeat_timeout_ms: 15000,
            redial_min_ms: 100,
            redial_max_ms: 5000,
            route_ack_timeout_ms: 3000,
            join_timeout_secs: 30,
            tls_cert: String::new(),
            tls_key: String::new(),
            tls_ca: String::new(),
            max_forward_queue: 100_000,
            wire_version: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Node name, used in logs and (later) in the cluster.
    pub name: String,
    /// Directory for the node's state (`state/`: sessions, queues, retained messages), the
    /// embedded registry and time-series store.
    pub data_dir: PathBuf,
    /// When a message for a persistent session, a retained message, a subscription or a QoS 2
    /// packet id is acknowledged: `accepted` (in memory; a crash loses up to the last
    /// `persist_interval_ms`), `written` (the default: handed to the OS, a process crash loses
    /// nothing acknowledged) or `synced` (fdatasync: power loss loses nothing acknowledged).
    pub durability: crate::storage::Durability,
    /// How often state no one waits for is written out (mode `accepted`, acknowledgements of
    /// delivered messages), and a cluster's session replicas refreshed, in milliseconds.
    pub persist_interval_ms: u64,
    /// Per-actor statistics for the inspector (`thingsctl actors`): message timing and mailbox
    /// depth. Actors are listed either way.
    pub actor_stats: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            name: "thingsd-1".into(),
            data_dir: "./data".into(),
            durability: crate::storage::Durability::Written,
            persist_interval_ms: 1000,
            actor_stats: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Connections above this are refused with CONNACK 0x97 (3.1.1: 3).
    pub max_connections: usize,
    /// CONNECTs accepted per second across the node (burst of the same size); beyond it CONNACK
    /// 0x9F (3.1.1: 3). 0 = unlimited. Protects the node during reconnect storms.
    pub max_connect_rate: u32,
    /// CONNECTs being authenticated and attached at once on this node; beyond it CONNACK 0x89
    /// Server busy (3.1.1: 3) at once, which clients back off from, instead of a queue that
    /// outgrows the database pool's timeout in a reconnect storm. 0 = unlimited.
    pub max_pending_connects: usize,
    /// How many of those one source address may hold (IPv6: one /64): slow logins from one
    /// place (argon2 per wrong password, a slow webhook) cannot take every slot. Behind a
    /// balancer without the PROXY protocol every client shares its address: 0 (no share).
    pub max_pending_connects_per_address: usize,
    /// New CONNECTs get 0x89 while the runtime is this far behind (ms late timers). 0 = never.
    pub overload_lag_ms: u64,
    /// Largest packet accepted, and advertised as Maximum Packet Size.
    pub max_packet_size: u32,
    /// Server Receive Maximum, and the cap on each session's outbound in-flight window.
    pub max_inflight: u16,
    /// Queued messages a session keeps in memory (the head of its queue); the rest of a queue
    /// waits in the node's state store on disk.
    pub max_queued: usize,
    /// Bound of each session's queue (QoS>0 messages in flight, in memory and on disk) by
    /// count and by bytes; beyond it `queue_full` applies.
    pub queue_max_messages: usize,
    pub queue_max_bytes: u64,
    /// What a full queue does with one more QoS>0 message: `refuse` it (the publisher gets
    /// PUBACK/PUBREC 0x97 in 5.0; a 3.1.1 publisher, which has no negative acknowledgement, is
    /// disconnected without one and sends it again later), or `drop_oldest` (counted in
    /// `thingsd_messages_dropped_by_reason_total`).
    pub queue_full: QueueFull,
    /// Queue QoS 0 messages for offline persistent sessions too.
    pub queue_qos0_offline: bool,
    pub max_topic_levels: usize,
    pub max_subscriptions_per_session: usize,
    /// Topic Alias Maximum the server accepts from clients.
    pub topic_alias_max: u16,
    /// Seconds a socket may stay open without sending CONNECT.
    pub connect_timeout_secs: u64,
    /// Keep-alive ceiling; larger (or zero) client values are replaced by Server Keep Alive (5.0). 0 = no cap.
    pub max_keepalive_secs: u16,
    /// Ceiling on the Session Expiry Interval (5.0).
    pub max_session_expiry_secs: u32,
    /// How long a 3.1.1 persistent session (clean session = 0) outlives its connection: the
    /// protocol has no expiry, and "forever" lets abandoned client ids hold memory, disk and
    /// queued messages without bound (capped by `max_session_expiry_secs`).
    pub v311_session_expiry_secs: u32,
    /// Sessions (connected or not) one device or service account may hold on a node. A new
    /// client id beyond it ends that principal's longest-disconnected session; when all are
    /// connected, the CONNECT is refused with 0x97 (3.1.1: 3). 0 = no cap.
    pub max_sessions_per_principal: usize,
    /// Bound of each connection's outbound packet queue.
    pub outbound_queue: usize,
    /// Interval of `$SYS/broker/...` updates, in seconds; 0 disables them.
    pub sys_interval_secs: u64,
    /// Number of topic shard actors (plus one for filters starting with a wildcard).
    pub shards: usize,
    /// Queue depth of an online subscriber above which publishers are paused (backpressure).
    pub backpressure_high_water: usize,
    /// How long a publisher waits for a congested subscriber before treating it as slow
    /// (slow subscribers stop exerting backpressure; their queue grows on disk).
    pub slow_subscriber_ms: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            max_connections: 100_000,
            max_connect_rate: 0,
            max_pending_connects: 1024,
            max_pending_connects_per_address: 256,
            overload_lag_ms: 2000,
            max_packet_size: 1024 * 1024,
            max_inflight: 128,
            max_queued: 1000,
            queue_max_messages: 100_000,
            queue_max_bytes: 64 << 20,
            queue_full: QueueFull::Refuse,
            queue_qos0_offline: false,
            max_topic_levels: 32,
            max_subscriptions_per_session: 100,
            topic_alias_max: 64,
            connect_timeout_secs: 10,
            max_keepalive_secs: 0,
            max_session_expiry_secs: u32::MAX,
            v311_session_expiry_secs: 7 * 24 * 3600,
            max_sessions_per_principal: 16,
            outbound_queue: 1024,
            sys_interval_secs: 10,
            shards: 8,
            backpressure_high_water: 256,
            slow_subscriber_ms: 2000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listeners {
    pub tcp: Vec<TcpListenerConfig>,
    pub ws: Vec<WsListenerConfig>,
    pub tls: Vec<TlsListenerConfig>,
    /// HTTP: health, metrics, the device HTTP API and the admin API. Empty = no HTTP listener.
    pub http: Vec<TcpListenerConfig>,
    /// CoAP over UDP for devices.
    pub coap: Vec<CoapListenerConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoapListenerConfig {
    pub bind: SocketAddr,
}

impl Default for Listeners {
    fn default() -> Self {
        Listeners {
            tcp: vec![TcpListenerConfig::new(([0, 0, 0, 0], 1883).into())],
            ws: vec![WsListenerConfig {
                bind: ([0, 0, 0, 0], 8083).into(),
                path: "/mqtt".into(),
                proxy_protocol: false,
                allow_anonymous: false,
            }],
            tls: vec![],
            http: vec![TcpListenerConfig::new(([0, 0, 0, 0], 8080).into())],
            coap: vec![CoapListenerConfig { bind: ([0, 0, 0, 0], 5683).into() }],
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpListenerConfig {
    pub bind: SocketAddr,
    /// Expect a PROXY protocol (v1 or v2) header first, as sent by HAProxy `send-proxy-v2` or
    /// nginx `proxy_protocol on` (MQTT listeners only).
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Accept MQTT clients without credentials (unrestricted: for trusted networks only).
    #[serde(default)]
    pub allow_anonymous: bool,
}

impl TcpListenerConfig {
    pub fn new(bind: SocketAddr) -> TcpListenerConfig {
        TcpListenerConfig { bind, proxy_protocol: false, allow_anonymous: false }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WsListenerConfig {
    pub bind: SocketAddr,
    #[serde(default = "default_ws_path")]
    pub path: String,
    #[serde(default)]
    pub proxy_protocol: bool,
    #[serde(default)]
    pub allow_anonymous: bool,
}

fn default_ws_path() -> String {
    "/mqtt".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsListenerConfig {
    pub bind: SocketAddr,
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    #[serde(default)]
    pub proxy_protocol: bool,
    #[serde(default)]
    pub allow_anonymous: bool,
    /// CA (PEM) whose client certificates are accepted; a device presenting one is known by
    /// the certificate's SHA-256 fingerprint (an `x509` credential). Clients without a
    /// certificate may still log in with a token or password.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `thingsd=debug`. `RUST_LOG` wins when set.
    pub level: String,
    /// `text` (human) or `json` (one object per line, with the connection's span: peer,
    /// node, client id, device).
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info".into(), format: LogFormat::Text }
    }
}

/// A configuration error that names the file, line and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
}

impl Config {
    /// Load from `path` (if given; a missing explicit file is an error) then apply `THINGSD_…` overrides.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().filter(|(k, _)| k.starts_with("THINGSD_")).collect();
        let (text, name) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|e| ConfigError::Read { path: p.display().to_string(), source: e })?,
                p.display().to_string(),
            ),
            None => (String::new(), "<defaults>".to_string()),
        };
        Config::from_sources(&text, &name, &env)
    }

    /// Parse TOML `text` (named `name` in errors) and apply `env` overrides.
    pub fn from_sources(text: &str, name: &str, env: &[(String, String)]) -> Result<Config, ConfigError> {
        // Parse the file alone first so errors carry its line and column.
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse { path: name.to_string(), message: e.to_string() })?;
        if env.is_empty() {
            return Ok(cfg);
        }
        let mut value = toml::Value::try_from(&cfg).map_err(|e| ConfigError::Parse { path: name.into(), message: e.to_string() })?;
        for (var, raw) in env {
            let path: Vec<String> = var["THINGSD_".len()..].split("__").map(|s| s.to_ascii_lowercase()).collect();
            let parsed = parse_env_value(raw);
            set_path(&mut value, &path, parsed).map_err(|m| ConfigError::Env { var: var.clone(), message: m })?;
            let check: Result<Config, _> = value.clone().try_into();
            if let Err(e) = check {
                return Err(ConfigError::Env { var: var.clone(), message: e.to_string() });
            }
        }
        value.try_into().map_err(|e: toml::de::Error| ConfigError::Parse { path: name.into(), message: e.to_string() })
    }

    /// The effective configuration as TOML, secrets masked (the admin key, the cluster cookie,
    /// passwords inside database and Redis URLs).
    pub fn to_toml(&self) -> String {
        let mut c = self.clone();
        let mask = |s: &mut String| {
            if !s.is_empty() {
                *s = "<set>".into();
            }
        };
        mask(&mut c.devices.admin_key);
        mask(&mut c.api.jwt_secret);
        mask(&mut c.api.admin_password);
        mask(&mut c.cluster.cookie);
        c.meta.url = mask_url_password(&c.meta.url);
        c.cache.url = mask_url_password(&c.cache.url);
        c.telemetry.store = mask_url_password(&c.telemetry.store);
        toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// `scheme://user:secret@host/…` → `scheme://user:***@host/…`.
pub fn mask_url_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}

fn parse_env_value(raw: &str) -> toml::Value {
    // A value that parses as TOML (number, bool, array, inline table) is taken as such; anything else is a string.
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

fn set_path(root: &mut toml::Value, path: &[String], v: toml::Value) -> Result<(), String> {
    let mut cur = root;
    for (i, key) in path.iter().enumerate() {
        let table = cur.as_table_mut().ok_or_else(|| format!("`{}` is not a section", path[..i].join(".")))?;
        if i + 1 == path.len() {
            if !table.contains_key(key) {
                return Err(format!("unknown key `{}`", path.join(".")));
            }
            table.insert(key.clone(), v);
            return Ok(());
        }
        cur = table.get_mut(key).ok_or_else(|| format!("unknown section `{}`", path[..=i].join(".")))?;
    }
    Err("empty key".into())
}

#[cfg(test)]
mod tests;
