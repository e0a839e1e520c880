//! The Redis client layer: what must be shared by every replica and fast. Built on one
//! [`ConnectionManager`] (a multiplexed connection that
//! reconnects by itself) and used by the rate limiters ([`limits`]), the circuit breaker
//! ([`breaker`]) and the caches ([`cache`]).
//!
//! Invariants:
//! - Every key starts with the cluster's prefix (`redis.key-prefix`, default
//!   `shoal:<cluster>`), so clusters and tests can share one Redis.
//! - Every command attempt has a deadline (`redis.command-timeout`); a caller never waits on
//!   a dead Redis for longer than `(max-retries + 1) × command-timeout` plus backoff.
//! - Only [`RedisError::is_retryable`] errors are retried, at most `redis.max-retries`
//!   times. A timed-out attempt may still have run on the server, so every script is safe to
//!   run twice: leases are keyed by an id the caller picks (idempotent), and a limiter hit
//!   that ran twice only counts twice (it errs toward refusing, never toward admitting).
//! - Every multi-step update is one Lua script, atomic on the server. Scripts read the time
//!   from the server (`TIME`), so replicas with skewed clocks agree.
//! - Nothing here falls back to per-process state when Redis is down: callers get
//!   [`RedisError::Unavailable`] or [`RedisError::Timeout`] and decide.

pub mod breaker;
pub mod cache;
pub mod limits;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{ErrorKind, FromRedisValue, Script, ServerErrorKind};

use crate::backoff::{Backoff, jittered};
use crate::config::RedisConfig;
use crate::ids::ClusterName;

/// Why a Redis operation failed. [`RedisError::is_retryable`] says whether trying again
/// may succeed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RedisError {
    /// `redis.url` is not set.
    #[error("redis is not configured (`redis.url` is unset)")]
    NotConfigured,
    /// The URL or settings are unusable.
    #[error("invalid redis configuration: {0}")]
    Config(String),
    /// No connection: refused, dropped, or reconnecting.
    #[error("redis is unavailable ({op}): {message}")]
    Unavailable {
        /// The operation.
        op: &'static str,
        /// The client's description.
        message: String,
    },
    /// No answer within the command timeout.
    #[error("redis did not answer `{op}` within {timeout:?}")]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The timeout.
        timeout: Duration,
    },
    /// Redis answered with an error.
    #[error("redis refused `{op}`: {message}")]
    Server {
        /// The operation.
        op: &'static str,
        /// The server's message.
        message: String,
        /// Whether the server said to try again (`LOADING`, `TRYAGAIN`, ...).
        retryable: bool,
    },
    /// A value could not be encoded for Redis (a caller's bug; never retried).
    #[error("cannot encode a value for `{op}`: {message}")]
    Encode {
        /// The operation.
        op: &'static str,
        /// Why.
        message: String,
    },
    /// Redis answered with something the caller did not expect.
    #[error("redis answered `{op}` with an unexpected reply: {message}")]
    Reply {
        /// The operation.
        op: &'static str,
        /// What was wrong.
        message: String,
    },
}

impl RedisError {
    /// Whether the same operation may succeed if tried again.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Unavailable { .. } | Self::Timeout { .. } => true,
            Self::Server { retryable, .. } => *retryable,
            Self::NotConfigured | Self::Config(_) | Self::Encode { .. } | Self::Reply { .. } => {
                false
            }
        }
    }

    /// Whether Redis could not be reached (as opposed to answering wrongly).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::Unavailable { .. } | Self::Timeout { .. } | Self::NotConfigured
        )
    }

    /// The `kind` label of the error metric.
    fn label(&self) -> &'static str {
        match self {
            Self::NotConfigured | Self::Config(_) => "config",
            Self::Unavailable { .. } => "unavailable",
            Self::Timeout { .. } => "timeout",
            Self::Server { .. } => "server",
            Self::Reply { .. } => "reply",
            Self::Encode { .. } => "encode",
        }
    }

    /// Maps a client error into the domain error: the one place that reads redis-rs kinds.
    fn from_client(op: &'static str, error: ::redis::RedisError) -> Self {
        let message = error.to_string();
        match error.kind() {
            ErrorKind::Server(kind) => Self::Server {
                op,
                message,
                retryable: matches!(
                    kind,
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::MasterDown
                ),
            },
            ErrorKind::UnexpectedReturnType | ErrorKind::Parse => Self::Reply { op, message },
            ErrorKind::InvalidClientConfig => Self::Config(message),
            // I/O errors (refused, dropped, response timeout) and client-side connection
            // states all mean the same to a caller: Redis cannot be used right now.
            _ => Self::Unavailable { op, message },
        }
    }
}

/// A cloneable handle on the cluster's Redis: prefixed keys, timeouts, bounded retries,
/// metrics. Cheap to clone (one shared multiplexed connection).
#[derive(Clone)]
pub struct RedisClient {
    inner: Arc<Inner>,
}

