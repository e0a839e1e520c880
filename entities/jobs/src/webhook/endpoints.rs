//! Webhook endpoints: what "the same endpoint" means, and the endpoints disabled after a
//! `410 Gone`, shared by every runner through Redis.
//!
//! An [`Endpoint`] is a tenant's URL, query included, without its fragment (never sent):
//! the unit of the circuit breaker and of disabling. Per tenant, so one tenant's 410 or
//! outage never stops another's deliveries; with the query, so a 410 for
//! `…/shared?token=revoked` leaves `…/shared?token=good` alone. The disabled set is one
//! Redis hash (`<prefix>:webhook:disabled`, `tenant|url` → why and when), so a runner that
//! never called the endpoint refuses it too, and it survives restarts of the runners (not a
//! flush of Redis: an endpoint lost that way is called again and disabled again on its
//! next 410). An operator re-enables one with `shoal webhooks enable URL [--tenant T]`.
//!
//! A breaker's Redis keys carry a digest of the endpoint ([`Endpoint::breaker_name`]), and
//! logs name only its tenant and host ([`Endpoint::log_name`]): a URL's query may hold a
//! receiver's token. URL credentials (`user:pass@`) are refused at enqueue, so they reach
//! neither.

use std::fmt;

use sha2::Digest as _;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shoal::redis::{RedisClient, RedisError};

/// A tenant's webhook URL (query included) without its fragment.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Endpoint {
    /// The tenant of the jobs delivered to it (`None`: jobs without a tenant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The URL.
    pub url: String,
}

/// Separates the tenant from the URL in a Redis field (a tenant has no `|`).
const SEPARATOR: char = '|';

impl Endpoint {
    /// The endpoint `tenant`'s `url` is delivered to.
    pub fn of(tenant: Option<&str>, url: &reqwest::Url) -> Self {
        let mut url = url.clone();
        url.set_fragment(None);
        Self {
            tenant: tenant.map(str::to_owned),
            url: url.into(),
        }
    }

    /// The URL as text.
    pub fn as_str(&self) -> &str {
        &self.url
    }

    /// The breaker's name: a digest of tenant and URL (bounded, and no token of a query
    /// in a Redis key).
    pub fn breaker_name(&self) -> String {
        let digest = sha2::Sha256::digest(self.field().as_bytes());
        format!("webhook:{}", &hex::encode(digest)[..32])
    }

    /// What logs may name: the tenant and the URL's host and port.
    pub fn log_name(&self) -> String {
        let host = reqwest::Url::parse(&self.url)
            .ok()
            .map(|url| {
                let host = url.host_str().unwrap_or_default().to_owned();
                match url.port_or_known_default() {
                    Some(port) => format!("{host}:{port}"),
                    None => host,
                }
            })
            .unwrap_or_default();
        format!("{}/{host}", self.tenant.as_deref().unwrap_or("-"))
    }

    /// The command that enables it again.
    pub fn enable_command(&self) -> String {
        match &self.tenant {
            Some(tenant) => format!("shoal webhooks enable --tenant {tenant} '{}'", self.url),
            None => format!("shoal webhooks enable '{}'", self.url),
        }
    }

    fn field(&self) -> String {
        format!(
            "{}{SEPARATOR}{}",
            self.tenant.as_deref().unwrap_or(""),
            self.url
        )
    }

    fn from_field(field: &str) -> Self {
        match field.split_once(SEPARATOR) {
            Some((tenant, url)) => Self {
                tenant: (!tenant.is_empty()).then(|| tenant.to_owned()),
                url: url.to_owned(),
            },
            // Written before endpoints were per tenant.
            None => Self {
                tenant: None,
                url: field.to_owned(),
            },
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.tenant {
            Some(tenant) => write!(f, "{} (tenant {tenant})", self.url),
            None => f.write_str(&self.url),
        }
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
        cmd.arg(&self.key).arg(endpoint.field());
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
        cmd.arg(&self.key).arg(endpoint.field()).arg(value);
        self.redis
            .command::<i64>("webhook_disable", &cmd)
            .await
            .map(drop)
    }

    /// Enables `endpoint` again; false when it was not disabled.
    pub async fn enable(&self, endpoint: &Endpoint) -> Result<bool, RedisError> {
        let mut cmd = ::redis::cmd("HDEL");
        cmd.arg(&self.key).arg(endpoint.field());
        if endpoint.tenant.is_none() {
            // A field written before endpoints were per tenant.
            cmd.arg(endpoint.as_str());
        }
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
            .filter_map(|(e, v)| Some((Endpoint::from_field(&e), serde_json::from_str(&v).ok()?)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_is_a_tenant_and_its_url_without_the_fragment() {
        let url = |s: &str| reqwest::Url::parse(s).expect("a url");
        let acme = Some("acme");
        assert_eq!(
            Endpoint::of(acme, &url("https://example.com:8443/hooks/a?x=1#f")).as_str(),
            "https://example.com:8443/hooks/a?x=1"
        );
        let shared = |tenant, query| Endpoint::of(tenant, &url(&format!("http://h/s?{query}")));
        assert_ne!(shared(acme, "token=revoked"), shared(acme, "token=good"));
        assert_ne!(shared(acme, "t=1"), shared(Some("beta"), "t=1"));
        assert_ne!(shared(acme, "t=1"), shared(None, "t=1"));
        assert_ne!(
            shared(acme, "t=1").breaker_name(),
            shared(Some("beta"), "t=1").breaker_name()
        );
        for endpoint in [shared(acme, "t=1"), shared(None, "t=1")] {
            assert_eq!(Endpoint::from_field(&endpoint.field()), endpoint);
        }
        let name = shared(acme, "token=secret").breaker_name();
        assert!(!name.contains("secret") && name.len() == "webhook:".len() + 32);
        assert_eq!(shared(acme, "token=secret").log_name(), "acme/h:80");
    }
}
