//! PROXY protocol (v1 text and v2 binary, as sent by HAProxy `send-proxy` / `send-proxy-v2`
//! and nginx `proxy_protocol on`) on listeners configured for it: the client's real address
//! replaces the load balancer's in logs (and, later, in ACLs). The header is read exactly (no
//! byte of the MQTT stream is consumed), bounded in size and time.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

const V2_SIG: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 line (spec: 107 bytes including CRLF).
const V1_MAX: usize = 107;
/// Longest v2 address block we accept (addresses plus TLVs).
const V2_MAX: usize = 1024;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProxyError {
    #[error("no PROXY protocol header")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    #[error("connection closed in the PROXY header")]
    Closed,
}

/// Read a PROXY header; `Ok(Some(addr))` is the client's address, `Ok(None)` a LOCAL/UNKNOWN
/// connection (the balancer's own health check): keep the socket's peer address.
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<SocketAddr>, ProxyError> {
    let mut first = [0u8; 1];
    r.read_exact(&mut first).await.map_err(|_| ProxyError::Closed)?;
    match first[0] {
        b'\r' => v2(r).await,
        b'P' => v1(r).await,
        _ => Err(ProxyError::Missing),
    }
}

async fn v2<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<SocketAddr>, ProxyError> {
    let mut head = [0u8; 15];
    r.read_exact(&mut head).await.map_err(|_| ProxyError::Closed)?;
    if head[..11] != V2_SIG[1..] {
        return Err(ProxyError::Missing);
    }
    let (ver_cmd, fam) = (head[11], head[12]);
    let len = u16::from_be_bytes([head[13], head[14]]) as usize;
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::Malformed("version is not 2"));
    }
    if len > V2_MAX {
        return Err(ProxyError::Malformed("address block too long"));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|_| ProxyError::Closed)?;
    match ver_cmd & 0x0f {
        0 => return Ok(None), // LOCAL
        1 => {}
        _ => return Err(ProxyError::Malformed("unknown command")),
    }
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    match fam >> 4 {
        1 if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), port(&body[8..10]))))
        }
        2 if body.len() >= 36 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&body[..16]);
            Ok(Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), port(&body[32..34]))))
        }
        0 => Ok(None), // UNSPEC
        1 | 2 => Err(ProxyError::Malformed("address block too short")),
        _ => Ok(None), // AF_UNIX: no IP address to report
    }
}

async fn v1<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<SocketAddr>, ProxyError> {
    let mut line = vec![b'P'];
    let mut b = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX {
            return Err(ProxyError::Malformed("v1 line too long"));
        }
        r.read_exact(&mut b).await.map_err(|_| ProxyError::Closed)?;
        line.push(b[0]);
    }
    let text = std::str::from_utf8(&line[..line.len() - 2]).map_err(|_| ProxyError::Malformed("v1 line is not text"))?;
    let parts: Vec<&str> = text.split(' ').collect();
    match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(None),
        ["PROXY", "TCP4" | "TCP6", src, _dst, sport, _dport] => {
            let ip: IpAddr = src.parse().map_err(|_| ProxyError::Malformed("v1 source address"))?;
            let port: u16 = sport.parse().map_err(|_| ProxyError::Malformed("v1 source port"))?;
            Ok(Some(SocketAddr::new(ip, port)))
        }
        _ => Err(ProxyError::Malformed("v1 line")),
    }
}

/// Encode a v2 PROXY header for a TCP/IPv4 connection (used by tests and tools).
pub fn v2_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = V2_SIG.to_vec();
    h.push(0x21);
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            h.push(0x11);
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&s.ip().octets());
            h.extend_from_slice(&d.ip().octets());
            h.extend_from_slice(&s.port().to_be_bytes());
            h.extend_from_slice(&d.port().to_be_bytes());
        }
        _ => {
            h.push(0x21);
            h.extend_from_slice(&36u16.to_be_bytes());
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V6(x) => x.octets(),
                IpAddr::V4(x) => x.to_ipv6_mapped().octets(),
            };
            h.extend_from_slice(&v6(src));
            h.extend_from_slice(&v6(dst));
            h.extend_from_slice(&src.port().to_be_bytes());
            h.extend_from_slice(&dst.port().to_be_bytes());
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyError>, Vec<u8>) {
        let mut r = std::io::Cursor::new(bytes.to_vec());
        let res = read_header(&mut r).await;
        let mut rest = Vec::new();
        let _ = r.read_to_end(&mut rest).await;
        (res, rest)
    }

    #[tokio::test]
    async fn v2_ipv4_and_rest_untouched() {
        let src: SocketAddr = "10.1.2.3:4567".parse().unwrap();
        let mut b = v2_header(src, "127.0.0.1:1883".parse().unwrap());
        b.extend_from_slice(b"\x10MQTT");
        let (r, rest) = parse(&b).await;
        assert_eq!(r, Ok(Some(src)));
        assert_eq!(rest, b"\x10MQTT");
    }

    #[tokio::test]
    async fn v2_ipv6_local_and_v1() {
        let src: SocketAddr = "[2001:db8::1]:80".parse().unwrap();
        assert_eq!(parse(&v2_header(src, "[::1]:1883".parse().unwrap())).await.0, Ok(Some(src)));
        let mut local = V2_SIG.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local).await.0, Ok(None));
        let (r, rest) = parse(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nX").await;
        assert_eq!(r, Ok(Some("192.168.0.1:56324".parse().unwrap())));
        assert_eq!(rest, b"X");
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").await.0, Ok(None));
    }

    #[tokio::test]
    async fn bad_headers_are_errors() {
        assert_eq!(parse(b"\x10\x0c\x00\x04MQTT").await.0, Err(ProxyError::Missing));
        assert!(parse(&[b'P'; 200]).await.0.is_err());
        let mut long = V2_SIG.to_vec();
        long.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&long).await.0, Err(ProxyError::Malformed("address block too long")));
        assert_eq!(parse(b"PROXY TCP4 nope 1.2.3.4 1 2\r\n").await.0, Err(ProxyError::Malformed("v1 source address")));
        assert_eq!(parse(&V2_SIG[..5]).await.0, Err(ProxyError::Closed));
    }
}
