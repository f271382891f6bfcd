//! Who a device is, as authentication, ACL and payload checks need it: its identity (cached
//! by credential), its product's thing model (one per product, shared by its devices'
//! identities) and the rules derived from it.
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Acl, Devices};
use crate::storage::meta::{CredentialKind, Device, MetaError, ThingModel};

/// A sub-device as its gateway's identity carries it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubDevice {
    pub address: String,
    pub device_id: i64,
    pub device_number: Arc<str>,
    pub model: Option<Arc<ProductModel>>,
}

/// A device's product's thing model as payload checks use it. A strict product refuses keys
/// the model does not describe and values out of range; every product refuses a described
/// key's value of the wrong type (its count, sum and average would not agree otherwise).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProductModel {
    /// The product (0 in identities cached by builds before it was kept here).
    #[serde(default)]
    pub id: i64,
    pub strict: bool,
    pub model: ThingModel,
}

/// A device as authentication, ACL and payload checks need it (cached by credential).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Identity {
    pub device_id: i64,
    pub device_number: Arc<str>,
    pub enabled: bool,
    /// argon2 hash when the credential is a password.
    pub secret: Option<String>,
    /// The product's thing model (a device without a product has none). Required when read
    /// from the cache: an entry of an older build is read again from the registry. Shared by
    /// every identity of the product (a model can be kilobytes; a fleet has one per device).
    pub model: Option<Arc<ProductModel>>,
    /// Its sub-devices (a gateway has at least one, or is marked by `gateway`).
    pub gateway: bool,
    pub subs: Vec<SubDevice>,
    /// Its ACL and its ThingsBoard topic mount (`v1/devices/{number}/`), made at its first
    /// login and shared by every connection that logs in with this identity (derived from it,
    /// never cached apart from it).
    #[serde(skip)]
    pub(super) derived: std::sync::OnceLock<(Arc<Acl>, Arc<str>)>,
}

impl Identity {
    fn derived(&self) -> &(Arc<Acl>, Arc<str>) {
        self.derived.get_or_init(|| {
            let subs: Vec<String> = self.subs.iter().map(|s| s.device_number.to_string()).collect();
            (Arc::new(Acl::device(&self.device_number, self.gateway, &subs)), Arc::from(format!("v1/devices/{}/", self.device_number)))
        })
    }

    /// The rules of this device's connections.
    pub fn acl(&self) -> Arc<Acl> {
        self.derived().0.clone()
    }

    /// The prefix ThingsBoard clients write as `v1/devices/me/`.
    pub fn mount(&self) -> Arc<str> {
        self.derived().1.clone()
    }
}

/// The cache key of a credential.
pub(super) fn cred_key(kind: CredentialKind, identity: &str) -> String {
    format!("cred:{}:{identity}", kind.as_str())
}

/// An identity's key in the in-process identity map: a credential key's SHA-256 (32 bytes in
/// the entry instead of a ~80-byte string beside it).
fn cred_digest(key: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes()).into()
}

impl Devices {
    /// The identity behind a credential (cached).
    pub async fn identity(&self, kind: CredentialKind, id: &str) -> Result<Option<Arc<Identity>>, MetaError> {
        // Cached under what is stored (a token's digest), never the token itself.
        let key = cred_key(kind, &kind.stored(id));
        if let Some(local) = &self.identities {
            if let Some(i) = local.get(&cred_digest(&key)) {
                self.note_product(&i);
                return Ok(Some(i));
            }
        } else if let Some(v) = self.cache.get(&key).await {
            if let Ok(i) = serde_json::from_str::<Identity>(&v) {
                self.note_product(&i);
                return Ok(Some(Arc::new(i)));
            }
        }
        let Some((cred, dev)) = self.meta.find_credential(kind, id).await? else { return Ok(None) };
        let ident = Arc::new(self.build_identity(&dev, cred.secret).await?);
        match &self.identities {
            Some(local) => local.insert(cred_digest(&key), ident.clone()),
            None => {
                if let Ok(v) = serde_json::to_string(&*ident) {
                    self.cache.set(&key, &v, self.ttl).await;
                }
            }
        }
        self.note_product(&ident);
        Ok(Some(ident))
    }

    /// Drop cached identities (credential keys) and whatever else the cache holds under `keys`.
    pub(super) async fn uncache(&self, keys: &[String]) {
        if let Some(local) = &self.identities {
            keys.iter().for_each(|k| local.remove(&cred_digest(k)));
        }
        self.cache.del(keys).await;
    }

    /// A device changed (here or on another node): if it moved to another product, its
    /// telemetry rules follow at once, not when telemetry's product cache expires.
    pub(super) fn note_device_product(&self, d: &Device) {
        if let Some(t) = self.telemetry.get() {
            t.note_product(d.id, d.product_id);
        }
    }

    /// Tell telemetry which product a device that logged in belongs to, so its first message
    /// does not read the device again (a fleet's first telemetry round would read every one).
    fn note_product(&self, i: &Identity) {
        let product = match &i.model {
            Some(m) if m.id == 0 => return,
            Some(m) => Some(m.id),
            None => None,
        };
        if let Some(t) = self.telemetry.get() {
            t.note_product(i.device_id, product);
        }
    }

    async fn product_model(&self, product: Option<i64>) -> Result<Option<Arc<ProductModel>>, MetaError> {
        let Some(p) = product else { return Ok(None) };
        if let Some(m) = self.products.get(&p) {
            return Ok(m);
        }
        let m = match self.meta.product(p).await {
            Ok(pr) => Some(Arc::new(ProductModel { id: p, strict: pr.strict, model: pr.model })),
            Err(MetaError::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        self.products.insert(p, m.clone());
        Ok(m)
    }

    pub(super) async fn build_identity(&self, dev: &Device, secret: Option<String>) -> Result<Identity, MetaError> {
        let mut subs = Vec::new();
        for s in self.meta.sub_devices(dev.id).await? {
            subs.push(SubDevice {
                address: s.sub_address.clone().unwrap_or_default(),
                device_id: s.id,
                device_number: Arc::from(s.device_number.as_str()),
                model: self.product_model(s.product_id).await?,
            });
        }
        let gateway = !subs.is_empty() || dev.labels.get("gateway").is_some_and(|v| v == "true");
        Ok(Identity {
            device_id: dev.id,
            device_number: Arc::from(dev.device_number.as_str()),
            enabled: dev.enabled,
            secret,
            model: self.product_model(dev.product_id).await?,
            gateway,
            subs,
            derived: Default::default(),
        })
    }

    /// The identity of a device by number (for the HTTP/CoAP paths that already know it).
    pub async fn identity_of(&self, dev: &Device) -> Result<Arc<Identity>, MetaError> {
        Ok(Arc::new(self.build_identity(dev, None).await?))
    }
}
