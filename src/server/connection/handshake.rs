//! CONNECT as a pipeline: read it, then admit (limits) → authenticate (webhook or registry) →
//! negotiate (client id, will, keep-alive, expiry, properties) → attach (session, writer,
//! registrar). The first three stages return `Err(code)` and [`handshake`] answers every
//! refusal in one place, with a CONNACK in the client's protocol version.
use super::*;

/// What negotiation settled for the session.
struct Negotiated {
    c: Connect,
    principal: Principal,
    /// The session key: the client id in the principal's namespace.
    client_id: Arc<str>,
    /// The client id as the client and operators know it.
    shown: Arc<str>,
    will: Option<crate::protocols::mqtt::Will>,
    keep_alive: u16,
    expiry: u32,
    props: Properties,
}

/// A CONNECT between its arrival and its CONNACK (authentication, session attach), counted
/// against `mqtt.max_pending_connects`, and against its source address's share of them.
struct PendingConnect<'a> {
    broker: &'a Broker,
    /// The address block it counts for, once admitted under the node-wide bound.
    from: Option<std::net::IpAddr>,
}

impl<'a> PendingConnect<'a> {
    /// `Err(())` when the node or this address holds its share of CONNECTs in progress.
    fn enter(broker: &'a Broker, peer: std::net::IpAddr) -> Result<Self, ()> {
        let n = broker.metrics.connects_pending.fetch_add(1, Ordering::Relaxed) as usize;
        let mut me = PendingConnect { broker, from: None };
        let cfg = &broker.config.mqtt;
        if cfg.max_pending_connects != 0 && n >= cfg.max_pending_connects {
            return Err(());
        }
        if cfg.max_pending_connects_per_address == 0 {
            return Ok(me);
        }
        let block = crate::net::address_block(peer);
        let mut table = broker.pending_by_address.lock().unwrap_or_else(|e| e.into_inner());
        let held = table.entry(block).or_insert(0);
        if *held as usize >= cfg.max_pending_connects_per_address {
            return Err(());
        }
        *held += 1;
        me.from = Some(block);
        Ok(me)
    }
}

impl Drop for PendingConnect<'_> {
    fn drop(&mut self) {
        self.broker.metrics.connects_pending.fetch_sub(1, Ordering::Relaxed);
        if let Some(block) = self.from {
            let mut table = self.broker.pending_by_address.lock().unwrap_or_else(|e| e.into_inner());
            if let std::collections::hash_map::Entry::Occupied(mut e) = table.entry(block) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
    }
}

/// CONNECT, validation, session attach. Kept out of the packet loop's future so an idle
/// connection does not carry the CONNECT packet and handshake state.
pub(super) async fn handshake<R, W>(
    broker: &Arc<Broker>,
    rd: &mut R,
    mut wr: W,
    buf: &mut BytesMut,
    peer: SocketAddr,
    ctx: ConnCtx,
    shutdown: &CancellationToken,
) -> Option<Established<W>>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let c = Box::pin(read_connect(broker, rd, &mut wr, buf, shutdown)).await?;
    let protocol = c.protocol;
    // Every log line of this connection carries its client id from here on.
    tracing::Span::current().record("client_id", c.client_id.as_str());
    let Ok(_pending) = PendingConnect::enter(broker, peer.ip()) else {
        tracing::debug!(
            limit = broker.config.mqtt.max_pending_connects,
            per_address = broker.config.mqtt.max_pending_connects_per_address,
            "too many CONNECTs in progress (on the node, or from this address); server busy"
        );
        Box::pin(write_raw(&mut wr, &connack(reason::SERVER_BUSY), protocol, &broker.metrics)).await;
        return None;
    };
    let stages = async {
        let gauge = admit(broker, &c)?;
        let principal = Box::pin(authenticate(&ctx, &c, peer)).await?;
        let n = Box::pin(negotiate(broker, &ctx.services, c, principal)).await?;
        Ok::<_, u8>((gauge, n))
    };
    match stages.await {
        Ok((gauge, n)) => Box::pin(attach(broker, ctx.services, wr, peer, n, gauge)).await,
        Err(code) => {
            Box::pin(write_raw(&mut wr, &connack(code), protocol, &broker.metrics)).await;
            None
        }
    }
}

