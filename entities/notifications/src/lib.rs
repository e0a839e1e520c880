//! Notifications: per-tenant ordered event streams, delivered to Server-Sent Events
//! clients on any gateway and resumable with `Last-Event-ID`.
//!
//! Data flow: `POST /tenants/{t}/events` (or an entity's typed `publish`) → the tenant's
//! [`entity::Notification`] (persisted message) numbers the event, inserts it into the
//! [`history`] table and pushes it through the [`carrier`] (Redis pub/sub) → every
//! gateway's [`hub`] delivers it, in seq order, to its subscribers' bounded buffers → each
//! subscriber's [`stream`] writes `id:`/`event:`/`data:` frames. A subscriber that resumes
//! reads what it missed from the history first. See docs/ARCHITECTURE.md "Built-in
//! entities → notification".

pub mod carrier;
pub mod entity;
pub mod history;
pub mod hub;
pub(crate) mod metrics;
pub mod routes;
pub mod slots;
pub mod stream;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

pub use entity::{NewEvent, Notification, NotificationMessage, Published};

/// The application's `[notifications]` section (`SHOAL__NOTIFICATIONS__…`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct NotificationsConfig {
    /// Events kept per tenant. Default 10000.
    pub history_max_events: u64,
    /// How long an event is kept. Default `24h`.
    #[serde(with = "humantime_serde")]
    pub history_max_age: Duration,
    /// The entity prunes its tenant's history every this many events. Default 64.
    pub prune_every: u64,
    /// Comment heartbeat on idle streams. Default `15s`.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// The `retry:` sent to clients (their reconnect delay). Default `2s`.
    #[serde(with = "humantime_serde")]
    pub retry: Duration,
    /// Events buffered per subscriber before it counts as too slow (reset). Default 256.
    pub subscriber_buffer: usize,
    /// Streams one gateway holds (tenant streams, extraction streams, `?wait=true` waits);
    /// more get 503. Default 10000.
    pub max_subscribers: usize,
    /// Streams of one tenant one gateway holds, below `max-subscribers`; the tenant's next
    /// gets 429 with `Retry-After` while other tenants' still open. Default a quarter of
    /// `max-subscribers`, at least 1.
    pub max_subscribers_per_tenant: Option<usize>,
    /// Each gateway catches every feed up from the history this often (the net under a
    /// lost push). Default `2s`.
    #[serde(with = "humantime_serde")]
    pub sync_interval: Duration,
}

impl Default for NotificationsConfig {
    fn default() -> Self {
        Self {
            history_max_events: 10_000,
            history_max_age: Duration::from_secs(24 * 3600),
            prune_every: 64,
            heartbeat: Duration::from_secs(15),
            retry: Duration::from_secs(2),
            subscriber_buffer: 256,
            max_subscribers: 10_000,
            max_subscribers_per_tenant: None,
            sync_interval: Duration::from_secs(2),
        }
    }
}

impl NotificationsConfig {
    /// `max-subscribers-per-tenant`, or its default.
    pub fn per_tenant_cap(&self) -> usize {
        self.max_subscribers_per_tenant
            .unwrap_or((self.max_subscribers / 4).max(1))
    }

    /// Refuses values that cannot work.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(cap) = self.max_subscribers_per_tenant
            && (cap == 0 || cap > self.max_subscribers)
        {
            return Err(format!(
                "[notifications] max-subscribers-per-tenant must be within 1–{} (max-subscribers)",
                self.max_subscribers
            ));
        }
        let positive = [
            ("history-max-events", self.history_max_events == 0),
            ("prune-every", self.prune_every == 0),
            ("subscriber-buffer", self.subscriber_buffer == 0),
            ("max-subscribers", self.max_subscribers == 0),
            ("heartbeat", self.heartbeat.is_zero()),
            ("sync-interval", self.sync_interval.is_zero()),
            ("history-max-age", self.history_max_age.is_zero()),
        ];
        match positive.iter().find(|(_, zero)| *zero) {
            Some((name, _)) => Err(format!("[notifications] {name} must be above 0")),
            None => Ok(()),
        }
    }
}

/// A name that is not a valid tenant or topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}` is not a valid {what}: 1 to 64 of {allowed}")]
pub struct BadName {
    value: String,
    what: &'static str,
    allowed: &'static str,
}

fn check_name(
    value: &str,
    what: &'static str,
    allowed: &'static str,
    extra: &[char],
) -> Result<(), BadName> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || extra.contains(&c));
    if ok {
        Ok(())
    } else {
        Err(BadName {
            value: value.chars().take(80).collect(),
            what,
            allowed,
        })
    }
}

/// A tenant: 1–64 letters, digits, `-`, `_` or `.` (as `X-Tenant-Id`); also the id of its
/// notification entity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tenant(String);

impl Tenant {
    /// What a tenant is, as a JSON Schema pattern.
    pub const PATTERN: &'static str = "^[A-Za-z0-9_.-]{1,64}$";

