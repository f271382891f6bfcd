//! Authentication of devices and services: access token, username + password (argon2), or
//! client certificate fingerprint; failures are rate-limited per source address.
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Devices, Principal};
use crate::storage::meta::CredentialKind;

/// What a client presented.
#[derive(Debug, Default, Clone)]
pub struct Credentials<'a> {
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    /// SHA-256 (hex) of the client certificate, on TLS listeners that ask for one.
    pub cert_fingerprint: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// Unknown credential or wrong password (MQTT 0x86 / 4; HTTP 401).
    BadCredentials,
    /// No credentials where they are required, or the device is disabled (MQTT 0x87 / 5; HTTP 403).
    NotAuthorized,
    /// Too many failures from this address (MQTT 0x9F / 5; HTTP 429).
    RateLimited,
    /// The meta store could not be asked (MQTT 0x88 / 3; HTTP 503).
    Unavailable,
}

pub use crate::secrets::{hash_password, verify_password};

/// Which failure table an attempt counts in.
#[derive(Debug, Clone, Copy)]
enum Channel {
    /// TCP (MQTT, WebSocket, HTTP): the source address is the peer's.
    Stream,
    /// UDP (CoAP): the source address may be forged.
    Datagram,
}

impl Devices {
    /// Who this client is. `allow_anonymous`: the listener accepts clients without credentials.
    pub async fn authenticate(&self, peer: IpAddr, c: &Credentials<'_>, allow_anonymous: bool) -> Result<Principal, AuthError> {
        self.authenticate_on(Channel::Stream, peer, c, allow_anonymous).await
    }

    async fn authenticate_on(&self, ch: Channel, peer: IpAddr, c: &Credentials<'_>, allow_anonymous: bool) -> Result<Principal, AuthError> {
        let peer = crate::net::address_block(peer);
        if self.limited(ch, peer) {
            self.metrics.auth_rate_limited.fetch_add(1, Ordering::Relaxed);
            return Err(AuthError::RateLimited);
        }
        let r = self.check(c, allow_anonymous).await;
        match &r {
            Ok(_) => {
                self.metrics.auth_ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(AuthError::Unavailable) => {}
            Err(_) => {
                self.metrics.auth_failed.fetch_add(1, Ordering::Relaxed);
                self.failed(ch, peer);
            }
        }
        r
    }

    async fn check(&self, c: &Credentials<'_>, allow_anonymous: bool) -> Result<Principal, AuthError> {
        let unavailable = |e: crate::storage::meta::MetaError| {
            tracing::error!(error = %e, "cannot check credentials");
            AuthError::Unavailable
        };
        if let Some(fp) = c.cert_fingerprint {
            if let Some(i) = self.identity(CredentialKind::X509, fp).await.map_err(unavailable)? {
                return self.device(i);
            }
        }
        let Some(user) = c.username.filter(|u| !u.is_empty()) else {
            return if allow_anonymous { Ok(Principal::Anonymous) } else { Err(AuthError::NotAuthorized) };
        };
        match c.password {
            None => {
                // An access token as the username (ThingsBoard / ThingsPanel style).
                match self.identity(CredentialKind::Token, user).await.map_err(unavailable)? {
                    Some(i) => self.device(i),
                    None => Err(AuthError::BadCredentials),
                }
            }
            Some(pw) => {
                if let Some((_, acl)) = self.services.iter().find(|(s, _)| s.username == user) {
                    let phc =
                        self.services.iter().find(|(s, _)| s.username == user).map(|(s, _)| s.password_hash.clone()).unwrap_or_default();
                    return if self.verify_cached(user, pw, &phc).await {
                        Ok(Principal::Service(acl.clone()))
                    } else {
                        Err(AuthError::BadCredentials)
                    };
                }
                match self.identity(CredentialKind::Password, user).await.map_err(unavailable)? {
                    Some(i) => {
                        let phc = i.secret.clone().unwrap_or_default();
                        if self.verify_cached(user, pw, &phc).await {
                            self.device(i)
                        } else {
                            Err(AuthError::BadCredentials)
                        }
                    }
                    // Some firmware sends the token as username and anything as password.
                    None => match self.identity(CredentialKind::Token, user).await.map_err(unavailable)? {
                        Some(i) => self.device(i),
                        None => Err(AuthError::BadCredentials),
                    },
                }
            }
        }
    }

    /// An access token in a URL (HTTP and CoAP device APIs).
    pub async fn authenticate_token(&self, peer: IpAddr, token: &str) -> Result<Arc<super::Identity>, AuthError> {
        self.token_on(Channel::Stream, peer, token).await
    }

    /// An access token in a CoAP URL: a UDP source address can be forged, so its failures
    /// count in their own table and never lock that address out of MQTT or HTTP.
    pub async fn authenticate_token_udp(&self, peer: IpAddr, token: &str) -> Result<Arc<super::Identity>, AuthError> {
        self.token_on(Channel::Datagram, peer, token).await
    }

    async fn token_on(&self, ch: Channel, peer: IpAddr, token: &str) -> Result<Arc<super::Identity>, AuthError> {
        match self.authenticate_on(ch, peer, &Credentials { username: Some(token), password: None, cert_fingerprint: None }, false).await? {
            Principal::Device(i, _) => Ok(i),
            _ => Err(AuthError::BadCredentials),
        }
    }

    fn device(&self, i: Arc<super::Identity>) -> Result<Principal, AuthError> {
        if !i.enabled {
            return Err(AuthError::NotAuthorized);
        }
        let acl = i.acl();
        Ok(Principal::Device(i, acl))
    }

    async fn verify_cached(&self, user: &str, pw: &[u8], phc: &str) -> bool {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(user.as_bytes());
        h.update([0]);
        h.update(pw);
        h.update([0]);
        h.update(phc.as_bytes());
        let key: [u8; 32] = h.finalize().into();
        if self.verified.contains_key(&key) {
            return true;
        }
        let (pw, phc) = (pw.to_vec(), phc.to_string());
        // argon2 takes tens of milliseconds of CPU: off the async workers.
        let ok = tokio::task::spawn_blocking(move || verify_password(&pw, &phc)).await.unwrap_or(false);
        if ok {
            self.verified.insert(key, ());
        }
        ok
    }

    /// The failure table and limit of a channel.
    fn table(&self, ch: Channel) -> (&super::Failures, u32) {
        match ch {
            Channel::Stream => (&self.failures, self.config.devices.auth_fail_limit),
            Channel::Datagram => (&self.udp_failures, self.config.devices.coap_auth_fail_limit),
        }
    }

    fn limited(&self, ch: Channel, peer: IpAddr) -> bool {
        let (table, limit) = self.table(ch);
        if limit == 0 {
            return false;
        }
        let window = Duration::from_secs(self.config.devices.auth_fail_window_secs.max(1));
        let m = table.lock().unwrap_or_else(|e| e.into_inner());
        matches!(m.get(&peer), Some((n, since)) if *n >= limit && since.elapsed() < window)
    }

    fn failed(&self, ch: Channel, peer: IpAddr) {
        let window = Duration::from_secs(self.config.devices.auth_fail_window_secs.max(1));
        let (table, limit) = self.table(ch);
        let mut m = table.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() > 100_000 {
            m.retain(|_, (_, since)| since.elapsed() < window);
        }
        let e = m.entry(peer).or_insert((0, Instant::now()));
        if e.1.elapsed() >= window {
            *e = (0, Instant::now());
        }
        e.0 += 1;
        if e.0 == limit {
            tracing::warn!(%peer, failures = e.0, "too many failed logins; refusing this address for the rest of the window");
        }
    }
}