/// The first packet, which must be a valid CONNECT within the connect timeout. A bad CONNECT
/// is told why when its protocol version can be answered.
async fn read_connect<R, W>(broker: &Broker, rd: &mut R, wr: &mut W, buf: &mut BytesMut, shutdown: &CancellationToken) -> Option<Connect>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let cfg = &broker.config;
    let m = &broker.metrics;
    let max = cfg.mqtt.max_packet_size as usize;
    let first = tokio::select! {
        r = Box::pin(tokio::time::timeout(Duration::from_secs(cfg.mqtt.connect_timeout_secs), read_packet(rd, buf, Protocol::V5, max, m))) => r,
        _ = shutdown.cancelled() => return None,
    };
    match first {
        Err(_) => {
            tracing::debug!("no CONNECT within the connect timeout; closing");
            None
        }
        Ok(Ok(Packet::Connect(c))) => {
            m.packets_in.add(1, 1);
            Some(*c)
        }
        Ok(Ok(p)) => {
            tracing::info!(packet = p.name(), "first packet is not CONNECT; closing");
            None
        }
        Ok(Err(ReadErr::Decode(e))) => {
            Metrics::add(&m.protocol_errors, 1);
            tracing::info!(error = %e, "bad CONNECT; closing");
            // An unsupported level is answered in the 3.1.1 format below level 5 (return code 1) and
            // in the 5.0 format above; a bad 5.0 CONNECT is told why (0x81, 0x82, ...).
            let answer_in = match (e.code, e.level) {
                (reason::UNSUPPORTED_PROTOCOL_VERSION, l) if l < 5 => Some(Protocol::V4),
                (reason::UNSUPPORTED_PROTOCOL_VERSION, _) | (_, 5) => Some(Protocol::V5),
                _ => None,
            };
            if let Some(p) = answer_in {
                Box::pin(write_raw(wr, &connack(e.code), p, m)).await;
            }
            None
        }
        Ok(Err(_)) => None,
    }
}

/// The node's limits: connections, connect rate, no enhanced authentication. The gauge counts
/// the connection from here on (and uncounts it when dropped, refused or not).
fn admit(broker: &Arc<Broker>, c: &Connect) -> Result<Gauge, u8> {
    let (cfg, m) = (&broker.config, &broker.metrics);
    let connected = m.clients_connected.fetch_add(1, Ordering::Relaxed);
    let gauge = Gauge(broker.clone());
    Metrics::add(&m.connections_total, 1);
    // Refusals come by the thousand in a reconnect storm: logged every 10 s with a count
    // (thingsd_mqtt_connacks_total counts each by reason).
    static FULL: crate::metrics::LogEvery = crate::metrics::LogEvery::new();
    static RATE: crate::metrics::LogEvery = crate::metrics::LogEvery::new();
    static LATE: crate::metrics::LogEvery = crate::metrics::LogEvery::new();
    let every = Duration::from_secs(10);
    if connected as usize >= cfg.mqtt.max_connections {
        if let Some(more) = FULL.hit(every) {
            tracing::warn!(limit = cfg.mqtt.max_connections, refused_since_last_report = more, "connection limit reached; refusing");
        }
        return Err(reason::QUOTA_EXCEEDED);
    }
    // Behind on the connections it has: they come first; the client backs off and may find a
    // node with room (through its load balancer) instead of adding a login to the backlog.
    if broker.overloaded() {
        if let Some(more) = LATE.hit(every) {
            let lag_ms = m.scheduler_lag_us.load(Ordering::Relaxed) / 1000;
            tracing::warn!(
                lag_ms,
                limit_ms = cfg.mqtt.overload_lag_ms,
                refused_since_last_report = more,
                "node overloaded; refusing new connections"
            );
        }
        return Err(reason::SERVER_BUSY);
    }
    if !broker.admit_connect() {
        if let Some(more) = RATE.hit(every) {
            tracing::warn!(limit = cfg.mqtt.max_connect_rate, refused_since_last_report = more, "connect rate exceeded; refusing");
        }
        return Err(reason::CONNECTION_RATE_EXCEEDED);
    }
    if c.protocol == Protocol::V5 && c.props.authentication_method.is_some() {
        tracing::info!("enhanced authentication requested but none is configured");
        return Err(reason::BAD_AUTHENTICATION_METHOD);
    }
    Ok(gauge)
}

