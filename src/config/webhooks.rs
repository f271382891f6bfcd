//! Broker webhook endpoints as configured (`[[webhooks]]`); the webhooks module calls them.
use serde::{Deserialize, Serialize};

/// One configured endpoint (`[[webhooks]]` in cluster.toml).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// The hook, as VerneMQ names it (`auth_on_publish`, `on_register_m5`, …).
    pub hook: String,
    pub endpoint: String,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// What an endpoint that fails or times out means for an auth hook.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Payloads as base64 (VerneMQ's default) or as UTF-8 text.
    #[serde(default = "yes")]
    pub base64_payload: bool,
    /// Notifications waiting for this endpoint; beyond it they are dropped and counted.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Notification requests in flight at once to this endpoint.
    #[serde(default = "default_batch")]
    pub batch: usize,
}

fn default_timeout() -> u64 {
    5000
}
fn yes() -> bool {
    true
}
fn default_queue() -> usize {
    10_000
}
fn default_batch() -> usize {
    32
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Refuse (fail closed).
    #[default]
    Deny,
    /// As if the endpoint answered `next`.
    Next,
    /// Allow.
    Allow,
}
