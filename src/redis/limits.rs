//! Rate limiters shared by every replica, each decision one Lua script (atomic on the
//! server, so concurrent replicas can never both take the last unit):
//!
//! - [`SlidingWindow`]: at most N requests per key in any window (the gateway's API limits).
//! - [`FixedWindow`]: at most N units of cost per clock-aligned window (provider
//!   requests/min).
//! - [`TokenBucket`]: a bucket refilled continuously, each call taking a cost (provider
//!   tokens/min).
//! - [`ConcurrencyLimit`]: at most N leases at once; a lease is released on completion and
//!   reclaimed after its TTL if its holder crashed.
//! - [`ProviderLimits`]: the three provider limits together, from `[redis.providers.<name>]`.
//!
//! Every decision is a [`Decision`] (allowed, remaining, reset_at, retry_after). Callers pick
//! an [`Admission`]: be refused at once, or wait (with jitter) up to a bound. The
//! arithmetic is mirrored in [`math`] and property-tested there.

mod concurrency;
pub mod math;

pub use concurrency::{ConcurrencyLimit, Lease};

use crate::backoff::jittered;
use std::time::{Duration, Instant, SystemTime};

use ::redis::Script;

use super::{RedisClient, RedisError, system_time_from_ms};
use crate::config::ProviderLimitsConfig;

static SLIDING_WINDOW: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("lua/sliding_window.lua")));
static FIXED_WINDOW: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("lua/fixed_window.lua")));
static TOKEN_BUCKET: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("lua/token_bucket.lua")));

/// Largest `capacity × period_ms` of a token bucket: the scripts' Lua doubles hold integers
/// exactly up to 2^53.
const MAX_BUCKET_SPAN: u64 = 1 << 53;

/// A limiter's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the call is admitted.
    pub allowed: bool,
    /// The limit (requests, cost units, tokens or leases).
    pub limit: u64,
    /// Units left after this decision.
    pub remaining: u64,
    /// When a unit frees (sliding window, leases), the window resets (fixed window) or the
    /// bucket is full again (token bucket).
    pub reset_at: SystemTime,
    /// How long to wait before the same call may pass; zero when admitted.
    pub retry_after: Duration,
}

impl Decision {
    /// From a script's `{allowed, remaining, reset_at_ms, retry_after_ms, now_ms}`.
    pub(super) fn from_reply(
        op: &'static str,
        limit: u64,
        reply: &[i64],
    ) -> Result<Self, RedisError> {
        let &[allowed, remaining, reset_at, retry_after, _now] = reply else {
            return Err(RedisError::Reply {
                op,
                message: format!("expected 5 integers, got {reply:?}"),
            });
        };
        Ok(Self {
            allowed: allowed == 1,
            limit,
            remaining: u64::try_from(remaining).unwrap_or(0),
            reset_at: system_time_from_ms(reset_at),
            retry_after: Duration::from_millis(u64::try_from(retry_after).unwrap_or(0)),
        })
    }

    /// Seconds until `reset_at`, rounded up (the `X-RateLimit-Reset` value).
    pub fn reset_after_secs(&self) -> u64 {
        let left = self
            .reset_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        left.as_millis().div_ceil(1000) as u64
    }
}

/// What a caller does when a limiter refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Give up at once with [`LimitError::Limited`].
    Refuse,
    /// Sleep `retry_after` (plus jitter) and try again, for at most `max_wait` in all.
    Wait {
        /// The longest total wait.
        max_wait: Duration,
    },
}

/// Why a limited call could not proceed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LimitError {
    /// The limit is reached (after waiting, if the caller chose to).
    #[error("rate limited by `{limiter}`; retry after {:?}", decision.retry_after)]
    Limited {
        /// Which limiter refused.
        limiter: &'static str,
        /// Its last decision.
        decision: Decision,
    },
    /// A call costs more than the limit could ever admit.
    #[error("a cost of {cost} exceeds the limit of {limit}")]
    CostTooHigh {
        /// The cost asked.
        cost: u64,
        /// The limit.
        limit: u64,
    },
    /// Redis could not decide.
    #[error(transparent)]
    Redis(#[from] RedisError),
}

