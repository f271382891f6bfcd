//! A minimal, fast MQTT 3.1.1 client on thingsd's codec: pipelined publishing with an in-flight
//! window, and subscribers that acknowledge in batches.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use thingsd::protocols::mqtt::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, Semaphore};

pub const PAYLOAD_HEADER: usize = 20;

/// Encode (publisher id, sequence, send time) at the front of a payload of `size` bytes.
pub fn payload(publisher: u32, seq: u64, base: Instant, size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(size.max(PAYLOAD_HEADER));
    b.put_u32(publisher);
    b.put_u64(seq);
    b.put_u64(base.elapsed().as_nanos() as u64);
    b.resize(size.max(PAYLOAD_HEADER), b'x');
    b.freeze()
}

/// `size` for a JSON telemetry payload (`{"p": publisher, "s": seq, "t": ns, "temp": ..}`),
/// as a device would send, instead of the binary header.
pub const JSON: usize = 0;

/// `size` for the telemetry issue's five keys with the device's own time (`ts` = a 10 s
/// cadence from a fixed start, so every message is a new point of each series).
pub const TELEMETRY: usize = 1;

/// Where the device clocks start: 200 days ago, so a long run stays inside the node's
/// accepted window of device timestamps (a year back, a day ahead).
static START_MS: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    now.saturating_sub(200 * 86_400_000)
});

fn telemetry_payload(seq: u64) -> Bytes {
    let ts = *START_MS + seq * 10_000;
    let r = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
    Bytes::from(format!(
        r#"{{"ts":{ts},"temperature":{:.1},"humidity":{:.1},"voltage":{:.3},"door":{},"energy":{:.3}}}"#,
        20.0 + (r % 50) as f64 / 10.0,
        50.0 + (r % 30) as f64 / 10.0,
        230.0 + (r % 11) as f64 / 1000.0,
        r.is_multiple_of(97),
        seq as f64 * 0.002
    ))
}

