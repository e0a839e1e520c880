//! Configuration: one [`ShoalConfig`] tree, loaded once at start-up from layers
//! (defaults < `cluster-config/<name>.toml` < `SHOAL__SECTION__KEY` environment < CLI flags)
//! and validated into typed values. Unknown keys and bad values are refused with an error
//! that names the key. Sub-structs are handed to the components that own them; there is no
//! global config.

use serde::{Deserialize, Serialize};

pub use crate::cron::config::{CronScheduleConfig, CronTargetConfig, MissedRunPolicy};
use crate::sharding::Sharding;

mod cluster;
mod gateway;
mod loader;
mod redis;
mod runner;

pub use self::cluster::{ClusterConfig, DatabaseConfig, LogConfig, LogFormat, RetentionConfig};
pub use self::gateway::{AuthConfig, CorsConfig, GatewayConfig};
pub use self::loader::{ApplicationConfig, ConfigLoader};
pub use self::redis::{
    ApiLimitsConfig, BreakerConfig, CacheConfig, ProviderLimitsConfig, RatePreset, RedisConfig,
    RedisDownPolicy,
};
pub use self::runner::RunnerConfig;

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
        self.gateway.cors.validate()?;
        self.runner.validate()
    }

    /// The sharding this configuration describes.
    pub fn sharding(&self) -> Sharding {
        Sharding::new(self.cluster.shards_per_group)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

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
