//! `[redis]`: the connection (URL, key prefix, timeouts, bounded retries) and what runs on
//! it: the gateway's API limits, per-provider limits, the circuit breaker and cache TTLs.
//!
//! Every duration is validated to be positive and every limit to be at least 1, so the
//! limiters never divide by zero or admit nothing by accident.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[redis]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Redis URL (`redis://127.0.0.1:6379`). Unset: features that need Redis are off.
    pub url: Option<String>,
    /// Prefix of every key, so clusters can share one Redis. Default `shoal:<cluster name>`.
    pub key_prefix: Option<String>,
    /// Time allowed to open a connection. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed for one command (one attempt). Default `1s`.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Retries of a command that failed with a retriable error. Default 2.
    pub max_retries: u32,
    /// Base delay before a retry; doubled each time, with jitter. Default `20ms`.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// `[redis.api-limits]`: the gateway's rate limits.
    pub api_limits: ApiLimitsConfig,
    /// `[redis.providers.<name>]`: limits of each upstream provider. Defaults: anthropic
    /// 50 requests/min, 100,000 tokens/min, 5 concurrent; openai 60 / 150,000 / 10; google
    /// 60 / 100,000 / 8.
    pub providers: BTreeMap<String, ProviderLimitsConfig>,
    /// `[redis.breaker]`: the circuit breaker of each provider.
    pub breaker: BreakerConfig,
    /// `[redis.cache]`: cache TTLs.
    pub cache: CacheConfig,
}

impl Default for RedisConfig {
    fn default() -> Self {
        let provider = |requests_per_minute, tokens_per_minute, concurrency| ProviderLimitsConfig {
            requests_per_minute,
            tokens_per_minute,
            concurrency,
            ..ProviderLimitsConfig::default()
        };
        Self {
            url: None,
            key_prefix: None,
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(1),
            max_retries: 2,
            retry_backoff: Duration::from_millis(20),
            api_limits: ApiLimitsConfig::default(),
            providers: BTreeMap::from([
                ("anthropic".to_owned(), provider(50, 100_000, 5)),
                ("openai".to_owned(), provider(60, 150_000, 10)),
                ("google".to_owned(), provider(60, 100_000, 8)),
            ]),
            breaker: BreakerConfig::default(),
            cache: CacheConfig::default(),
        }
    }
}

/// What the API limiter does while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RedisDownPolicy {
    /// Refuse the request with 503 `redis_unavailable`.
    #[default]
    Deny,
    /// Let the request through unlimited (logged and counted, never silent).
    Allow,
}

/// `N` requests per sliding `window`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RatePreset {
    /// Requests admitted per window.
    pub requests: u32,
    /// The window.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

/// `[redis.api-limits]`: sliding-window limits per tenant (`X-Tenant-Id`, else
/// `anonymous`) and client IP, one preset per route group. `/health`, `/ready`,
/// `/metrics` and `/openapi.json` are never limited.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ApiLimitsConfig {
    /// Whether the gateway limits requests (when `redis.url` is set). Default true.
    pub enabled: bool,
    /// `deny` (503 `redis_unavailable`) or `allow` while Redis is down. Default `deny`.
    pub when_unavailable: RedisDownPolicy,
    /// `/entities/...` routes. Default 600 per `1m`.
    pub entities: RatePreset,
    /// `/cluster` and `/cron`. Default 120 per `1m`.
    pub cluster: RatePreset,
    /// The application's routes (added to the gateway by the binary). Default 600 per `1m`.
    pub applications: RatePreset,
}

impl Default for ApiLimitsConfig {
    fn default() -> Self {
        let minute = Duration::from_secs(60);
        Self {
            enabled: true,
            when_unavailable: RedisDownPolicy::Deny,
            entities: RatePreset {
                requests: 600,
                window: minute,
            },
            cluster: RatePreset {
                requests: 120,
                window: minute,
            },
            applications: RatePreset {
                requests: 600,
                window: minute,
            },
        }
    }
}

