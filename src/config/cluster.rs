//! `[cluster]`, `[database]`, `[log]` and `[retention]`.

use std::num::NonZeroU32;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, DEFAULT_SECRET};
use crate::ids::ClusterName;
use crate::sharding::Sharding;

/// `[cluster]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Cluster name; advisory-lock keys are namespaced by it. Default `shoal`.
    pub name: ClusterName,
    /// Shards per shard group; must match the value stored for the cluster. Default 1024.
    pub shards_per_group: NonZeroU32,
    /// Shared secret runners require from peers on the runner transport. Set it in
    /// production (`SHOAL__CLUSTER__SECRET`); the default is for local clusters only.
    pub secret: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            name: ClusterName::default(),
            shards_per_group: NonZeroU32::new(Sharding::DEFAULT_SHARDS).unwrap_or(NonZeroU32::MIN),
            secret: DEFAULT_SECRET.to_owned(),
        }
    }
}

/// `[database]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// PostgreSQL URL. Default `postgres://postgres@127.0.0.1:5432/shoal`.
    pub url: String,
    /// Pool size (the dedicated lock connection is extra). Default 10.
    pub pool_max_connections: u32,
    /// Time allowed to open a connection. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Batch concurrent message saves and completions into multi-row statements (group
    /// commit). Default true.
    pub group_commit: bool,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/shoal".to_owned(),
            pool_max_connections: 10,
            connect_timeout: Duration::from_secs(5),
            group_commit: true,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`. Default `text`.
    pub format: LogFormat,
    /// A `tracing` filter such as `info,shoal=debug`. `RUST_LOG` wins when set. Default
    /// `info`.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".to_owned(),
        }
    }
}

/// `[retention]`: processed messages and their replies are kept for `period` after they
/// were processed, then removed by the `shoal-retention` singleton in bounded batches.
/// An idempotency key is honoured for as long as its message is kept: while it is
/// unprocessed (always) and for `period` after it was processed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Remove old processed messages at all. Default true.
    pub enabled: bool,
    /// How long a processed message and its reply are kept (the idempotency window).
    /// Default `7days`.
    #[serde(with = "humantime_serde")]
    pub period: Duration,
    /// Time between cleanup passes. Default `1m`.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Messages removed per statement (each a short transaction). Default 1000.
    pub batch_size: usize,
    /// Pause between two batches of one pass, so cleanup never holds the database for
    /// long. Default `50ms`.
    #[serde(with = "humantime_serde")]
    pub batch_pause: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            period: Duration::from_secs(7 * 24 * 3600),
            interval: Duration::from_secs(60),
            batch_size: 1000,
            batch_pause: Duration::from_millis(50),
        }
    }
}

impl RetentionConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, problem: &str| {
            Err(ConfigError::Invalid {
                key,
                problem: problem.to_owned(),
            })
        };
        if self.period.is_zero() {
            return invalid("retention.period", "must be above zero");
        }
        if self.interval.is_zero() {
            return invalid("retention.interval", "must be above zero");
        }
        if self.batch_size == 0 || self.batch_size > 100_000 {
            return invalid("retention.batch-size", "must be between 1 and 100000");
        }
        Ok(())
    }
}
