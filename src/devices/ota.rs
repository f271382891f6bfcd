//! Over-the-air updates, as ThingsBoard's device SDKs expect them: a package (firmware or
//! software) is announced to a device through its `fw_*` / `sw_*` shared attributes (title,
//! version, size, checksum and algorithm); the device asks for it in chunks — MQTT
//! `v2/fw/request/{request}/chunk/{index}` (payload: the chunk size) answered on
//! `v2/fw/response/{request}/chunk/{index}`, or HTTP `GET /api/v1/{token}/firmware` — and
//! reports its progress as telemetry (`fw_state`, `current_fw_title`, `current_fw_version`).
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::downlink::DownlinkRequest;
use super::Devices;
use crate::storage::meta::{AttributeScope, Command, CommandKind, MetaError, Package, PackageKind};

/// Bytes of recently served packages, weighed by size.
pub(super) fn package_cache() -> moka::sync::Cache<i64, Bytes> {
    moka::sync::Cache::builder()
        .max_capacity(64 << 20)
        .weigher(|_, b: &Bytes| u32::try_from(b.len()).unwrap_or(u32::MAX))
        .time_to_idle(Duration::from_secs(3600))
        .build()
}

/// The shared attributes that announce `p` to a device.
pub fn announcement(p: &Package) -> Map<String, Value> {
    let pre = p.kind.prefix();
    let mut m = Map::new();
    m.insert(format!("{pre}_title"), json!(p.title));
    m.insert(format!("{pre}_version"), json!(p.version));
    m.insert(format!("{pre}_size"), json!(p.size));
    m.insert(format!("{pre}_checksum"), json!(p.checksum));
    m.insert(format!("{pre}_checksum_algorithm"), json!(p.checksum_algorithm));
    m
}

/// What a device topic asks for: `v1/devices/{number}/v2/{fw|sw}/request/{request}/chunk/{index}`
/// (the device's `v2/…` mounted under its own prefix): the kind, the request id, the index.
pub fn chunk_request<'a>(topic: &'a str, number: &str) -> Option<(PackageKind, &'a str, u64)> {
    let l: Vec<&str> = topic.split('/').collect();
    match l.as_slice() {
        ["v1", "devices", n, "v2", kind, "request", req, "chunk", index] if *n == number => {
            Some((PackageKind::from_prefix(kind)?, req, index.parse().ok()?))
        }
        _ => None,
    }
}

/// The chunk size a device asked for: its payload as a decimal number; empty (or 0) means
/// the whole package.
pub fn asked_size(payload: &[u8]) -> Option<usize> {
    let s = std::str::from_utf8(payload).ok()?.trim();
    if s.is_empty() {
        return Some(0);
    }
    s.parse().ok()
}

impl Devices {
    /// Announce package `p` to device `number`: its `fw_*` / `sw_*` shared attributes are
    /// stored and sent to it (an attribute set, tracked like any).
    pub async fn assign_package(&self, number: &str, p: &Package) -> Result<Command, MetaError> {
        let req = DownlinkRequest { method: None, params: Value::Object(announcement(p)), ttl_secs: None };
        self.send_downlink(number, CommandKind::AttributeSet, req).await
    }

    /// The package announced to a device (by its shared attributes), if any.
    pub async fn announced_package(&self, device_id: i64, kind: PackageKind) -> Result<Option<Package>, MetaError> {
        let pre = kind.prefix();
        let keys = [format!("{pre}_title"), format!("{pre}_version")];
        let a = self.meta.attributes(device_id, AttributeScope::Shared, &keys).await?;
        match (a.get(&keys[0]).and_then(Value::as_str), a.get(&keys[1]).and_then(Value::as_str)) {
            (Some(t), Some(v)) => self.meta.package_for_device(device_id, kind, t, v).await,
            _ => Ok(None),
        }
    }

