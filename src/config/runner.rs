//! `[runner]`: shard ownership timings of a runner process, and how they must relate.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[runner]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct RunnerConfig {
    /// Address the runner's HTTP endpoint listens on. Default `127.0.0.1:7070`; port 0 picks
    /// a free port.
    pub listen: SocketAddr,
    /// Address other nodes use to reach this runner (`host:port`). Default: the bound
    /// listen address.
    pub advertise_address: Option<String>,
    /// How often live runners are read and the assignment recomputed. Default `250ms`.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How often held locks are re-confirmed on the dedicated session. Default `250ms`.
    #[serde(with = "humantime_serde")]
    pub lock_check_interval: Duration,
    /// If locks cannot be confirmed for this long, the runner fences itself. Must stay well
    /// below the server's dead-peer detection (`keepalive-*`). Default `2s`.
    #[serde(with = "humantime_serde")]
    pub lock_deadline: Duration,
    /// Time a released shard's work may take to drain before its lock is let go anyway.
    /// Default `5s`.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// A live runner whose lock session shows no progress for this long (frozen, wedged,
    /// paused) has its sessions ended by the others, which take its shards over. Must be
    /// above `lock-deadline` + `lock-check-interval` (a runner that cannot confirm for
    /// `lock-deadline` fences itself first). Default `3s`.
    #[serde(with = "humantime_serde")]
    pub hang_timeout: Duration,
    /// Most peers this runner watches on Postgres connections of its own (one each), so
    /// that their end wakes it at once; peers beyond it are seen at the next poll.
    /// Default 16.
    pub watch_peers: usize,
    /// Time graceful shutdown may take before the process exits anyway. Default `15s`.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Server-side TCP keepalive idle time on the lock session. Default `3s`.
    #[serde(with = "humantime_serde")]
    pub keepalive_idle: Duration,
    /// Server-side TCP keepalive probe interval on the lock session. Default `1s`.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// Server-side TCP keepalive probes before the peer is declared dead. Default 3.
    pub keepalive_count: u32,
    /// Most entities resident on this runner; new ones wait in storage. Default 100000.
    pub max_resident_entities: usize,
    /// An entity idle this long goes to sleep: its actor stops and its shard keeps its
    /// state, until the next message starts an actor from it (no hooks run; the type's
    /// `max_idle` still passivates it). Default `2s`.
    #[serde(with = "humantime_serde")]
    pub sleep_after: Duration,
    /// Interval of each shard's backlog scan. Default `1s`.
    #[serde(with = "humantime_serde")]
    pub scan_interval: Duration,
    /// Delivery attempts before a failing message is completed with an error. Default 5.
    /// Also bounds how often a message whose entity type this runner lacks is retried.
    pub max_delivery_attempts: i32,
    /// First wait of a persisted message whose entity type this runner does not have (a
    /// rolling upgrade); doubles per attempt up to 32 ×. With the default 5 attempts it
    /// waits 4 + 8 + 16 + 32 + 64 s ≈ 2 min before it is answered `unknown_entity_type`.
    /// Default `4s`.
    #[serde(with = "humantime_serde")]
    pub type_wait_backoff: Duration,
    /// Bytes (estimated) of recently completed replies the runner keeps in memory, for all
    /// its shards together; older ones are read from storage when asked for. Default
    /// 16777216 (16 MiB).
    pub recent_replies_bytes: usize,
    /// Entity types of this build the runner does not host, as if it ran an older version
    /// without them: their persisted messages wait (see `type-wait-backoff`). For
    /// rolling-upgrade drills and tests; each must be a registered type. Default empty.
    pub skip_entity_types: Vec<String>,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            advertise_address: None,
            poll_interval: Duration::from_millis(250),
            lock_check_interval: Duration::from_millis(250),
            lock_deadline: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(5),
            hang_timeout: Duration::from_secs(3),
            watch_peers: 16,
            shutdown_timeout: Duration::from_secs(15),
            keepalive_idle: Duration::from_secs(3),
            keepalive_interval: Duration::from_secs(1),
            keepalive_count: 3,
            max_resident_entities: 100_000,
            sleep_after: Duration::from_secs(2),
            scan_interval: Duration::from_secs(1),
            max_delivery_attempts: 5,
            type_wait_backoff: Duration::from_secs(4),
            recent_replies_bytes: 16 * 1024 * 1024,
            skip_entity_types: Vec::new(),
        }
    }
}

impl RunnerConfig {
    /// How long the server takes at most to declare a silent lock session dead (and free
    /// its locks): keepalive idle plus all probes. Also used as `tcp_user_timeout`.
    pub fn server_dead_peer_timeout(&self) -> Duration {
        self.keepalive_idle + self.keepalive_interval * self.keepalive_count
    }
}

impl RunnerConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("runner.poll-interval", self.poll_interval),
            ("runner.lock-check-interval", self.lock_check_interval),
            ("runner.lock-deadline", self.lock_deadline),
            ("runner.keepalive-idle", self.keepalive_idle),
            ("runner.keepalive-interval", self.keepalive_interval),
            ("runner.type-wait-backoff", self.type_wait_backoff),
        ];
        for (key, value) in positive {
            if value < Duration::from_millis(10) {
                return Err(ConfigError::Invalid {
                    key,
                    problem: format!("is {value:?}; it must be at least 10ms"),
                });
            }
        }
        if self.max_resident_entities == 0 || self.max_delivery_attempts < 1 {
            return Err(ConfigError::Invalid {
                key: "runner.max-resident-entities",
                problem: "and runner.max-delivery-attempts must be at least 1".to_owned(),
            });
        }
        if self.keepalive_count == 0 {
            return Err(ConfigError::Invalid {
                key: "runner.keepalive-count",
                problem: "must be at least 1".to_owned(),
            });
        }
        if self.lock_check_interval >= self.lock_deadline {
            return Err(ConfigError::Invalid {
                key: "runner.lock-check-interval",
                problem: format!(
                    "({:?}) must be below runner.lock-deadline ({:?})",
                    self.lock_check_interval, self.lock_deadline
                ),
            });
        }
        if self.hang_timeout < self.lock_deadline + self.lock_check_interval {
            return Err(ConfigError::Invalid {
                key: "runner.hang-timeout",
                problem: format!(
                    "({:?}) must be at least runner.lock-deadline + runner.lock-check-interval \
                     ({:?}): a runner that cannot confirm its locks fences itself first",
                    self.hang_timeout,
                    self.lock_deadline + self.lock_check_interval
                ),
            });
        }
        // Fencing must happen well before the server could free our locks for a silent peer.
        if self.lock_deadline * 3 / 2 > self.server_dead_peer_timeout() {
            return Err(ConfigError::Invalid {
                key: "runner.lock-deadline",
                problem: format!(
                    "({:?}) must be at most 2/3 of the server's dead-peer detection \
                     (keepalive-idle + keepalive-interval × keepalive-count = {:?})",
                    self.lock_deadline,
                    self.server_dead_peer_timeout()
                ),
            });
        }
        Ok(())
    }
}