/// Who is it? An `auth_on_register` webhook is asked first: `ok` admits, an error refuses,
/// `next` leaves it to the registry. Devices are checked against the registry; wrong
/// credentials get 0x86/0x87 (3.1.1: 4/5), and an address with too many failures is refused
/// for a while.
async fn authenticate(ctx: &ConnCtx, c: &Connect, peer: SocketAddr) -> Result<Principal, u8> {
    let v5 = c.protocol == Protocol::V5;
    let svc = &ctx.services;
    if let Some(h) = svc.hooks.as_ref().filter(|h| h.has("auth_on_register", v5)) {
        let body = crate::webhooks::body::register(peer, c.username.as_deref(), c.password.as_deref(), &c.client_id, c.clean_start, v5);
        match Box::pin(h.auth("auth_on_register", v5, body)).await {
            Verdict::Ok(_) => return Ok(Principal::External),
            Verdict::Next => {}
            Verdict::Error(e) => {
                tracing::info!(error = %e, username = c.username.as_deref().unwrap_or(""), "CONNECT refused by webhook");
                return Err(reason::NOT_AUTHORIZED);
            }
        }
    }
    let creds =
        Credentials { username: c.username.as_deref(), password: c.password.as_deref(), cert_fingerprint: ctx.cert_fingerprint.as_deref() };
    Box::pin(svc.devices.authenticate(peer.ip(), &creds, ctx.allow_anonymous)).await.map_err(|e| {
        tracing::info!(reason = ?e, username = c.username.as_deref().unwrap_or(""), "CONNECT refused");
        match e {
            AuthError::BadCredentials => reason::BAD_USERNAME_OR_PASSWORD,
            AuthError::NotAuthorized => reason::NOT_AUTHORIZED,
            AuthError::RateLimited => reason::CONNECTION_RATE_EXCEEDED,
            AuthError::Unavailable => reason::SERVER_UNAVAILABLE,
        }
    })
}

/// The session's terms: its client id (assigned when empty; in the principal's namespace), the
/// will (authorised like a PUBLISH, never stored otherwise), keep-alive, expiry, and the
/// properties the CONNACK tells a 5.0 client.
async fn negotiate(broker: &Arc<Broker>, svc: &Services, mut c: Connect, principal: Principal) -> Result<Negotiated, u8> {
    let cfg = &broker.config;
    let v5 = c.protocol == Protocol::V5;
    let mut props = Properties::default();
    let client_id: Arc<str> = if c.client_id.is_empty() {
        if !v5 && !c.clean_start {
            return Err(reason::CLIENT_ID_NOT_VALID);
        }
        let id = format!("auto-{:016x}", rand::random::<u64>());
        if v5 {
            props.assigned_client_identifier = Some(id.clone());
        }
        Arc::from(id)
    } else {
        Arc::from(c.client_id.as_str())
    };
    tracing::Span::current().record("client_id", &*client_id);
    let shown = client_id.clone();
    if broker.tracer.on() {
        broker.tracer.packet(&cfg.node.name, &shown, "in", &Packet::Connect(Box::new(c.clone())), c.protocol);
    }
    // A device's sessions live in its own client-id namespace, and so do a service account's
    // ("@" never occurs in a device number): nobody inherits another principal's session by
    // reusing its client id.
    let client_id = match (principal.device(), &principal) {
        (Some(i), _) => {
            tracing::Span::current().record("device", &*i.device_number);
            crate::devices::session_key(&i.device_number, &client_id)
        }
        (None, Principal::Service(_)) => crate::devices::session_key(&format!("@{}", c.username.as_deref().unwrap_or("")), &client_id),
        (None, _) => client_id,
    };
    // The will must be something this client may publish: checked now, never stored otherwise.
    let mut will = c.will.take();
    if let Some(w) = will.as_mut() {
        let asker = Asker { broker, svc, principal: &principal, username: c.username.as_deref(), client: &shown, v5 };
        Box::pin(admit_will(&asker, w)).await?;
    }
    let mut keep_alive = c.keep_alive;
    let max_ka = cfg.mqtt.max_keepalive_secs;
    if v5 && max_ka > 0 && (keep_alive == 0 || keep_alive > max_ka) {
        keep_alive = max_ka;
        props.server_keep_alive = Some(max_ka);
    }
    let max_expiry = cfg.mqtt.max_session_expiry_secs;
    let expiry = if v5 {
        let asked = c.props.session_expiry_interval.unwrap_or(0);
        if asked > max_expiry {
            props.session_expiry_interval = Some(max_expiry);
        }
        asked.min(max_expiry)
    } else if c.clean_start {
        0
    } else {
        cfg.mqtt.v311_session_expiry_secs.min(max_expiry)
    };
    if v5 {
        props.receive_maximum = Some(cfg.mqtt.max_inflight.max(1));
        props.maximum_packet_size = Some(cfg.mqtt.max_packet_size);
        props.topic_alias_maximum = Some(cfg.mqtt.topic_alias_max);
    }
    Ok(Negotiated { c, principal, client_id, shown, will, keep_alive, expiry, props })
}