    /// Chunk `index` of the package announced to the device (see [`Devices::package_chunk`]).
    /// `NotFound` when no package (of the device's tenant) is announced to it.
    pub async fn announced_chunk(&self, device_id: i64, kind: PackageKind, index: u64, size: usize) -> Result<Bytes, MetaError> {
        match self.announced_package(device_id, kind).await? {
            Some(p) => self.package_chunk(&p, index, size).await,
            None => Err(MetaError::NotFound(format!("{} announced to this device", kind.as_str()))),
        }
    }

    /// Chunk `index` of package `p`, `size` bytes each (0: the whole package; at most
    /// `devices.ota_max_chunk_bytes`). Past the end: empty.
    pub async fn package_chunk(&self, p: &Package, index: u64, size: usize) -> Result<Bytes, MetaError> {
        let data = self.package_bytes(p.id).await?;
        let size = if size == 0 { data.len() } else { size }.clamp(1, self.config.devices.ota_max_chunk_bytes.max(1));
        let start = usize::try_from(index.saturating_mul(size as u64)).unwrap_or(usize::MAX).min(data.len());
        Ok(data.slice(start..start.saturating_add(size).min(data.len())))
    }

    /// A package's bytes, from this node's memory or the meta store.
    pub async fn package_bytes(&self, id: i64) -> Result<Bytes, MetaError> {
        if let Some(b) = self.packages.get(&id) {
            return Ok(b);
        }
        let b = Bytes::from(self.meta.package_data(id).await?);
        self.packages.insert(id, b.clone());
        Ok(b)
    }

    /// A package was deleted: forget its bytes here.
    pub fn package_deleted(&self, id: i64) {
        self.packages.invalidate(&id);
    }

    /// Where a device stands with OTA, per kind: the package announced to it (`assigned`),
    /// what it reports running (`current_{fw|sw}_title` / `_version`) and its last
    /// `{fw|sw}_state` (`DOWNLOADING`, `DOWNLOADED`, `VERIFIED`, `UPDATING`, `UPDATED`,
    /// `FAILED`), from its latest telemetry.
    pub async fn ota_status(&self, device_id: i64) -> Result<Value, MetaError> {
        let latest = match self.telemetry.get() {
            Some(t) => t.latest(device_id).await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read latest telemetry for the OTA status");
                json!({})
            }),
            None => json!({}),
        };
        let mut out = Map::new();
        for kind in [PackageKind::Firmware, PackageKind::Software] {
            let pre = kind.prefix();
            let assigned = self.announced_package(device_id, kind).await?;
            let v = |k: String| latest.get(&k).map(|x| x["value"].clone()).unwrap_or(Value::Null);
            let state_ts = latest.get(format!("{pre}_state")).map(|x| x["ts"].clone()).unwrap_or(Value::Null);
            out.insert(
                kind.as_str().into(),
                json!({
                    "assigned": assigned,
                    "current": {"title": v(format!("current_{pre}_title")), "version": v(format!("current_{pre}_version"))},
                    "state": v(format!("{pre}_state")),
                    "state_ts": state_ts,
                }),
            );
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_topics_and_sizes() {
        assert_eq!(chunk_request("v1/devices/d1/v2/fw/request/3/chunk/7", "d1"), Some((PackageKind::Firmware, "3", 7)));
        assert_eq!(chunk_request("v1/devices/d1/v2/sw/request/a/chunk/0", "d1"), Some((PackageKind::Software, "a", 0)));
        assert_eq!(chunk_request("v1/devices/d2/v2/fw/request/3/chunk/7", "d1"), None);
        assert_eq!(chunk_request("v1/devices/d1/v2/xx/request/3/chunk/7", "d1"), None);
        assert_eq!(chunk_request("v1/devices/d1/v2/fw/request/3/chunk/x", "d1"), None);
        assert_eq!(asked_size(b""), Some(0));
        assert_eq!(asked_size(b"65536"), Some(65536));
        assert_eq!(asked_size(b"abc"), None);
    }
}