impl LimitError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Limited { .. } => true,
            Self::CostTooHigh { .. } => false,
            Self::Redis(error) => error.is_retryable(),
        }
    }
}

/// Asks `decide` until it admits, or the admission policy gives up.
pub(super) async fn admit<F, Fut>(
    limiter: &'static str,
    admission: Admission,
    mut decide: F,
) -> Result<Decision, LimitError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Decision, LimitError>>,
{
    let started = Instant::now();
    loop {
        let decision = decide().await?;
        if decision.allowed {
            crate::metrics::rate_limit_decision(limiter, "allowed");
            if !started.elapsed().is_zero() && admission != Admission::Refuse {
                crate::metrics::rate_limit_wait(limiter, started.elapsed());
            }
            return Ok(decision);
        }
        crate::metrics::rate_limit_decision(limiter, "limited");
        let wait = jittered(decision.retry_after.max(Duration::from_millis(1)));
        match admission {
            Admission::Wait { max_wait } if started.elapsed() + wait <= max_wait => {
                tokio::time::sleep(wait).await;
            }
            _ => return Err(LimitError::Limited { limiter, decision }),
        }
    }
}

pub(super) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// At most `limit` requests per key in any `window` (a log of admission times per key).
#[derive(Debug, Clone)]
pub struct SlidingWindow {
    client: RedisClient,
    name: String,
    limit: u64,
    window_ms: u64,
}

impl SlidingWindow {
    /// A limiter whose keys live under `<prefix>:sw:<name>:`.
    pub fn new(client: RedisClient, name: &str, limit: u32, window: Duration) -> Self {
        Self {
            name: client.key("sw", name),
            client,
            limit: u64::from(limit.max(1)),
            window_ms: millis(window),
        }
    }

    /// The limit per window.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Decides one request for `key` (counted if admitted).
    pub async fn check(&self, key: &str) -> Result<Decision, RedisError> {
        self.check_at(key, None).await
    }

    /// [`SlidingWindow::check`] at a given time in ms (tests drive the clock); `None` is the
    /// server's clock.
    pub async fn check_at(&self, key: &str, now_ms: Option<i64>) -> Result<Decision, RedisError> {
        let key = format!("{}:{key}", self.name);
        let member = uuid::Uuid::now_v7().simple().to_string();
        let args = [
            self.limit.to_string(),
            self.window_ms.to_string(),
            member,
            now_arg(now_ms),
        ];
        let reply: Vec<i64> = self
            .client
            .script("sliding_window", &SLIDING_WINDOW, &[&key], &args)
            .await?;
        Decision::from_reply("sliding_window", self.limit, &reply)
    }

    /// Decides a request for `key` under `admission`.
    pub async fn acquire(&self, key: &str, admission: Admission) -> Result<Decision, LimitError> {
        admit("sliding_window", admission, || async {
            Ok(self.check(key).await?)
        })
        .await
    }
}

fn now_arg(now_ms: Option<i64>) -> String {
    now_ms.map(|ms| ms.to_string()).unwrap_or_default()
}

/// A limiter whose calls carry a cost: fixed window and token bucket run scripts that take
/// the same arguments (limit, span in ms, cost, optional now) and answer the same decision.
#[derive(Clone)]
struct CostedLimiter {
    client: RedisClient,
    /// Key prefix of this limiter's keys.
    name: String,
    op: &'static str,
    script: &'static Script,
    limit: u64,
    span_ms: u64,
}

impl std::fmt::Debug for CostedLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CostedLimiter")
            .field("name", &self.name)
            .field("op", &self.op)
            .field("limit", &self.limit)
            .field("span_ms", &self.span_ms)
            .finish()
    }
}