/// Set up the write half, take a session slot of the principal, claim the client id at its
/// registrar (in a cluster) and attach the session; then the device platform and the
/// webhooks learn of the connection.
async fn attach<W>(broker: &Arc<Broker>, svc: Arc<Services>, wr: W, peer: SocketAddr, n: Negotiated, gauge: Gauge) -> Option<Established<W>>
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let cfg = &broker.config;
    let Negotiated { c, principal, client_id, shown, will, keep_alive, expiry, props } = n;
    let protocol = c.protocol;
    let v5 = protocol == Protocol::V5;
    let device = principal.device().cloned();
    // Room for a full in-flight window of resends plus answers, whatever `outbound_queue` says.
    let (tx, rx) = crate::queue::channel(cfg.mqtt.outbound_queue.max(cfg.mqtt.max_inflight as usize * 2 + 16));
    let cancel = CancellationToken::new();
    // A device's identity as its payloads are checked with, replaced when it changes.
    let identity = device.as_ref().map(|i| Arc::new(arc_swap::ArcSwap::new(i.clone())));
    let conn_id = CONN_ID.fetch_add(1, Ordering::Relaxed);
    let kicked = Arc::new(std::sync::atomic::AtomicU8::new(0));
    let handle = ConnHandle {
        kicked: kicked.clone(),
        id: conn_id,
        tx: tx.clone(),
        cancel: cancel.clone(),
        protocol,
        recv_max: c.props.receive_maximum.unwrap_or(u16::MAX),
        max_packet: c.props.maximum_packet_size.unwrap_or(u32::MAX),
        peer: peer.to_string(),
        connected_at_ms: now_ms(),
    };
    let attach = Box::new(AttachArgs {
        conn: handle,
        connack: ConnAck { session_present: false, code: reason::SUCCESS, props },
        clean_start: c.clean_start,
        will: will.map(Box::new),
        expiry,
    });
    let mount = device.as_ref().map(|i| i.mount());
    let username: Option<Arc<str>> = c.username.as_deref().map(Arc::from);
    let mut out = super::super::writer::Out::new(
        wr,
        rx,
        protocol,
        c.props.topic_alias_maximum.unwrap_or(0),
        broker.clone(),
        svc.hooks.clone(),
        mount,
        (shown.clone(), username.clone()),
    );
    // Refused from here on: the CONNACK is written, then the socket closed.
    let refuse = |code: u8| {
        let _ = tx.try_send(Outbound::Packet(Box::new(connack(code))));
        let _ = tx.try_send(Outbound::Disconnect(code));
    };
    let registry = broker.registry()?;
    // Only a principal's namespace (`{device}\0…`) has a session cap: other connects do not
    // queue at the registry for it.
    let cap = cfg.mqtt.max_sessions_per_principal;
    let room = if cap == 0 || !client_id.contains('\0') {
        true
    } else {
        let room =
            registry.ask(|reply| RegistryMessage::Room { client: client_id.clone(), cap, reply }, Some(Duration::from_secs(15))).await;
        matches!(room, Ok(ractor::rpc::CallResult::Success(true)))
    };
    if !room {
        tracing::info!(cap = cfg.mqtt.max_sessions_per_principal, "CONNECT refused: every session of this principal is connected");
        refuse(reason::QUOTA_EXCEEDED);
        drop(tx);
        let _ = tokio::time::timeout(Duration::from_secs(5), out.finish()).await;
        return None;
    }
    let session = match Box::pin(register(broker, client_id.clone(), c.clean_start, attach)).await {
        Ok(s) => s,
        Err(code) => {
            refuse(code);
            drop(tx);
            let _ = tokio::time::timeout(Duration::from_secs(5), out.finish()).await;
            return None;
        }
    };
    tracing::debug!(?protocol, clean_start = c.clean_start, keep_alive, "client connected");
    if let Some(i) = &device {
        let d = &svc.devices;
        let kick = crate::devices::Kick { tx: Some(tx.clone()), cancel: cancel.clone(), identity: identity.clone() };
        Box::pin(d.connected(&i.device_number, conn_id, kick)).await;
        // Queued downlinks for a session that kept its subscriptions (a clean start has none:
        // its SUBSCRIBE flushes them).
        if !c.clean_start {
            let (d, n) = (d.clone(), i.device_number.clone());
            tokio::spawn(async move { d.flush_pending(&n).await });
        }
    }
    if let Some(h) = svc.hooks.as_ref() {
        h.notify("on_register", v5, || crate::webhooks::body::registered(peer, username.as_deref(), &shown, v5));
    }
    let conn = Conn {
        username,
        broker: broker.clone(),
        svc,
        client_id,
        session,
        tx,
        protocol,
        aliases: HashMap::new(),
        expiry,
        new_expiry: None,
        acks: Vec::new(),
        session_lost: false,
        qos2_routing: None,
        held_acks: Default::default(),
        keep_alive,
        principal,
        identity,
        shown,
        end: Arc::new(std::sync::atomic::AtomicU16::new(0)),
    };
    Some(Established { conn, kicked, conn_id, keep_alive, cancel, out, _gauge: gauge })
}