    /// The tenant's schema in the OpenAPI document.
    pub fn schema() -> serde_json::Value {
        serde_json::json!({"type": "string", "pattern": Self::PATTERN, "minLength": 1, "maxLength": 64})
    }

    /// The tenant's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The caller's tenant on an application route: `X-Tenant-Id`, which the gateway
    /// writes from the verified token when `[gateway.auth]` is on (a request naming
    /// another is refused before it gets here); `None` without one. A bad one is a 400.
    pub fn of_caller(
        headers: &axum::http::HeaderMap,
    ) -> Result<Option<Self>, shoal::gateway::ApiError> {
        headers
            .get("x-tenant-id")
            .map(|v| {
                v.to_str().ok().and_then(|t| t.parse().ok()).ok_or_else(|| {
                    shoal::gateway::ApiError::bad_request(
                        "bad_tenant",
                        "header `X-Tenant-Id`: 1–64 letters, digits, `-`, `_` or `.`",
                    )
                })
            })
            .transpose()
    }
}

impl FromStr for Tenant {
    type Err = BadName;

    fn from_str(s: &str) -> Result<Self, BadName> {
        check_name(
            s,
            "tenant",
            "letters, digits, `-`, `_`, `.`",
            &['-', '_', '.'],
        )?;
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A topic: 1–64 letters, digits, `-`, `_`, `.` or `:` (the SSE `event:` field; `reset`
/// is the stream's own).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Topic(String);

impl Topic {
    /// What a topic is, as a JSON Schema pattern (and not `reset`, see [`Topic::schema`]).
    pub const PATTERN: &'static str = "^[A-Za-z0-9_.:-]{1,64}$";

    /// The topic's schema in the OpenAPI document.
    pub fn schema() -> serde_json::Value {
        serde_json::json!({
            "type": "string", "pattern": Self::PATTERN, "minLength": 1, "maxLength": 64,
            "not": {"const": stream::RESET},
        })
    }
}

impl FromStr for Topic {
    type Err = BadName;

    fn from_str(s: &str) -> Result<Self, BadName> {
        let allowed = "letters, digits, `-`, `_`, `.`, `:` (not `reset`)";
        check_name(s, "topic", allowed, &['-', '_', '.', ':'])?;
        if s == stream::RESET {
            return Err(BadName {
                value: s.to_owned(),
                what: "topic",
                allowed,
            });
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the notification system needs on a runner: where the history is and how to push.
pub fn entity(
    pool: Option<sqlx::PgPool>,
    cluster: &str,
    redis: Option<shoal::redis::RedisClient>,
    config: &NotificationsConfig,
) -> Notification {
    let history = pool.map(|pool| history::History::new(pool, cluster, config.history_max_age));
    Notification::new(
        history,
        redis.map(carrier::Carrier::new),
        std::sync::Arc::new(config.clone()),
    )
}

/// Registers the `notification` entity type in `registry`, configured by `[notifications]`
/// (`config`): its history in `pool` (the database of cluster `cluster`), its events pushed
/// to the gateways through `redis`. The routes that serve the streams are
/// [`routes::routes`], for the gateway.
pub fn register(
    registry: &mut shoal::entity::EntityRegistry,
    pool: Option<sqlx::PgPool>,
    cluster: &str,
    redis: Option<shoal::redis::RedisClient>,
    config: &NotificationsConfig,
) -> Result<(), shoal::entity::RegistryError> {
    registry.register(entity(pool, cluster, redis, config))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!("acme.eu-1_x".parse::<Tenant>().is_ok());
        for bad in ["", "a b", "a/b", &"x".repeat(65), "é"] {
            assert!(bad.parse::<Tenant>().is_err(), "{bad:?}");
        }
        assert!("job:state".parse::<Topic>().is_ok());
        assert!("reset".parse::<Topic>().is_err());
        assert!("a\nb".parse::<Topic>().is_err());
    }

    #[test]
    fn the_per_tenant_cap_defaults_to_a_quarter_and_stays_below_the_total() {
        let config = |max, per_tenant| NotificationsConfig {
            max_subscribers: max,
            max_subscribers_per_tenant: per_tenant,
            ..NotificationsConfig::default()
        };
        assert_eq!(NotificationsConfig::default().per_tenant_cap(), 2_500);
        assert_eq!(config(3, None).per_tenant_cap(), 1);
        assert_eq!(config(4, Some(2)).per_tenant_cap(), 2);
        assert!(config(4, Some(0)).validate().is_err());
        assert!(config(4, Some(5)).validate().is_err());
        assert!(config(4, Some(4)).validate().is_ok());
    }

    #[test]
    fn zero_bounds_are_refused() {
        assert!(NotificationsConfig::default().validate().is_ok());
        let config = NotificationsConfig {
            subscriber_buffer: 0,
            ..NotificationsConfig::default()
        };
        assert!(
            config
                .validate()
                .expect_err("refused")
                .contains("subscriber-buffer")
        );
    }
}
