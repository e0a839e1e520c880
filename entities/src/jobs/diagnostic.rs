//! Diagnostic job types for drills and tests, registered on every node like the `probe`
//! entity (their names start with `diag.`, so no application type collides with them):
//!
//! - `diag.flaky {fail_times}`: attempts `1..=fail_times` fail retryably, the next succeeds
//!   (backoff 1 s doubling to 4 s, with jitter).
//! - `diag.sleep {ms}`: sleeps `ms`, or stops when cancelled and notes that it saw the
//!   cancellation (`{"observed": "cancelled"}` in its attempt's notes).
//! - `diag.noop {}`: succeeds at once, replying with its attempt number.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::handler::{BackoffPolicy, JobContext, JobError, JobHandler, JobOptions};

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
            return Err(JobError::retryable(format!("failing attempt {}", ctx.attempt())));
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

    async fn run(&self, ctx: &JobContext, _payload: Self::Payload) -> Result<Self::Output, JobError> {
        Ok(serde_json::json!({ "attempt": ctx.attempt() }))
    }
}
