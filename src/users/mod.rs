//! People on the platform: sign-in with a password (argon2), short-lived signed access tokens
//! (JWT, HS256) and refresh tokens, sessions kept in the cache (Redis when configured, so a
//! logout or a password change revokes them on every node), login rate limits per account and
//! per source address, roles and their permissions, and the first system administrator.
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::ApiConfig;
use crate::secrets::{hash_password, random_token, sha256_hex, verify_password};
use crate::storage::cache::Cache;
use crate::storage::meta::{now_ms, MetaError, MetaStore, NewUser, User};

/// Every permission a role can hold.
pub const PERMISSIONS: &[&str] = &[
    "tenant:manage",
    "user:read",
    "user:manage",
    "role:manage",
    "product:read",
    "product:write",
    "device:read",
    "device:write",
    "device:command",
    "telemetry:read",
    "telemetry:manage",
    "alert:read",
    "alert:write",
    "alert:ack",
    "channel:manage",
    "audit:read",
];

/// Built-in roles.
pub const SYSTEM_ADMIN: &str = "system_admin";
pub const TENANT_ADMIN: &str = "tenant_admin";
pub const TENANT_USER: &str = "tenant_user";
pub const CUSTOM: &str = "custom";

/// The permissions of a built-in role (None: not a built-in role).
pub fn builtin(role: &str) -> Option<Vec<&'static str>> {
    match role {
        SYSTEM_ADMIN => Some(PERMISSIONS.to_vec()),
        TENANT_ADMIN => Some(PERMISSIONS.iter().copied().filter(|p| *p != "tenant:manage").collect()),
        TENANT_USER => Some(vec!["product:read", "device:read", "telemetry:read", "alert:read", "alert:ack"]),
        _ => None,
    }
}

/// Who is calling, and what they may do. `tenant == None` is the system scope (every tenant).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Principal {
    pub user_id: Option<i64>,
    pub username: String,
    pub tenant: Option<i64>,
    pub role: String,
    pub permissions: BTreeSet<String>,
    /// The session this request belongs to (users; None for API keys).
    #[serde(skip)]
    pub session: Option<String>,
}

impl Principal {
    /// An admin API key: the system scope with every permission.
    pub fn api_key() -> Principal {
        Principal {
            user_id: None,
            username: "api-key".into(),
            tenant: None,
            role: SYSTEM_ADMIN.into(),
            permissions: PERMISSIONS.iter().map(|p| p.to_string()).collect(),
            session: None,
        }
    }

    pub fn can(&self, perm: &str) -> bool {
        self.permissions.contains(perm)
    }

    /// How the audit log names this caller.
    pub fn actor(&self) -> String {
        match self.user_id {
            Some(_) => format!("user:{}", self.username),
            None => self.username.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("wrong username or password")]
    Wrong,
    #[error("too many failed logins; retry in {0} s")]
    Limited(u64),
    #[error("too many logins at once; retry shortly")]
    Busy,
    #[error("the session has ended; log in again")]
    Expired,
    #[error(transparent)]
    Meta(#[from] MetaError),
}

/// What a login or a refresh answers.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Tokens {
    pub access_token: String,
    pub token_type: &'static str,
    /// Seconds the access token lives.
    pub expires_in: u64,
    /// Exchanged for a new pair at `/api/v1/auth/refresh` (each is good once).
    pub refresh_token: String,
    pub user: User,
}

#[derive(Serialize, Deserialize)]
struct Claims {
    sub: i64,
    sid: String,
    iat: u64,
    exp: u64,
}

/// A session as the cache keeps it.
#[derive(Serialize, Deserialize)]
struct Session {
    uid: i64,
    created_ms: i64,
    /// SHA-256 of the current refresh secret (rotated on every refresh).
    refresh: String,
}

/// The sign-in service.
pub struct Users {
    pub meta: MetaStore,
    cache: Cache,
    config: ApiConfig,
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// Bounds the argon2 checks running at once (CPU and memory under a login flood).
    checks: tokio::sync::Semaphore,
}

const PRINCIPAL_TTL: Duration = Duration::from_secs(60);

impl Users {
    /// Load (or create) the signing secret and the first system administrator.
    pub async fn start(meta: MetaStore, cache: Cache, config: ApiConfig) -> anyhow::Result<Users> {
        let secret = if config.jwt_secret.is_empty() {
            meta.setting_or_insert("jwt_secret", &random_token()).await?
        } else {
            anyhow::ensure!(config.jwt_secret.len() >= 32, "api.jwt_secret must have at least 32 characters");
            config.jwt_secret.clone()
        };
        let users = Users {
            checks: tokio::sync::Semaphore::new(config.max_concurrent_logins.max(1)),
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            meta,
            cache,
            config,
        };
        users.bootstrap().await?;
        Ok(users)
    }