/// Attach the session through the registry. In a cluster, the client id's registrar first
/// serialises connects cluster-wide and hands the session over from the node that had it;
/// once the new session's routes are in place the previous owner may flush (the session then
/// ends the claim), or the claim ends now.
async fn register(
    broker: &Arc<Broker>,
    client_id: Arc<str>,
    clean_start: bool,
    attach: Box<AttachArgs>,
) -> Result<ActorRef<SessionMessage>, u8> {
    let registry = broker.registry().ok_or(reason::SERVER_UNAVAILABLE)?;
    let claim = match broker.cluster.get() {
        Some(cl) => Some(Box::pin(cl.claim(client_id.clone(), clean_start)).await),
        None => None,
    };
    // The previous owner kept the session (it did not hand it over in time): the client
    // retries later rather than start without its state.
    if claim.as_ref().is_some_and(|c| c.refused) {
        tracing::info!("CONNECT refused: the session's previous node did not hand it over in time");
        return Err(reason::SERVER_BUSY);
    }
    let after = claim.as_ref().map(|t| (t.gen, t.from.clone()));
    let takeover = claim.map(|t| Takeover { gen: t.gen, from: t.from, state: t.state });
    let cid = client_id.clone();
    let (tx, attached) = ractor::concurrency::oneshot();
    let connect = |reply| RegistryMessage::Connect { client_id: cid, clean_start, attach, takeover, attached: tx.into(), reply };
    let registered = match Box::pin(registry.ask(connect, Some(Duration::from_secs(15)))).await {
        // Attached (a restored session announced its routes first): now the previous owner
        // may flush, or the claim end.
        Ok(ractor::rpc::CallResult::Success(Ok(s))) => match tokio::time::timeout(Duration::from_secs(15), attached).await {
            Ok(Ok(_)) => Ok(s),
            _ => Err("session did not answer".to_string()),
        },
        Ok(ractor::rpc::CallResult::Success(Err(e))) => Err(e),
        _ => Err("registry did not answer".into()),
    };
    match registered {
        Ok(s) => {
            if let (Some(cl), Some((gen, from))) = (broker.cluster.get(), after) {
                match from {
                    Some(node) => cl.release(client_id, gen, node),
                    None => cl.claim_done(client_id, gen),
                }
            }
            Ok(s)
        }
        Err(why) => {
            tracing::error!(error = %why, "cannot attach session");
            Err(reason::SERVER_UNAVAILABLE)
        }
    }
}
