//! Configuration: one [`ShoalConfig`] tree, loaded once at start-up from layers
//! (defaults < `cluster-config/<name>.toml` < `SHOAL__SECTION__KEY` environment < CLI flags)
//! and validated into typed values. Unknown keys and bad values are refused with an error
//! that names the key. Sub-structs are handed to the components that own them; there is no
//! global config.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use figment::value::Value;
use serde::{Deserialize, Serialize};

pub use crate::cron::config::{CronScheduleConfig, CronTargetConfig, MissedRunPolicy};
use crate::ids::ClusterName;
use crate::sharding::Sharding;

mod redis;

pub use self::redis::{
    ApiLimitsConfig, BreakerConfig, CacheConfig, ProviderLimitsConfig, RatePreset, RedisConfig,
    RedisDownPolicy,
};

/// The prefix of environment variables that override configuration keys:
/// `SHOAL__RUNNER__POLL_INTERVAL=500ms` sets `runner.poll-interval`.
pub const ENV_PREFIX: &str = "SHOAL__";

/// The cluster secret used when none is configured (local clusters only).
pub const DEFAULT_SECRET: &str = "shoal-local-secret";

/// The config file read when none is named and it exists in the working directory.
pub const DEFAULT_CONFIG_FILE: &str = "cluster-config/default.toml";