struct Inner {
    manager: ConnectionManager,
    prefix: String,
    command_timeout: Duration,
    max_retries: u32,
    retry_backoff: Duration,
}

impl std::fmt::Debug for RedisClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClient")
            .field("prefix", &self.inner.prefix)
            .field("command_timeout", &self.inner.command_timeout)
            .finish_non_exhaustive()
    }
}

impl RedisClient {
    /// A client for `config` (keys prefixed for `cluster` unless `redis.key-prefix` is set).
    /// Connects lazily: it succeeds while Redis is down, and the first commands answer
    /// [`RedisError::Unavailable`] until Redis is back.
    pub fn connect(config: &RedisConfig, cluster: &ClusterName) -> Result<Self, RedisError> {
        let url = config.url.as_deref().ok_or(RedisError::NotConfigured)?;
        let client = ::redis::Client::open(url).map_err(|e| RedisError::Config(e.to_string()))?;
        // Reconnection retries stay short: a command waits on the reconnect future, and a
        // dead Redis must answer quickly. A later command starts a new reconnect anyway.
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.command_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_lazy_with_config(client, manager_config)
            .map_err(|e| RedisError::Config(e.to_string()))?;
        let prefix = config
            .key_prefix
            .clone()
            .unwrap_or_else(|| format!("shoal:{cluster}"));
        Ok(Self {
            inner: Arc::new(Inner {
                manager,
                prefix,
                command_timeout: config.command_timeout,
                max_retries: config.max_retries,
                retry_backoff: config.retry_backoff,
            }),
        })
    }

    /// The prefix of every key.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// `<prefix>:<kind>:<name>`.
    pub fn key(&self, kind: &str, name: &str) -> String {
        format!("{}:{kind}:{name}", self.inner.prefix)
    }

    /// One `PING`, without retries: the round trip, or why Redis cannot be used.
    pub async fn health(&self) -> Result<Duration, RedisError> {
        let started = Instant::now();
        let pong: String = self
            .attempt("ping", |mut con| async move {
                ::redis::cmd("PING").query_async(&mut con).await
            })
            .await?;
        if pong != "PONG" {
            return Err(RedisError::Reply {
                op: "ping",
                message: format!("`{pong}` instead of PONG"),
            });
        }
        Ok(started.elapsed())
    }

    /// Runs `cmd` with the timeout and retry policy.
    pub async fn command<T>(&self, op: &'static str, cmd: &::redis::Cmd) -> Result<T, RedisError>
    where
        T: FromRedisValue + Send,
    {
        self.retrying(op, |mut con| async move { cmd.query_async(&mut con).await })
            .await
    }

    /// Runs `script` with `keys` and `args` (`EVALSHA`, loading it after a restart), with
    /// the timeout and retry policy.
    pub async fn script<T>(
        &self,
        op: &'static str,
        script: &Script,
        keys: &[&str],
        args: &[String],
    ) -> Result<T, RedisError>
    where
        T: FromRedisValue + Send,
    {
        self.retrying(op, |mut con| async move {
            let mut invocation = script.prepare_invoke();
            for key in keys {
                invocation.key(*key);
            }
            invocation.arg(args);
            invocation.invoke_async(&mut con).await
        })
        .await
    }

    /// Attempts `run` until it succeeds, fails for good, or the retries are used up.
    async fn retrying<T, F, Fut>(&self, op: &'static str, mut run: F) -> Result<T, RedisError>
    where
        F: FnMut(ConnectionManager) -> Fut,
        Fut: Future<Output = ::redis::RedisResult<T>>,
    {
        let mut retries = 0;
        loop {
            match self.attempt(op, &mut run).await {
                Err(error) if error.is_retryable() && retries < self.inner.max_retries => {
                    retries += 1;
                    let base = Backoff::nth(self.inner.retry_backoff, retries - 1, u32::MAX);
                    tokio::time::sleep(jittered(base)).await;
                    tracing::debug!(op, retries, %error, "retrying redis command");
                }
                result => return result,
            }
        }
    }

    /// One attempt under the command timeout, measured.
    async fn attempt<T, F, Fut>(&self, op: &'static str, run: F) -> Result<T, RedisError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = ::redis::RedisResult<T>>,
    {
        let started = Instant::now();
        let timeout = self.inner.command_timeout;
        let result = match tokio::time::timeout(timeout, run(self.inner.manager.clone())).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(RedisError::from_client(op, error)),
            Err(_) => Err(RedisError::Timeout { op, timeout }),
        };
        let label = result.as_ref().err().map(RedisError::label);
        crate::metrics::redis_command(op, started.elapsed(), label);
        result
    }
}

/// Milliseconds since the Unix epoch as an `i64` (what the scripts return).
pub(crate) fn system_time_from_ms(ms: i64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}