/// `[redis.providers.<name>]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ProviderLimitsConfig {
    /// Requests per minute (fixed window). Default 60.
    pub requests_per_minute: u32,
    /// Tokens per minute (token bucket refilled continuously). Default 100000.
    pub tokens_per_minute: u64,
    /// Calls in flight at once (leases). Default 5.
    pub concurrency: u32,
    /// A lease not released within this time is reclaimed (its holder crashed). Default
    /// `60s`.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
}

impl Default for ProviderLimitsConfig {
    fn default() -> Self {
        Self {
            requests_per_minute: 60,
            tokens_per_minute: 100_000,
            concurrency: 5,
            lease_ttl: Duration::from_secs(60),
        }
    }
}

/// `[redis.breaker]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Failures within `failure-window` that open the breaker. Default 5.
    pub failure_threshold: u32,
    /// Default `30s`.
    #[serde(with = "humantime_serde")]
    pub failure_window: Duration,
    /// Time an open breaker waits before admitting trial calls. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub reset_timeout: Duration,
    /// Trial calls admitted while half-open. Default 1.
    pub half_open_max_calls: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            failure_window: Duration::from_secs(30),
            reset_timeout: Duration::from_secs(30),
            half_open_max_calls: 1,
        }
    }
}

/// `[redis.cache]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct CacheConfig {
    /// TTL of extraction results. Default `24h`.
    #[serde(with = "humantime_serde")]
    pub extraction_ttl: Duration,
    /// TTL of deduplication handles. Default `1h`.
    #[serde(with = "humantime_serde")]
    pub dedup_ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            extraction_ttl: Duration::from_secs(24 * 3600),
            dedup_ttl: Duration::from_secs(3600),
        }
    }
}

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        problem: problem.into(),
    }
}

impl RedisConfig {
    /// Checks every value; the error names the key.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.url
            && !(url.starts_with("redis://") || url.starts_with("rediss://"))
        {
            return Err(invalid(
                "redis.url",
                "must start with redis:// or rediss://",
            ));
        }
        if let Some(prefix) = &self.key_prefix
            && (prefix.is_empty() || prefix.chars().any(|c| c.is_whitespace()))
        {
            return Err(invalid(
                "redis.key-prefix",
                "must be non-empty, without spaces",
            ));
        }
        let durations = [
            ("redis.connect-timeout", self.connect_timeout),
            ("redis.command-timeout", self.command_timeout),
            (
                "redis.api-limits.entities.window",
                self.api_limits.entities.window,
            ),
            (
                "redis.api-limits.cluster.window",
                self.api_limits.cluster.window,
            ),
            (
                "redis.api-limits.applications.window",
                self.api_limits.applications.window,
            ),
            ("redis.breaker.failure-window", self.breaker.failure_window),
            ("redis.breaker.reset-timeout", self.breaker.reset_timeout),
            ("redis.cache.extraction-ttl", self.cache.extraction_ttl),
            ("redis.cache.dedup-ttl", self.cache.dedup_ttl),
        ];
        for (key, value) in durations {
            if value < Duration::from_millis(1) {
                return Err(invalid(
                    key,
                    format!("is {value:?}; it must be at least 1ms"),
                ));
            }
        }
        if self.max_retries > 10 {
            return Err(invalid("redis.max-retries", "must be at most 10"));
        }
        let counts = [
            (
                "redis.api-limits.entities.requests",
                self.api_limits.entities.requests,
            ),
            (
                "redis.api-limits.cluster.requests",
                self.api_limits.cluster.requests,
            ),
            (
                "redis.api-limits.applications.requests",
                self.api_limits.applications.requests,
            ),
            (
                "redis.breaker.failure-threshold",
                self.breaker.failure_threshold,
            ),
            (
                "redis.breaker.half-open-max-calls",
                self.breaker.half_open_max_calls,
            ),
        ];
        for (key, value) in counts {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        for (name, provider) in &self.providers {
            provider.validate(name)?;
        }
        Ok(())
    }
}

