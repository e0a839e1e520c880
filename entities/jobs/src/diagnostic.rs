//! Diagnostic job types for drills and tests, registered on every node like the `probe`
//! entity (their names start with `diag.`, so no application type collides with them):
//!
//! - `diag.flaky {fail_times}`: attempts `1..=fail_times` fail retryably, the next succeeds
//!   (backoff 1 s doubling to 4 s, with jitter).
//! - `diag.sleep {ms}`: sleeps `ms`, or stops when cancelled and notes that it saw the
//!   cancellation (`{"observed": "cancelled"}` in its attempt's notes).
//! - `diag.limited {ms}`: sleeps `ms`; at most 3 run at once across the cluster.
//! - `diag.rated {tenant}`: succeeds at once; at most 4 start per second per `tenant`
//!   across the cluster.
//! - `diag.noop {}`: succeeds at once, replying with its attempt number.
//! - `diag.count {ms}`: sleeps `ms` (observing cancellation), then adds one to the row of
//!   its job id in the table `diag_job_effects (job_id text primary key, hits int)`, which
//!   whoever uses the type creates (a drill, a test): a side effect keyed by job, so a
//!   drill can count how often each job's work really ran.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::handler::{BackoffPolicy, JobContext, JobError, JobHandler, JobOptions, RateLimit};

/// `diag.flaky`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Flaky;

/// `diag.flaky`'s payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlakyPayload {
    /// How many attempts fail before one succeeds.
    pub fail_times: u32,
}

impl JobHandler for Flaky {
    const TYPE: &'static str = "diag.flaky";
    type Payload = FlakyPayload;
    type Output = serde_json::Value;

    fn options(&self) -> JobOptions {
        JobOptions {
            backoff: BackoffPolicy {
                first: Duration::from_secs(1),
                max: Duration::from_secs(4),
                jitter: true,
            },
            ..JobOptions::default()
        }
    }

    async fn run(&self, ctx: &JobContext, payload: FlakyPayload) -> Result<Self::Output, JobError> {
        ctx.progress(50, "flaking");
        if ctx.attempt() <= payload.fail_times {
            return Err(JobError::retryable(format!(
                "failing attempt {}",
                ctx.attempt()
            )));
        }
        Ok(serde_json::json!({ "succeeded_on_attempt": ctx.attempt() }))
    }
}

/// `diag.sleep`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sleep;

/// `diag.sleep`'s payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SleepPayload {
    /// How long to sleep, milliseconds.
    pub ms: u64,
}

impl JobHandler for Sleep {
    const TYPE: &'static str = "diag.sleep";
    type Payload = SleepPayload;
    type Output = serde_json::Value;

    fn options(&self) -> JobOptions {
        JobOptions {
            max_attempts: 1,
            ..JobOptions::default()
        }
    }

    async fn run(&self, ctx: &JobContext, payload: SleepPayload) -> Result<Self::Output, JobError> {
        ctx.progress(10, "sleeping");
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(payload.ms)) => {
                Ok(serde_json::json!({ "slept_ms": payload.ms }))
            }
            () = ctx.cancelled() => {
                ctx.note(serde_json::json!({ "observed": "cancelled" }));
                Err(JobError::retryable("cancelled while sleeping"))
            }
        }
    }
}

/// `diag.noop`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Noop;

impl JobHandler for Noop {
    const TYPE: &'static str = "diag.noop";
    type Payload = serde_json::Map<String, serde_json::Value>;
    type Output = serde_json::Value;

    async fn run(
        &self,
        ctx: &JobContext,
        _payload: Self::Payload,
    ) -> Result<Self::Output, JobError> {
        Ok(serde_json::json!({ "attempt": ctx.attempt() }))
    }
}

/// `diag.count` (without a pool, on a node that only validates payloads, it fails
/// permanently).
#[derive(Debug, Clone, Default)]
pub struct Count {
    pool: Option<PgPool>,
}

impl Count {
    /// Counting into `pool`'s `diag_job_effects`.
    pub fn new(pool: Option<PgPool>) -> Self {
        Self { pool }
    }
}

impl JobHandler for Count {
    const TYPE: &'static str = "diag.count";
    type Payload = SleepPayload;
    type Output = serde_json::Value;

    fn options(&self) -> JobOptions {
        JobOptions {
            backoff: BackoffPolicy {
                first: Duration::from_millis(500),
                max: Duration::from_secs(2),
                jitter: true,
            },
            ..JobOptions::default()
        }
    }

    async fn run(&self, ctx: &JobContext, payload: SleepPayload) -> Result<Self::Output, JobError> {
        let pool = self
            .pool
            .as_ref()
            .ok_or_else(|| JobError::permanent("diag.count has no database on this node"))?;
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(payload.ms)) => {}
            () = ctx.cancelled() => return Err(JobError::retryable("cancelled")),
        }
        let hits: i32 = sqlx::query_scalar(
            "INSERT INTO diag_job_effects (job_id, hits) VALUES ($1, 1)
             ON CONFLICT (job_id) DO UPDATE SET hits = diag_job_effects.hits + 1
             RETURNING hits",
        )
        .bind(ctx.job_id().to_string())
        .fetch_one(pool)
        .await
        .map_err(|e| JobError::retryable(format!("diag_job_effects: {e}")))?;
        Ok(serde_json::json!({ "hits": hits }))
    }
}

/// `diag.limited`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limited;

impl JobHandler for Limited {
    const TYPE: &'static str = "diag.limited";
    type Payload = SleepPayload;
    type Output = serde_json::Value;

    fn options(&self) -> JobOptions {
        JobOptions {
            concurrency: Some(3),
            ..JobOptions::default()
        }
    }

    async fn run(&self, ctx: &JobContext, payload: SleepPayload) -> Result<Self::Output, JobError> {
        Sleep.run(ctx, payload).await
    }
}

/// `diag.rated`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rated;

/// `diag.rated`'s payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RatedPayload {
    /// The key the rate applies per.
    pub tenant: String,
}

impl JobHandler for Rated {
    const TYPE: &'static str = "diag.rated";
    type Payload = RatedPayload;
    type Output = serde_json::Value;

    fn options(&self) -> JobOptions {
        JobOptions {
            rate: Some(RateLimit {
                limit: 4,
                per: Duration::from_secs(1),
            }),
            limit_key: Some(|payload| payload["tenant"].as_str().map(str::to_owned)),
            ..JobOptions::default()
        }
    }

    async fn run(
        &self,
        ctx: &JobContext,
        _payload: RatedPayload,
    ) -> Result<Self::Output, JobError> {
        Ok(serde_json::json!({ "attempt": ctx.attempt() }))
    }
}
