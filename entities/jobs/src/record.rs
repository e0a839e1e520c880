//! The job record: the `job` entity's persisted state, and the view of it callers get.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::handler::Progress;

/// Attempts a job record keeps: the latest ones (older ones are dropped; the count stays in
/// [`JobView::attempt_count`]), so a record cannot grow without bound.
pub const ATTEMPT_HISTORY: usize = 20;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Not enqueued (an entity that never got `enqueue`).
    #[default]
    New,
    /// Waiting for its `run_at`.
    Scheduled,
    /// Due, waiting to start.
    Queued,
    /// An attempt is running (seen only through the live view).
    Running,
    /// An attempt failed; the next one is scheduled after the backoff.
    Retrying,
    /// An attempt succeeded.
    Succeeded,
    /// Out of attempts, or failed permanently.
    Dead,
    /// Cancelled.
    Cancelled,
}

impl JobStatus {
    /// Whether the job is over (no attempt is scheduled).
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Dead | Self::Cancelled)
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// The handler returned its output.
    Succeeded,
    /// A retryable failure.
    Failed,
    /// A permanent failure.
    FailedPermanently,
    /// Past the timeout; cancelled.
    TimedOut,
    /// Cancelled by a cancel request.
    Cancelled,
}

/// One attempt's history entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Attempt {
    /// 1-based.
    pub number: u32,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub ended_at: DateTime<Utc>,
    /// How it ended.
    pub outcome: AttemptOutcome,
    /// The error, if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What the handler noted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<serde_json::Value>,
}

/// The job record (the `job` entity's state) and what `GET /jobs/{id}` shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    /// The job id.
    pub id: String,
    /// The job type.
    #[serde(rename = "type")]
    pub job_type: String,
    /// The payload.
    pub payload: serde_json::Value,
    /// The unique key, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The status.
    pub status: JobStatus,
    /// Attempts allowed in the current budget (a retry grants a fresh one).
    pub max_attempts: u32,
    /// Timeout of one attempt, milliseconds.
    pub timeout_ms: u64,
    /// The job's own backoff, if it has one (else the type's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<JobBackoff>,
    /// 0 (first) to 9 (last) when the type's limits make jobs wait.
    #[serde(default)]
    pub priority: u8,
    /// The tenant whose stream gets the job's changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The latest attempts (at most [`ATTEMPT_HISTORY`], oldest first).
    pub attempts: Vec<Attempt>,
    /// Attempts made so far, including those no longer in `attempts`.
    #[serde(default)]
    pub attempt_count: u32,
    /// Attempts made before the current budget (by earlier retries).
    pub budget_start: u32,
    /// The latest progress reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// The output of the successful attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Why the job waits or what the last failure was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// When the job was first due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_at: Option<DateTime<Utc>>,
    /// When the next attempt is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run_at: Option<DateTime<Utc>>,
    /// When it was enqueued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    /// Last change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// Bumped by retry and cancel, so a `run` scheduled before is recognised as stale.
    pub generation: u32,
}

impl JobView {
    /// Attempts made in the current budget.
    pub fn budget_used(&self) -> u32 {
        self.attempts_made().saturating_sub(self.budget_start)
    }

    /// Attempts made so far (a record written before `attempt_count` existed kept them all).
    pub fn attempts_made(&self) -> u32 {
        let last = self.attempts.last().map_or(0, |a| a.number);
        self.attempt_count.max(last)
    }

    /// Records a finished attempt, dropping the oldest beyond [`ATTEMPT_HISTORY`].
    pub(crate) fn push_attempt(&mut self, attempt: Attempt) {
        self.attempt_count = self.attempts_made().max(attempt.number);
        self.attempts.push(attempt);
        let over = self.attempts.len().saturating_sub(ATTEMPT_HISTORY);
        self.attempts.drain(..over);
    }
}

/// A job's own waits between attempts: `first_ms` doubling up to `max_ms`, with jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobBackoff {
    /// The wait after the first failed attempt, milliseconds.
    pub first_ms: u64,
    /// The longest wait, milliseconds.
    pub max_ms: u64,
}

impl JobBackoff {
    /// This backoff with waits of at least `min`.
    pub fn at_least(self, min: Duration) -> Self {
        let min_ms = u64::try_from(min.as_millis()).unwrap_or(u64::MAX);
        let first_ms = self.first_ms.max(min_ms);
        Self {
            first_ms,
            max_ms: self.max_ms.max(first_ms),
        }
    }
}

/// How an attempt ended, with what it reported.
#[derive(Debug)]
pub(crate) struct AttemptEnd {
    pub(crate) outcome: AttemptOutcome,
    pub(crate) output: Option<serde_json::Value>,
    pub(crate) error: Option<String>,
    pub(crate) retry_after: Option<Duration>,
    pub(crate) notes: Vec<serde_json::Value>,
    pub(crate) progress: Option<Progress>,
}

/// The name of the `job` entity type (also [`crate::entity::Job`]'s `NAME`).
pub const JOB_ENTITY: &str = "job";