impl ProviderLimitsConfig {
    fn validate(&self, name: &str) -> Result<(), ConfigError> {
        let valid_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid_name {
            return Err(invalid(
                "redis.providers",
                format!("has `{name}`; names are letters, digits, `-` and `_`"),
            ));
        }
        if self.requests_per_minute == 0 || self.tokens_per_minute == 0 || self.concurrency == 0 {
            return Err(invalid(
                "redis.providers",
                format!(
                    "`{name}`: requests-per-minute, tokens-per-minute and concurrency must be at least 1"
                ),
            ));
        }
        // The bucket's level is kept in token-milliseconds inside Lua doubles: tokens × 60000
        // must stay exact (below 2^53).
        if self.tokens_per_minute > 1_000_000_000 {
            return Err(invalid(
                "redis.providers",
                format!("`{name}`: tokens-per-minute must be at most 1000000000"),
            ));
        }
        if self.lease_ttl < Duration::from_millis(10) {
            return Err(invalid(
                "redis.providers",
                format!("`{name}`: lease-ttl must be at least 10ms"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::ConfigLoader;
    use crate::config::tests::env;

    #[test]
    fn provider_defaults_and_env_overrides() {
        let config = ConfigLoader::new()
            .env(env(&[
                ("SHOAL__REDIS__API_LIMITS__CLUSTER__REQUESTS", "100"),
                ("SHOAL__REDIS__API_LIMITS__WHEN_UNAVAILABLE", "allow"),
                ("SHOAL__REDIS__PROVIDERS__OPENAI__CONCURRENCY", "3"),
            ]))
            .load()
            .expect("loads");
        let redis = &config.redis;
        assert_eq!(redis.api_limits.cluster.requests, 100);
        assert_eq!(
            redis.api_limits.when_unavailable,
            super::RedisDownPolicy::Allow
        );
        let openai = &redis.providers["openai"];
        assert_eq!(
            (
                openai.requests_per_minute,
                openai.tokens_per_minute,
                openai.concurrency
            ),
            (60, 150_000, 3)
        );
        let anthropic = &redis.providers["anthropic"];
        assert_eq!(
            (
                anthropic.requests_per_minute,
                anthropic.tokens_per_minute,
                anthropic.concurrency
            ),
            (50, 100_000, 5)
        );
        let google = &redis.providers["google"];
        assert_eq!(
            (
                google.requests_per_minute,
                google.tokens_per_minute,
                google.concurrency
            ),
            (60, 100_000, 8)
        );
    }

    #[test]
    fn bad_redis_values_are_refused_by_name() {
        let cases = [
            (
                "SHOAL__REDIS__COMMAND_TIMEOUT",
                "0s",
                "redis.command-timeout",
            ),
            ("SHOAL__REDIS__URL", "http://x", "redis.url"),
            (
                "SHOAL__REDIS__API_LIMITS__ENTITIES__REQUESTS",
                "0",
                "redis.api-limits.entities.requests",
            ),
            (
                "SHOAL__REDIS__BREAKER__HALF_OPEN_MAX_CALLS",
                "0",
                "redis.breaker.half-open-max-calls",
            ),
            (
                "SHOAL__REDIS__PROVIDERS__OPENAI__CONCURRENCY",
                "0",
                "openai",
            ),
            (
                "SHOAL__REDIS__API_LIMITS__WHEN_UNAVAILABLE",
                "maybe",
                "when-unavailable",
            ),
            (
                "SHOAL__REDIS__BREAKER__FAILURE_THRESHOLDS",
                "3",
                "failure-thresholds",
            ),
        ];
        for (var, value, named) in cases {
            let error = ConfigLoader::new()
                .env(env(&[(var, value)]))
                .load()
                .expect_err(var);
            assert!(error.to_string().contains(named), "{var}: {error}");
        }
    }
}