impl CostedLimiter {
    /// Refuses a cost above the limit without asking Redis, else runs the script on `key`
    /// at `now_ms` (`None` is the server's clock).
    async fn check_at(
        &self,
        key: &str,
        cost: u64,
        now_ms: Option<i64>,
    ) -> Result<Decision, LimitError> {
        if cost > self.limit {
            return Err(LimitError::CostTooHigh {
                cost,
                limit: self.limit,
            });
        }
        let args = [
            self.limit.to_string(),
            self.span_ms.to_string(),
            cost.max(1).to_string(),
            now_arg(now_ms),
        ];
        let key = format!("{}:{key}", self.name);
        let reply: Vec<i64> = self
            .client
            .script(self.op, self.script, &[key.as_str()], &args)
            .await?;
        Ok(Decision::from_reply(self.op, self.limit, &reply)?)
    }

    async fn acquire(
        &self,
        key: &str,
        cost: u64,
        admission: Admission,
    ) -> Result<Decision, LimitError> {
        admit(self.op, admission, || self.check_at(key, cost, None)).await
    }
}

/// At most `limit` units of cost per key in each clock-aligned `window`.
#[derive(Debug, Clone)]
pub struct FixedWindow(CostedLimiter);

impl FixedWindow {
    /// A limiter whose keys live under `<prefix>:fw:<name>:`.
    pub fn new(client: RedisClient, name: &str, limit: u64, window: Duration) -> Self {
        Self(CostedLimiter {
            name: client.key("fw", name),
            client,
            op: "fixed_window",
            script: &FIXED_WINDOW,
            limit: limit.max(1),
            span_ms: millis(window),
        })
    }

    /// Decides a call of `cost` units for `key` (counted if admitted).
    pub async fn check(&self, key: &str, cost: u64) -> Result<Decision, LimitError> {
        self.0.check_at(key, cost, None).await
    }

    /// [`FixedWindow::check`] at a given time in ms; `None` is the server's clock.
    pub async fn check_at(
        &self,
        key: &str,
        cost: u64,
        now_ms: Option<i64>,
    ) -> Result<Decision, LimitError> {
        self.0.check_at(key, cost, now_ms).await
    }

    /// Decides a call of `cost` for `key` under `admission`.
    pub async fn acquire(
        &self,
        key: &str,
        cost: u64,
        admission: Admission,
    ) -> Result<Decision, LimitError> {
        self.0.acquire(key, cost, admission).await
    }
}

/// A bucket of `capacity` tokens per key, refilled at `capacity` per `period`; each call
/// takes its cost in tokens.
#[derive(Debug, Clone)]
pub struct TokenBucket(CostedLimiter);

impl TokenBucket {
    /// A bucket whose keys live under `<prefix>:tb:<name>:`. Fails if `capacity × period`
    /// (ms) is too large to compute exactly.
    pub fn new(
        client: RedisClient,
        name: &str,
        capacity: u64,
        period: Duration,
    ) -> Result<Self, RedisError> {
        let capacity = capacity.max(1);
        let period_ms = millis(period);
        if capacity.saturating_mul(period_ms) > MAX_BUCKET_SPAN {
            return Err(RedisError::Config(format!(
                "token bucket `{name}`: capacity {capacity} × period {period_ms} ms exceeds 2^53"
            )));
        }
        Ok(Self(CostedLimiter {
            name: client.key("tb", name),
            client,
            op: "token_bucket",
            script: &TOKEN_BUCKET,
            limit: capacity,
            span_ms: period_ms,
        }))
    }

    /// The bucket's capacity in tokens.
    pub fn capacity(&self) -> u64 {
        self.0.limit
    }

    /// Decides a call taking `cost` tokens from `key`'s bucket.
    pub async fn check(&self, key: &str, cost: u64) -> Result<Decision, LimitError> {
        self.0.check_at(key, cost, None).await
    }