    async fn bootstrap(&self) -> anyhow::Result<()> {
        if self.meta.user_count().await? > 0 {
            return Ok(());
        }
        let (password, shown) = if self.config.admin_password.is_empty() {
            (random_token(), true)
        } else {
            anyhow::ensure!(self.config.admin_password.len() >= 8, "api.admin_password must have at least 8 characters");
            (self.config.admin_password.clone(), false)
        };
        let hash = hash(password.clone()).await;
        let u = NewUser { tenant_id: None, username: &self.config.admin_user, password_hash: &hash, role: SYSTEM_ADMIN, role_id: None };
        match self.meta.create_user(&u).await {
            Ok(_) => {}
            // Another node starting on the same database made it first.
            Err(MetaError::Conflict(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        if shown {
            println!("thingsd: web/API user {:?} password (shown once, store it now): {password}", self.config.admin_user);
            tracing::warn!(user = %self.config.admin_user, "created the first system administrator; its password is shown only now");
        } else {
            tracing::info!(user = %self.config.admin_user, "created the configured system administrator (api.admin_password)");
        }
        Ok(())
    }

    /// Check a password and open a session. Failed attempts count against the account and
    /// the source address; past either limit the answer is `Limited` without checking.
    pub async fn login(&self, username: &str, password: &str, from: IpAddr) -> Result<Tokens, LoginError> {
        let window = Duration::from_secs(self.config.login_window_secs.max(1));
        let from = crate::net::address_block(from);
        // The account's counter is per source address too, so nobody can lock an account
        // for everyone else.
        let (acct_key, addr_key) = (format!("loginfail:u:{}:{from}", username.to_lowercase()), format!("loginfail:a:{from}"));
        let over = |k: &str, limit: u32| {
            let k = k.to_string();
            async move { self.cache.get(&k).await.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) >= limit as u64 }
        };
        if over(&acct_key, self.config.login_fail_limit_account).await || over(&addr_key, self.config.login_fail_limit_address).await {
            return Err(LoginError::Limited(window.as_secs()));
        }
        let user = self.meta.user_by_name(username).await?;
        // Unknown users cost the same as wrong passwords (no user enumeration by timing).
        let phc = user.as_ref().map(|u| u.password_hash.clone()).unwrap_or_else(|| DUMMY_HASH.to_string());
        let pw = password.as_bytes().to_vec();
        let queue = Duration::from_millis(self.config.login_queue_ms);
        let Ok(Ok(_permit)) = tokio::time::timeout(queue, self.checks.acquire()).await else { return Err(LoginError::Busy) };
        let good = tokio::task::spawn_blocking(move || verify_password(&pw, &phc)).await.unwrap_or(false);
        let user = match user {
            Some(u) if good && !u.disabled => u,
            _ => {
                self.cache.incr(&acct_key, window).await;
                self.cache.incr(&addr_key, window).await;
                return Err(LoginError::Wrong);
            }
        };
        self.cache.del(&[acct_key]).await;
        let sid = random_token();
        self.issue(user, sid, now_ms()).await
    }

    /// Exchange a refresh token (`<session>.<secret>`) for a new pair. A refresh token used
    /// twice ends the session (it was copied).
    pub async fn refresh(&self, token: &str) -> Result<Tokens, LoginError> {
        let (sid, secret) = token.split_once('.').ok_or(LoginError::Expired)?;
        let key = format!("usess:{sid}");
        let s: Session = self.cache.get(&key).await.and_then(|v| serde_json::from_str(&v).ok()).ok_or(LoginError::Expired)?;
        if s.refresh != sha256_hex(secret.as_bytes()) {
            self.cache.del(&[key]).await;
            return Err(LoginError::Expired);
        }
        let user = self.meta.user(s.uid).await.map_err(|_| LoginError::Expired)?;
        if user.disabled || s.created_ms < user.revoked_before_ms {
            self.cache.del(&[key]).await;
            return Err(LoginError::Expired);
        }
        self.issue(user, sid.to_string(), s.created_ms).await
    }

    async fn issue(&self, user: User, sid: String, created_ms: i64) -> Result<Tokens, LoginError> {
        let secret = random_token();
        let s = Session { uid: user.id, created_ms, refresh: sha256_hex(secret.as_bytes()) };
        let json = serde_json::to_string(&s).map_err(|e| MetaError::Invalid(e.to_string()))?;
        self.cache.set(&format!("usess:{sid}"), &json, Duration::from_secs(self.config.refresh_ttl_secs)).await;
        let now = now_ms() as u64 / 1000;
        let claims = Claims { sub: user.id, sid: sid.clone(), iat: now, exp: now + self.config.access_ttl_secs };
        let access = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| MetaError::Invalid(format!("cannot sign a token: {e}")))?;
        Ok(Tokens {
            access_token: access,
            token_type: "Bearer",
            expires_in: self.config.access_ttl_secs,
            refresh_token: format!("{sid}.{secret}"),
            user,
        })
    }

    /// End one session (logout).
    pub async fn logout(&self, sid: &str) {
        self.cache.del(&[format!("usess:{sid}")]).await;
    }

    /// The caller of an access token, or None when the token is invalid, expired or its
    /// session has ended.
    pub async fn authenticate(&self, token: &str) -> Result<Option<Principal>, MetaError> {
        let mut v = Validation::new(Algorithm::HS256);
        v.leeway = 5;
        let Ok(data) = jsonwebtoken::decode::<Claims>(token, &self.decoding, &v) else { return Ok(None) };
        let c = data.claims;
        let Some(s) = self.cache.get(&format!("usess:{}", c.sid)).await.and_then(|v| serde_json::from_str::<Session>(&v).ok()) else {
            return Ok(None);
        };
        if s.uid != c.sub {
            return Ok(None);
        }
        let Some((mut p, revoked_before)) = self.principal(c.sub).await? else { return Ok(None) };
        if s.created_ms < revoked_before {
            return Ok(None);
        }
        p.session = Some(c.sid);
        Ok(Some(p))
    }

    /// A user's principal (cached briefly; dropped from the cache on every change to the user
    /// or its role), and the instant before which its sessions are revoked.
    async fn principal(&self, uid: i64) -> Result<Option<(Principal, i64)>, MetaError> {
        let key = format!("uprin:{uid}");
        if let Some(v) = self.cache.get(&key).await.and_then(|v| serde_json::from_str::<(Principal, i64)>(&v).ok()) {
            return Ok(Some(v));
        }
        let user = match self.meta.user(uid).await {
            Ok(u) if !u.disabled => u,
            Ok(_) | Err(MetaError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let permissions: BTreeSet<String> = self.permissions_of(&user).await?.into_iter().collect();
        let p = Principal {
            user_id: Some(user.id),
            username: user.username,
            tenant: user.tenant_id,
            role: user.role,
            permissions,
            session: None,
        };
        let v = (p, user.revoked_before_ms);
        if let Ok(json) = serde_json::to_string(&v) {
            self.cache.set(&key, &json, PRINCIPAL_TTL).await;
        }
        Ok(Some(v))
    }

    /// The permissions `user` holds through its role.
    pub async fn permissions_of(&self, user: &User) -> Result<Vec<String>, MetaError> {
        Ok(match builtin(&user.role) {
            Some(list) => list.into_iter().map(String::from).collect(),
            None => match user.role_id {
                Some(r) => match self.meta.role(r).await {
                    Ok(role) => role.permissions,
                    Err(MetaError::NotFound(_)) => Vec::new(),
                    Err(e) => return Err(e),
                },
                None => Vec::new(),
            },
        })
    }

    /// Forget cached principals (after a user or role change).
    pub async fn forget(&self, uids: &[i64]) {
        let keys: Vec<String> = uids.iter().map(|u| format!("uprin:{u}")).collect();
        self.cache.del(&keys).await;
    }

    /// Users holding custom role `role_id` (to forget their principals when it changes).
    pub async fn holders(&self, role_id: i64) -> Result<Vec<i64>, MetaError> {
        let q = crate::storage::meta::ListQuery { eq: vec![("role_id".into(), role_id)], limit: 1000, ..Default::default() };
        Ok(self.meta.list_users(&q).await?.items.into_iter().map(|u| u.id).collect())
    }
}

/// argon2 off the async workers.
pub async fn hash(password: String) -> String {
    tokio::task::spawn_blocking(move || hash_password(password.as_bytes())).await.unwrap_or_default()
}

/// Verified against when the user does not exist, so both cases take as long.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc";

/// Check a new password's strength (length only: the NIST advice).
pub fn check_password(p: &str) -> Result<(), MetaError> {
    if p.chars().count() < 8 || p.len() > 256 {
        return Err(MetaError::Invalid("passwords need 8..256 characters".into()));
    }
    Ok(())
}

pub type Shared = Arc<Users>;