fn json_payload(publisher: u32, seq: u64, base: Instant) -> Bytes {
    Bytes::from(format!(r#"{{"p":{publisher},"s":{seq},"t":{},"temp":{}.5}}"#, base.elapsed().as_nanos() as u64, seq % 40))
}

/// (publisher, seq, latency) of a binary or JSON payload.
pub fn parse_payload(mut p: &[u8], base: Instant) -> Option<(u32, u64, Duration)> {
    if p.first() == Some(&b'{') {
        let v: serde_json::Value = serde_json::from_slice(p).ok()?;
        let sent = v.get("t")?.as_u64()?;
        let now = base.elapsed().as_nanos() as u64;
        return Some((v.get("p")?.as_u64()? as u32, v.get("s")?.as_u64()?, Duration::from_nanos(now.saturating_sub(sent))));
    }
    if p.len() < PAYLOAD_HEADER {
        return None;
    }
    let id = p.get_u32();
    let seq = p.get_u64();
    let sent = p.get_u64();
    let now = base.elapsed().as_nanos() as u64;
    Some((id, seq, Duration::from_nanos(now.saturating_sub(sent))))
}

pub async fn connect(addr: SocketAddr, source: Option<std::net::IpAddr>, id: &str, clean: bool) -> anyhow::Result<TcpStream> {
    connect_as(addr, source, id, clean, None).await
}

/// Connect with a username (a device's access token).
pub async fn connect_as(
    addr: SocketAddr,
    source: Option<std::net::IpAddr>,
    id: &str,
    clean: bool,
    username: Option<&str>,
) -> anyhow::Result<TcpStream> {
    Ok(connect_session(addr, source, id, clean, username).await?.0)
}

/// Connect; also returns the CONNACK's Session Present flag.
pub async fn connect_session(
    addr: SocketAddr,
    source: Option<std::net::IpAddr>,
    id: &str,
    clean: bool,
    username: Option<&str>,
) -> anyhow::Result<(TcpStream, bool)> {
    let sock = TcpSocket::new_v4()?;
    if let Some(ip) = source {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let mut s = sock.connect(addr).await.with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    let c = Connect {
        protocol: Protocol::V4,
        clean_start: clean,
        keep_alive: 600,
        client_id: id.into(),
        will: None,
        username: username.map(str::to_string),
        password: None,
        props: Properties::default(),
    };
    let mut b = BytesMut::new();
    encode(&Packet::Connect(Box::new(c)), Protocol::V4, &mut b);
    s.write_all(&b).await?;
    // A 3.1.1 CONNACK is exactly 4 bytes; read only those, so packets the broker sends right
    // after it (a resumed session's queue) stay in the socket for the receiver.
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await.context("closed during connect")?;
    let mut buf = BytesMut::from(&ack[..]);
    match decode(&mut buf, Protocol::V4, usize::MAX).map_err(|e| anyhow::anyhow!("{e}"))? {
        Some(Packet::ConnAck(a)) if a.code == 0 => Ok((s, a.session_present)),
        Some(Packet::ConnAck(a)) => bail!("connect refused: CONNACK return code {}", a.code),
        other => bail!("connect refused: {other:?}"),
    }
}

/// Publish one message and, at QoS 1, wait for its PUBACK.
pub async fn publish_one(s: &mut TcpStream, topic: &str, qos: QoS, pkid: u16, payload: &[u8]) -> anyhow::Result<()> {
    let mut b = BytesMut::new();
    let p = Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        pkid: if qos == QoS::AtMostOnce { 0 } else { pkid },
        props: None,
        payload: Bytes::copy_from_slice(payload),
    };
    encode(&Packet::Publish(p), Protocol::V4, &mut b);
    s.write_all(&b).await?;
    if qos == QoS::AtMostOnce {
        return Ok(());
    }
    until(s, |p| matches!(p, Packet::PubAck(_)), "before PUBACK").await
}

/// Read from `s` until a packet `want` accepts (others are skipped).
async fn until(s: &mut TcpStream, want: impl Fn(&Packet) -> bool, what: &str) -> anyhow::Result<()> {
    let mut buf = BytesMut::new();
    loop {
        if let Some(p) = decode(&mut buf, Protocol::V4, usize::MAX).map_err(|e| anyhow::anyhow!("{e}"))? {
            if want(&p) {
                return Ok(());
            }
            continue;
        }
        if s.read_buf(&mut buf).await? == 0 {
            bail!("closed {what}");
        }
    }
}

/// Whether a PUBLISH arrives on `s` within `wait`.
pub async fn received_within(s: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = BytesMut::new();
    let read = async {
        loop {
            match decode(&mut buf, Protocol::V4, usize::MAX) {
                Ok(Some(Packet::Publish(_))) => return true,
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(_) => return false,
            }
            if !matches!(s.read_buf(&mut buf).await, Ok(n) if n > 0) {
                return false;
            }
        }
    };
    tokio::time::timeout(wait, read).await.unwrap_or(false)
}

pub async fn subscribe(s: &mut TcpStream, filter: &str, qos: QoS) -> anyhow::Result<()> {
    let mut b = BytesMut::new();
    encode(
        &Packet::Subscribe(Subscribe { pkid: 1, filters: vec![(filter.into(), SubOptions::qos(qos))], props: Properties::default() }),
        Protocol::V4,
        &mut b,
    );
    s.write_all(&b).await?;
    until(s, |p| matches!(p, Packet::SubAck(_)), "during subscribe").await
}

/// Publish `count` messages to `topic` at `qos`, keeping at most `window` unacknowledged.
#[allow(clippy::too_many_arguments)]
/// Returns when every message is acknowledged (QoS 0: written).
pub async fn publish_all(
    s: TcpStream,
    id: u32,
    topic: &str,
    qos: QoS,
    count: u64,
    window: usize,
    size: usize,
    base: Instant,
) -> anyhow::Result<()> {
    let (rd, wr) = s.into_split();
    let (tx, rx) = mpsc::channel::<BytesMut>(64);
    let writer = tokio::spawn(write_loop(wr, rx));
    let sem = Arc::new(Semaphore::new(window));
    let acker = if qos == QoS::AtMostOnce { None } else { Some(tokio::spawn(ack_loop(rd, tx.clone(), sem.clone(), count))) };
    let mut seq = 0u64;
    let mut pkid: u16 = 0;
    while seq < count {
        let mut b = BytesMut::with_capacity(16 * 1024);
        // Take as many window slots as are free now (at least one) and batch those publishes.
        let n = if qos == QoS::AtMostOnce {
            64
        } else {
            let first = sem.acquire().await?;
            first.forget();
            let mut n = 1;
            while n < 64 && seq + n < count {
                match sem.try_acquire() {
                    Ok(p) => {
                        p.forget();
                        n += 1
                    }
                    Err(_) => break,
                }
            }
            n
        };
        for _ in 0..n {
            if seq >= count {
                break;
            }
            pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
            let body = match size {
                JSON => json_payload(id, seq, base),
                TELEMETRY => telemetry_payload(seq),
                _ => payload(id, seq, base, size),
            };
            let p = Publish { dup: false, qos, retain: false, topic: topic.into(), pkid, props: None, payload: body };
            encode(&Packet::Publish(p), Protocol::V4, &mut b);
            seq += 1;
        }
        tx.send(b).await.context("writer closed")?;
    }
    if let Some(a) = acker {
        a.await??;
    }
    drop(tx);
    writer.await??;
    Ok(())
}

async fn write_loop(mut wr: OwnedWriteHalf, mut rx: mpsc::Receiver<BytesMut>) -> anyhow::Result<()> {
    while let Some(mut b) = rx.recv().await {
        while b.len() < 64 * 1024 {
            match rx.try_recv() {
                Ok(more) => b.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        wr.write_all(&b).await?;
    }
    Ok(())
}

async fn ack_loop(mut rd: OwnedReadHalf, tx: mpsc::Sender<BytesMut>, sem: Arc<Semaphore>, count: u64) -> anyhow::Result<()> {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut done = 0u64;
    while done < count {
        if rd.read_buf(&mut buf).await? == 0 {
            bail!("broker closed the publisher connection after {done} acks");
        }
        let mut out = BytesMut::new();
        while let Some(p) = decode(&mut buf, Protocol::V4, usize::MAX).map_err(|e| anyhow::anyhow!("{e}"))? {
            match p {
                Packet::PubAck(_) | Packet::PubComp(_) => {
                    done += 1;
                    sem.add_permits(1);
                }
                Packet::PubRec(a) => encode(&Packet::PubRel(Ack::new(a.pkid, 0)), Protocol::V4, &mut out),
                _ => {}
            }
        }
        if !out.is_empty() {
            tx.send(out).await?;
        }
    }
    Ok(())
}

/// What a subscriber saw.
#[derive(Default)]
pub struct Received {
    pub count: u64,
    pub dups: u64,
    pub latencies_us: Vec<u32>,
    /// Per publisher: highest seq + 1 seen and a bitmap of seen sequence numbers.
    pub seen: Vec<Vec<u64>>,
    pub last_at: Option<Instant>,
}

impl Received {
    fn mark(&mut self, publisher: u32, seq: u64) -> bool {
        let p = publisher as usize;
        if self.seen.len() <= p {
            self.seen.resize(p + 1, Vec::new());
        }
        let words = &mut self.seen[p];
        let w = (seq / 64) as usize;
        if words.len() <= w {
            words.resize(w + 1, 0);
        }
        let bit = 1u64 << (seq % 64);
        let dup = words[w] & bit != 0;
        words[w] |= bit;
        dup
    }

    /// A message received: counted, its latency kept unless it is a duplicate.
    pub fn record(&mut self, payload: &[u8], base: Instant) {
        if let Some((id, seq, lat)) = parse_payload(payload, base) {
            self.count += 1;
            if self.mark(id, seq) {
                self.dups += 1;
            } else {
                self.latencies_us.push(lat.as_micros().min(u32::MAX as u128) as u32);
            }
            self.last_at = Some(Instant::now());
        }
    }

    pub fn unique(&self) -> u64 {
        self.seen.iter().flat_map(|w| w.iter()).map(|w| w.count_ones() as u64).sum()
    }
}

/// Read publishes until `expected` unique messages arrived or nothing came for `idle`.
pub async fn receive(s: TcpStream, expected: u64, idle: Duration, base: Instant) -> anyhow::Result<Received> {
    let (mut rd, mut wr) = s.into_split();
    let mut buf = BytesMut::with_capacity(256 * 1024);
    let mut r = Received { latencies_us: Vec::with_capacity(expected as usize), ..Default::default() };
    let mut out = BytesMut::new();
    while r.count - r.dups < expected {
        match tokio::time::timeout(idle, rd.read_buf(&mut buf)).await {
            Err(_) => break,
            Ok(Ok(0)) => break,
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(_)) => {}
        }
        while let Some(p) = decode(&mut buf, Protocol::V4, usize::MAX).map_err(|e| anyhow::anyhow!("{e}"))? {
            acknowledge(&p, &mut out);
            if let Packet::Publish(p) = p {
                r.record(&p.payload, base);
            }
        }
        if !out.is_empty() {
            wr.write_all(&out).await?;
            out.clear();
        }
    }
    Ok(r)
}

/// The acknowledgement a subscriber owes for `p` (PUBACK, PUBREC, PUBCOMP), if any.
fn acknowledge(p: &Packet, out: &mut BytesMut) {
    let ack = match p {
        Packet::Publish(p) if p.qos == QoS::AtLeastOnce => Packet::PubAck(Ack::new(p.pkid, 0)),
        Packet::Publish(p) if p.qos == QoS::ExactlyOnce => Packet::PubRec(Ack::new(p.pkid, 0)),
        Packet::PubRel(a) => Packet::PubComp(Ack::new(a.pkid, 0)),
        _ => return,
    };
    encode(&ack, Protocol::V4, out);
}

/// Read (and acknowledge) up to `n` publishes, stopping after `idle` without one; returns how
/// many arrived.
pub async fn receive_n(s: &mut TcpStream, n: u64, idle: Duration) -> anyhow::Result<u64> {
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    let mut got = 0;
    while got < n {
        match tokio::time::timeout(idle, s.read_buf(&mut buf)).await {
            Err(_) | Ok(Ok(0)) => break,
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(_)) => {}
        }
        while let Some(p) = decode(&mut buf, Protocol::V4, usize::MAX).map_err(|e| anyhow::anyhow!("{e}"))? {
            acknowledge(&p, &mut out);
            got += matches!(p, Packet::Publish(_)) as u64;
        }
        if !out.is_empty() {
            s.write_all(&out).await?;
            out.clear();
        }
    }
    Ok(got)
}
