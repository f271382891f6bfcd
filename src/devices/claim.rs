//! Claiming, as ThingsBoard devices do it: a device offers itself (`v1/devices/me/claim` or
//! HTTP `POST /api/v1/{token}/claim`, `{"secretKey": "...", "durationMs": 60000}`), and within
//! that time a user who knows the secret claims it through the REST API — the device moves to
//! the user's tenant (leaving its product and group behind) and reconnects there. The offer
//! lives in the shared cache (so any node can take the claim), keyed by the device, holding
//! the secret's SHA-256 only; five wrong secrets end it.
use std::time::Duration;

use serde_json::{json, Value};
use sha2::Digest;

use super::{Devices, Identity};
use crate::storage::meta::{Device, MetaError};

/// Longest offer a device can make (ThingsBoard's SDKs default to 30 s).
const MAX_OFFER: Duration = Duration::from_secs(7 * 86_400);
/// Wrong secrets per offer before it ends.
const MAX_FAILURES: u64 = 5;
/// Longest secret kept (bytes).
const MAX_SECRET: usize = 256;

fn offer_key(number: &str) -> String {
    format!("claim:{number}")
}

fn digest(secret: &str) -> String {
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}

/// Equal digests, compared without an early exit.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Devices {
    /// A device offers itself for claiming: `{"secretKey": "...", "durationMs": n}` (both
    /// optional: an empty secret; 60 s). A gateway or a sub-device cannot be claimed (its
    /// sub-devices, or its gateway, stay in their tenant).
    pub async fn offer_claim(&self, ident: &Identity, payload: &[u8]) -> Result<(), MetaError> {
        if ident.gateway || !ident.subs.is_empty() {
            return Err(MetaError::Invalid("a gateway cannot be claimed".into()));
        }
        let v: Value = if payload.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            serde_json::from_slice(payload).map_err(|e| MetaError::Invalid(format!("claim request: {e}")))?
        };
        let secret = match v.get("secretKey") {
            None | Some(Value::Null) => "",
            Some(Value::String(s)) if s.len() <= MAX_SECRET => s.as_str(),
            Some(_) => return Err(MetaError::Invalid(format!("secretKey must be a string of at most {MAX_SECRET} bytes"))),
        };
        let ms = match v.get("durationMs") {
            None | Some(Value::Null) => 60_000,
            Some(d) => d.as_u64().ok_or_else(|| MetaError::Invalid("durationMs must be a positive number".into()))?,
        };
        let ttl = Duration::from_millis(ms).clamp(Duration::from_secs(1), MAX_OFFER);
        let until = crate::message::now_ms() + ttl.as_millis() as u64;
        let offer = json!({"secret": digest(secret), "until": until});
        self.cache.set(&offer_key(&ident.device_number), &offer.to_string(), ttl).await;
        self.cache.del(&[format!("claimfail:{}", ident.device_number)]).await;
        tracing::info!(device = %ident.device_number, secs = ttl.as_secs(), "device offers itself for claiming");
        Ok(())
    }

    /// Claim device `number` for tenant `tenant` with `secret`. `Ok(None)`: no such device,
    /// no offer, or the wrong secret (the same answer for each). The device moves to the
    /// tenant without product or group and its connections end (it reconnects as the new
    /// tenant's device).
    pub async fn claim(&self, number: &str, secret: &str, tenant: i64) -> Result<Option<Device>, MetaError> {
        let Some(offer) = self.cache.take(&offer_key(number)).await else { return Ok(None) };
        let offer: Value = serde_json::from_str(&offer).unwrap_or_default();
        let (want, until) = (offer["secret"].as_str().unwrap_or(""), offer["until"].as_u64().unwrap_or(0));
        let now = crate::message::now_ms();
        if !same(want, &digest(secret)) {
            let fails = self.cache.incr(&format!("claimfail:{number}"), Duration::from_millis(until.saturating_sub(now).max(1))).await;
            if fails < MAX_FAILURES && until > now {
                // Put back for the rightful claimer, for the time it had left.
                self.cache.set(&offer_key(number), &offer.to_string(), Duration::from_millis(until - now)).await;
            } else {
                tracing::warn!(device = %number, "claim offer ended after {MAX_FAILURES} wrong secrets");
            }
            return Ok(None);
        }
        let dev = match self.meta.device(number).await {
            Ok(d) => d,
            Err(MetaError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let moved = self.meta.move_device(dev.id, tenant).await?;
        self.changed(&moved, true).await;
        tracing::info!(device = %number, from = dev.tenant_id, to = tenant, "device claimed");
        Ok(Some(moved))
    }
}