    /// [`TokenBucket::check`] at a given time in ms; `None` is the server's clock.
    pub async fn check_at(
        &self,
        key: &str,
        cost: u64,
        now_ms: Option<i64>,
    ) -> Result<Decision, LimitError> {
        self.0.check_at(key, cost, now_ms).await
    }

    /// Corrects `key`'s bucket by `delta` tokens after the fact: positive takes more
    /// (a call used more than it was charged), negative gives back. Never refused; the
    /// level may go below zero (down to minus the capacity), a debt later calls wait out.
    pub async fn adjust(&self, key: &str, delta: i64) -> Result<Decision, LimitError> {
        let limiter = &self.0;
        let args = [
            limiter.limit.to_string(),
            limiter.span_ms.to_string(),
            delta.to_string(),
            String::new(),
            "adjust".to_owned(),
        ];
        let key = format!("{}:{key}", limiter.name);
        let reply: Vec<i64> = limiter
            .client
            .script("token_bucket_adjust", &TOKEN_BUCKET, &[key.as_str()], &args)
            .await?;
        Ok(Decision::from_reply(
            "token_bucket_adjust",
            limiter.limit,
            &reply,
        )?)
    }

    /// Takes `cost` tokens from `key`'s bucket under `admission`.
    pub async fn acquire(
        &self,
        key: &str,
        cost: u64,
        admission: Admission,
    ) -> Result<Decision, LimitError> {
        self.0.acquire(key, cost, admission).await
    }
}

/// An upstream provider's limits: requests per minute (fixed window), tokens per minute
/// (token bucket) and calls in flight (leases), shared by every replica.
#[derive(Debug, Clone)]
pub struct ProviderLimits {
    provider: String,
    requests: FixedWindow,
    tokens: TokenBucket,
    concurrency: ConcurrencyLimit,
}

impl ProviderLimits {
    /// The limits of `provider` as configured.
    pub fn new(
        client: RedisClient,
        provider: &str,
        config: &ProviderLimitsConfig,
    ) -> Result<Self, RedisError> {
        let minute = Duration::from_secs(60);
        let name = format!("provider:{provider}");
        Ok(Self {
            provider: provider.to_owned(),
            requests: FixedWindow::new(
                client.clone(),
                &name,
                u64::from(config.requests_per_minute),
                minute,
            ),
            tokens: TokenBucket::new(client.clone(), &name, config.tokens_per_minute, minute)?,
            concurrency: ConcurrencyLimit::new(client, &name, config.concurrency, config.lease_ttl),
        })
    }

    /// Corrects the tokens charged for a call estimated at `estimate` that used `actual`
    /// (as the provider reported): charges the difference, or gives it back.
    pub async fn correct_tokens(&self, estimate: u64, actual: u64) -> Result<(), LimitError> {
        let delta =
            i64::try_from(actual).unwrap_or(i64::MAX) - i64::try_from(estimate).unwrap_or(i64::MAX);
        if delta != 0 {
            self.tokens.adjust(&self.provider, delta).await?;
        }
        Ok(())
    }

    /// Admits one call estimated at `tokens`: a concurrency lease first (so a call that
    /// cannot run does not spend the window), then one request of the window, then the
    /// tokens. Hold the lease until the call completes, then release it.
    pub async fn acquire(&self, tokens: u64, admission: Admission) -> Result<Lease, LimitError> {
        let lease = self.concurrency.acquire(&self.provider, admission).await?;
        let admitted = async {
            self.requests.acquire(&self.provider, 1, admission).await?;
            self.tokens.acquire(&self.provider, tokens, admission).await
        }
        .await;
        match admitted {
            Ok(_) => Ok(lease),
            Err(error) => {
                // Best effort: the lease expires anyway if this release fails.
                let _ = lease.release().await;
                Err(error)
            }
        }
    }
}
