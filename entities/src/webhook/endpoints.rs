//! Webhook endpoints: what "the same endpoint" means, and the endpoints disabled after a
//! `410 Gone`, shared by every runner through Redis.
//!
//! An [`Endpoint`] is a URL without its query and fragment (`https://host:port/path`): the
//! unit of the circuit breaker and of disabling. The disabled set is one Redis hash
//! (`<prefix>:webhook:disabled`, endpoint → why and when), so a runner that never called
//! the endpoint refuses it too, and it survives restarts of the runners (not a flush of
//! Redis: an endpoint lost that way is called again and disabled again on its next 410).
//! An operator re-enables one with `shoal webhooks enable URL`.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shoal::redis::{RedisClient, RedisError};

/// A webhook URL without its query and fragment.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Endpoint(String);

impl Endpoint {
    /// The endpoint `url` is delivered to.
    pub fn of(url: &reqwest::Url) -> Self {
        let mut url = url.clone();
        url.set_query(None);
        url.set_fragment(None);
        Self(url.into())
    }

    /// The endpoint as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why and since when an endpoint is disabled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disabled {
    /// When it was disabled.
    pub at: DateTime<Utc>,
    /// Why (for example `410 Gone: <response snippet>`).
    pub reason: String,
}

/// The disabled endpoints, in Redis.
#[derive(Debug, Clone)]
pub struct Endpoints {
    redis: RedisClient,
    key: String,
}

impl Endpoints {
    /// The disabled set under `redis`'s prefix.
    pub fn new(redis: RedisClient) -> Self {
        Self {
            key: redis.key("webhook", "disabled"),
            redis,
        }
    }

    /// Whether `endpoint` is disabled, and why.
    pub async fn disabled(&self, endpoint: &Endpoint) -> Result<Option<Disabled>, RedisError> {
        let mut cmd = ::redis::cmd("HGET");
        cmd.arg(&self.key).arg(endpoint.as_str());
        let value: Option<String> = self.redis.command("webhook_disabled", &cmd).await?;
        Ok(value.and_then(|v| serde_json::from_str(&v).ok()))
    }

    /// Disables `endpoint` (again: the first reason is replaced).
    pub async fn disable(&self, endpoint: &Endpoint, reason: &str) -> Result<(), RedisError> {
        let record = Disabled {
            at: Utc::now(),
            reason: reason.to_owned(),
        };
        let value = serde_json::to_string(&record).unwrap_or_default();
        let mut cmd = ::redis::cmd("HSET");
        cmd.arg(&self.key).arg(endpoint.as_str()).arg(value);
        self.redis
            .command::<i64>("webhook_disable", &cmd)
            .await
            .map(drop)
    }

    /// Enables `endpoint` again; false when it was not disabled.
    pub async fn enable(&self, endpoint: &Endpoint) -> Result<bool, RedisError> {
        let mut cmd = ::redis::cmd("HDEL");
        cmd.arg(&self.key).arg(endpoint.as_str());
        let removed: i64 = self.redis.command("webhook_enable", &cmd).await?;
        Ok(removed > 0)
    }

    /// Every disabled endpoint, sorted.
    pub async fn list(&self) -> Result<Vec<(Endpoint, Disabled)>, RedisError> {
        let mut cmd = ::redis::cmd("HGETALL");
        cmd.arg(&self.key);
        let all: std::collections::BTreeMap<String, String> =
            self.redis.command("webhook_disabled_list", &cmd).await?;
        Ok(all
            .into_iter()
            .filter_map(|(e, v)| Some((Endpoint(e), serde_json::from_str(&v).ok()?)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_drops_query_and_fragment_only() {
        let url = |s: &str| reqwest::Url::parse(s).expect("a url");
        assert_eq!(
            Endpoint::of(&url("https://example.com:8443/hooks/a?x=1#f")).as_str(),
            "https://example.com:8443/hooks/a"
        );
        assert_ne!(
            Endpoint::of(&url("https://example.com/hooks/a")),
            Endpoint::of(&url("https://example.com/hooks/b"))
        );
    }
}