/// Why configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A layer could not be read or a key had the wrong type or was unknown.
    #[error("configuration error: {0}")]
    Load(String),
    /// A value parsed but is not acceptable.
    #[error("configuration error: `{key}` {problem}")]
    Invalid {
        /// The dotted key, e.g. `runner.lock-deadline`.
        key: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

impl From<figment::Error> for ConfigError {
    fn from(error: figment::Error) -> Self {
        // One line per problem: the dotted key, what is wrong, and the file if one is to blame.
        let message = error
            .into_iter()
            .map(|e| {
                let key = e
                    .path
                    .iter()
                    .filter(|p| p.as_str() != "default")
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(".");
                let origin = e
                    .metadata
                    .as_ref()
                    .and_then(|m| m.source.as_ref())
                    .and_then(|s| s.file_path())
                    .map(|p| format!(" (in {})", p.display()))
                    .unwrap_or_default();
                if key.is_empty() {
                    format!("{}{origin}", e.kind)
                } else {
                    format!("`{key}`: {}{origin}", e.kind)
                }
            })
            .collect::<Vec<_>>()
            .join("; ");
        Self::Load(message)
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ShoalConfig {
    /// `[cluster]`: identity and shape of the cluster.
    pub cluster: ClusterConfig,
    /// `[database]`: the PostgreSQL connection.
    pub database: DatabaseConfig,
    /// `[runner]`: shard ownership timings of a runner process.
    pub runner: RunnerConfig,
    /// `[gateway]`: the HTTP front door.
    pub gateway: GatewayConfig,
    /// `[redis]`: shared limits, breakers and caches.
    pub redis: RedisConfig,
    /// `[log]`: logging.
    pub log: LogConfig,
    /// `[retention]`: how long processed messages and their replies are kept.
    pub retention: RetentionConfig,
    /// `[[cron]]`: cluster cron schedules, driven by one singleton.
    pub cron: Vec<CronScheduleConfig>,
}

/// `[gateway]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Address the gateway listens on. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Deadline of a request without `X-Request-Timeout`. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Largest request body accepted, in bytes. Default 1048576.
    pub max_body_bytes: usize,
    /// `/ready` turns red while an owned shard has an unprocessed message older than this.
    /// Default `30s`.
    #[serde(with = "humantime_serde")]
    pub ready_max_backlog_age: Duration,
    /// Time in-flight requests get to finish on shutdown. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Connections open at once; accepting pauses at the cap. Default 4096.
    pub max_connections: usize,
    /// Connections open at once from one IP address; more are closed. Default 1024 (behind
    /// a load balancer every client has its address: raise it to `max-connections`).
    pub max_connections_per_client: usize,
    /// How long a new connection may take to send its first request's head; then it is
    /// closed (slowloris). Default `10s`.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// `[gateway.auth]`: bearer-token (JWT) auth for every route. Off by default.
    pub auth: AuthConfig,
}

/// `[gateway.auth]`: every route but `/health`, `/ready`, `/metrics` and `/openapi.json`
/// needs `Authorization: Bearer <JWT>`, verified with the configured keys; the request's
/// tenant is then the token's (`tenant-claim`), and an `X-Tenant-Id` naming another
/// tenant is refused (403). Off by default (local clusters, `shoal dev`); turn it on in
/// production.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Whether tokens are required. Default `false`.
    pub enabled: bool,
    /// An HS256 secret (tokens signed with it are accepted). Default none.
    pub hs256_secret: Option<String>,
    /// A JWKS file of public keys: RSA keys accept RS256, Ed25519 (OKP) keys EdDSA; a
    /// token's `kid` picks its key. Default none.
    pub jwks_file: Option<std::path::PathBuf>,
    /// The required `iss`. Default none (not checked).
    pub issuer: Option<String>,
    /// The required `aud`. Default none (not checked).
    pub audience: Option<String>,
    /// The claim that names the tenant. Default `tenant`.
    pub tenant_claim: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`. Default `30s`.
    #[serde(with = "humantime_serde::option")]
    pub leeway: Option<Duration>,
}

impl AuthConfig {
    /// The claim that names the tenant.
    pub fn tenant_claim(&self) -> &str {
        self.tenant_claim.as_deref().unwrap_or("tenant")
    }

    /// The clock skew allowed.
    pub fn leeway(&self) -> Duration {
        self.leeway.unwrap_or(Duration::from_secs(30))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.enabled && self.hs256_secret.is_none() && self.jwks_file.is_none() {
            return Err(ConfigError::Invalid {
                key: "gateway.auth",
                problem: "is enabled but has neither hs256-secret nor jwks-file".to_owned(),
            });
        }
        if self.hs256_secret.as_ref().is_some_and(|s| s.len() < 32) {
            return Err(ConfigError::Invalid {
                key: "gateway.auth.hs256-secret",
                problem: "must be at least 32 bytes".to_owned(),
            });
        }
        Ok(())
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            request_timeout: Duration::from_secs(30),
            max_body_bytes: 1 << 20,
            ready_max_backlog_age: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(10),
            max_connections: 4096,
            max_connections_per_client: 1024,
            header_read_timeout: Duration::from_secs(10),
            auth: AuthConfig::default(),
        }
    }
}

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
    fn validate(&self) -> Result<(), ConfigError> {
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

/// Builds a [`ShoalConfig`] from its layers.
#[derive(Debug, Default)]
pub struct ConfigLoader {
    file: Option<PathBuf>,
    env: Vec<(String, String)>,
    overrides: Vec<(String, Value)>,
    application: Vec<String>,
}

/// The sections of the configuration that belong to the application (declared with
/// [`ConfigLoader::application_sections`]): the runtime does not read them, the
/// application decodes them with [`ApplicationConfig::section`].
#[derive(Debug, Clone, Default)]
pub struct ApplicationConfig(figment::value::Dict);

impl ApplicationConfig {
    /// Section `name` decoded as `T` (`T::default()` when absent).
    pub fn section<T: serde::de::DeserializeOwned + Default>(
        &self,
        name: &str,
    ) -> Result<T, ConfigError> {
        match self.0.get(name) {
            Some(value) => value
                .deserialize()
                .map_err(|e| ConfigError::Load(format!("[{name}]: {e}"))),
            None => Ok(T::default()),
        }
    }
}

impl ConfigLoader {
    /// A loader with defaults only.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads `path` over the defaults (it must exist).
    pub fn file(mut self, path: impl AsRef<Path>) -> Self {
        self.file = Some(path.as_ref().to_owned());
        self
    }

    /// Reads `path` if given, else [`DEFAULT_CONFIG_FILE`] when it exists.
    pub fn file_or_default(self, path: Option<&Path>) -> Self {
        match path {
            Some(path) => self.file(path),
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => self.file(DEFAULT_CONFIG_FILE),
            None => self,
        }
    }

    /// Applies the `SHOAL__*` entries of `vars` (pass `std::env::vars()`).
    pub fn env(mut self, vars: impl IntoIterator<Item = (String, String)>) -> Self {
        self.env = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        self
    }

    /// Sets `key` (dotted, kebab-case: `runner.listen`) from a command-line flag, if given.
    pub fn set(mut self, key: &str, value: Option<impl Into<Value>>) -> Self {
        if let Some(value) = value {
            self.overrides.push((key.to_owned(), value.into()));
        }
        self
    }

    /// Declares top-level sections (`[jobs]`, `SHOAL__JOBS__…`) as the application's: the
    /// runtime neither reads nor rejects them; [`Self::load_with_application`] returns them.
    pub fn application_sections(mut self, names: &[&str]) -> Self {
        self.application
            .extend(names.iter().map(|n| (*n).to_owned()));
        self
    }

    /// Merges the layers, then validates.
    pub fn load(self) -> Result<ShoalConfig, ConfigError> {
        self.load_with_application().map(|(config, _)| config)
    }

    /// Merges the layers, validates the runtime's part and returns the application's
    /// sections beside it.
    pub fn load_with_application(self) -> Result<(ShoalConfig, ApplicationConfig), ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(ShoalConfig::default()));
        if let Some(file) = &self.file {
            if !file.exists() {
                return Err(ConfigError::Load(format!(
                    "config file {} does not exist",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file(file));
        }
        for (var, raw) in &self.env {
            let key = env_key(var);
            let value = raw
                .parse::<Value>()
                .unwrap_or_else(|_| Value::from(raw.clone()));
            figment = figment.merge(Serialized::default(&key, value));
        }
        for (key, value) in self.overrides {
            figment = figment.merge(Serialized::default(&key, value));
        }
        let mut dict: figment::value::Dict = figment.extract()?;
        let mut application = figment::value::Dict::new();
        for name in &self.application {
            if let Some(section) = dict.remove(name) {
                application.insert(name.clone(), section);
            }
        }
        let config: ShoalConfig =
            Figment::from(Serialized::defaults(Value::from(dict))).extract()?;
        config.validate()?;
        Ok((config, ApplicationConfig(application)))
    }
}

/// `SHOAL__RUNNER__POLL_INTERVAL` → `runner.poll-interval`.
fn env_key(var: &str) -> String {
    var[ENV_PREFIX.len()..]
        .to_ascii_lowercase()
        .split("__")
        .map(|part| part.replace('_', "-"))
        .collect::<Vec<_>>()
        .join(".")
}

impl ShoalConfig {
    /// Checks relations between values that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let shards = self.cluster.shards_per_group.get();
        if shards > 1 << 20 {
            return Err(ConfigError::Invalid {
                key: "cluster.shards-per-group",
                problem: format!("is {shards}; the limit is {}", 1 << 20),
            });
        }
        if self.database.url.trim().is_empty() {
            return Err(ConfigError::Invalid {
                key: "database.url",
                problem: "must not be empty".to_owned(),
            });
        }
        if self.cluster.secret.is_empty() {
            return Err(ConfigError::Invalid {
                key: "cluster.secret",
                problem: "must not be empty".to_owned(),
            });
        }
        if self.database.pool_max_connections == 0 {
            return Err(ConfigError::Invalid {
                key: "database.pool-max-connections",
                problem: "must be at least 1".to_owned(),
            });
        }
        for (key, zero) in [
            ("gateway.max-connections", self.gateway.max_connections == 0),
            (
                "gateway.max-connections-per-client",
                self.gateway.max_connections_per_client == 0,
            ),
            (
                "gateway.header-read-timeout",
                self.gateway.header_read_timeout.is_zero(),
            ),
        ] {
            if zero {
                return Err(ConfigError::Invalid {
                    key,
                    problem: "must be above zero".to_owned(),
                });
            }
        }
        self.retention.validate()?;
        let mut names = std::collections::BTreeSet::new();
        for schedule in &self.cron {
            if !names.insert(schedule.name.as_str()) {
                return Err(ConfigError::Invalid {
                    key: "cron",
                    problem: format!("schedule `{}` is defined twice", schedule.name),
                });
            }
            crate::cron::Schedule::parse(schedule).map_err(|problem| ConfigError::Invalid {
                key: "cron",
                problem,
            })?;
        }
        self.redis.validate()?;
        self.gateway.auth.validate()?;
        self.runner.validate()
    }

    /// The sharding this configuration describes.
    pub fn sharding(&self) -> Sharding {
        Sharding::new(self.cluster.shards_per_group)
    }
}

impl RunnerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Environment pairs for a loader (shared by the config submodules' tests).
    pub(crate) fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let config = ConfigLoader::new().load().expect("defaults load");
        assert_eq!(config, ShoalConfig::default());
    }

    #[test]
    fn env_overrides_defaults_and_flags_override_env() {
        let config = ConfigLoader::new()
            .env(env(&[
                ("SHOAL__RUNNER__POLL_INTERVAL", "500ms"),
                ("SHOAL__CLUSTER__NAME", "from-env"),
                ("SHOAL__CLUSTER__SHARDS_PER_GROUP", "64"),
                ("UNRELATED", "x"),
            ]))
            .set("cluster.name", Some("from-flag"))
            .load()
            .expect("loads");
        assert_eq!(config.runner.poll_interval, Duration::from_millis(500));
        assert_eq!(config.cluster.name.as_str(), "from-flag");
        assert_eq!(config.cluster.shards_per_group.get(), 64);
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let error = ConfigLoader::new()
            .env(env(&[("SHOAL__RUNNER__POLL_INTERVL", "1s")]))
            .load()
            .expect_err("unknown key");
        assert!(error.to_string().contains("poll-intervl"), "{error}");
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        let error = ConfigLoader::new()
            .env(env(&[("SHOAL__CLUSTER__SHARDS_PER_GROUP", "0")]))
            .load()
            .expect_err("zero shards");
        assert!(error.to_string().contains("shards-per-group"), "{error}");

        let error = ConfigLoader::new()
            .env(env(&[("SHOAL__RUNNER__LOCK_DEADLINE", "10s")]))
            .load()
            .expect_err("deadline above keepalive detection");
        assert!(
            error.to_string().contains("runner.lock-deadline"),
            "{error}"
        );

        let error = ConfigLoader::new()
            .env(env(&[("SHOAL__CLUSTER__NAME", "has space")]))
            .load()
            .expect_err("bad name");
        assert!(error.to_string().contains("cluster name"), "{error}");

        let error = ConfigLoader::new()
            .env(env(&[("SHOAL__RETENTION__BATCH_SIZE", "0")]))
            .load()
            .expect_err("empty batches");
        assert!(
            error.to_string().contains("retention.batch-size"),
            "{error}"
        );
        let config = ConfigLoader::new()
            .env(env(&[("SHOAL__RETENTION__PERIOD", "90s")]))
            .load()
            .expect("a short retention loads");
        assert_eq!(config.retention.period, Duration::from_secs(90));
    }

    #[test]
    fn bad_cron_schedules_are_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("shoal-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let cases = [
            ("nonsense", "not a cron", "UTC"),
            ("bad-zone", "*/5 * * * * *", "Mars/Olympus"),
        ];
        for (name, expression, zone) in cases {
            let path = dir.join(format!("{name}.toml"));
            std::fs::write(
                &path,
                format!(
                    "[[cron]]\nname = \"{name}\"\nexpression = \"{expression}\"\n\
                     time-zone = \"{zone}\"\n[cron.target]\nentity-type = \"counter\"\n\
                     entity-id = \"c\"\nmessage = \"increment\"\n"
                ),
            )
            .expect("writes");
            let error = ConfigLoader::new().file(&path).load().expect_err("refused");
            assert!(error.to_string().contains(&format!("`{name}`")), "{error}");
        }
    }

    #[test]
    fn shipped_config_files_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster-config");
        for name in ["default.toml", "dev.toml", "docker.toml"] {
            let path = dir.join(name);
            ConfigLoader::new()
                .file(&path)
                .load()
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }
}
