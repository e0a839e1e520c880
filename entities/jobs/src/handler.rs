//! The contract a job type implements: [`JobHandler`], its [`JobOptions`], the
//! [`JobError`] an attempt fails with and the [`JobContext`] it runs with.
//!
//! A handler is plain async Rust: it gets its decoded payload and a context, and returns
//! an output (stored as the job's result) or an error saying whether another attempt may
//! help. An attempt runs at least once per recorded attempt (a runner killed mid-attempt
//! leaves the attempt unrecorded, and the next owner runs it again), so a handler's side
//! effects should be idempotent under [`JobContext::job_id`] and [`JobContext::attempt`].

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use super::JobId;

/// How long a handler has to return once its token trips.
pub const GRACE: Duration = Duration::from_secs(2);

/// A job type: its name, its payload, its output and how one attempt runs.
pub trait JobHandler: Send + Sync + 'static {
    /// The type's name (letters, digits, `-`, `_`, `.`; validated at registration).
    const TYPE: &'static str;
    /// What a job of this type carries; `POST /jobs` decodes it at the gateway.
    type Payload: Serialize + DeserializeOwned + Send + 'static;
    /// What a successful attempt returns (stored as the job's result).
    type Output: Serialize + Send + 'static;

    /// The type's defaults (a job may override `max_attempts` and `timeout`).
    fn options(&self) -> JobOptions {
        JobOptions::default()
    }

    /// Checks a decoded payload at enqueue beyond its decoding (for example against the
    /// node's configuration); the error names the field. Default: nothing more.
    fn check(&self, payload: &Self::Payload) -> Result<(), String> {
        let _ = payload;
        Ok(())
    }

    /// Runs one attempt. It is cancelled (the future dropped) past the timeout; a handler
    /// that cleans up on cancellation awaits [`JobContext::cancelled`] in a `select!`.
    fn run(
        &self,
        ctx: &JobContext,
        payload: Self::Payload,
    ) -> impl Future<Output = Result<Self::Output, JobError>> + Send;
}

/// How long to wait between attempts: `first × 2^(attempt−1)`, at most `max`, drawn from
/// `[d, 1.5 d]` with `jitter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// The wait after the first failed attempt.
    pub first: Duration,
    /// The longest wait.
    pub max: Duration,
    /// Whether each wait is stretched by a random share of up to half of it.
    pub jitter: bool,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            first: Duration::from_secs(1),
            max: Duration::from_secs(300),
            jitter: true,
        }
    }
}

impl BackoffPolicy {
    /// The wait after failed attempt number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        let delay = shoal::backoff::Backoff::nth(self.first, doublings, 31).min(self.max);
        if self.jitter {
            shoal::backoff::jittered(delay)
        } else {
            delay
        }
    }
}

/// Picks the key a type's limits apply per from a job's payload (for example the
/// endpoint or the tenant).
pub type LimitKeyFn = fn(&serde_json::Value) -> Option<String>;

/// At most `limit` attempts of a type (per limit key) may start in any window of `per`,
/// across the cluster (the shared Redis sliding window).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Starts allowed per window (at least 1).
    pub limit: u32,
    /// The window.
    pub per: Duration,
}

/// A job type's defaults.
#[derive(Debug, Clone, Copy)]
pub struct JobOptions {
    /// Attempts before the job is dead (at least 1). Default 5.
    pub max_attempts: u32,
    /// Waits between attempts.
    pub backoff: BackoffPolicy,
    /// Longest one attempt may run; past it the attempt is cancelled and fails as
    /// retryable. Default 60 s.
    pub timeout: Duration,
    /// Attempts of this type running at once across the cluster (`None`: no limit).
    pub concurrency: Option<u32>,
    /// Attempts of this type starting per window across the cluster (`None`: no limit).
    pub rate: Option<RateLimit>,
    /// With `concurrency` or `rate`, the limits apply per key taken from the payload (a
    /// payload it finds no key in shares the key `*`).
    pub limit_key: Option<LimitKeyFn>,
}

impl Default for JobOptions {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            backoff: BackoffPolicy::default(),
            timeout: Duration::from_secs(60),
            concurrency: None,
            rate: None,
            limit_key: None,
        }
    }
}

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// Another attempt may succeed (after `after`, if given, else after the backoff).
    #[error("retryable: {message}")]
    Retryable {
        /// What happened.
        message: String,
        /// The wait the failure asks for (for example a `Retry-After`).
        after: Option<Duration>,
    },
    /// No attempt will succeed: the job is dead at once.
    #[error("permanent: {message}")]
    Permanent {
        /// What happened.
        message: String,
    },
}

impl JobError {
    /// A retryable failure after the usual backoff.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self::Retryable {
            message: message.into(),
            after: None,
        }
    }

    /// A permanent failure.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::Permanent {
            message: message.into(),
        }
    }
}

/// Live progress of a running attempt.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Progress {
    /// 0–100.
    pub percent: u8,
    /// A short message.
    pub message: String,
}

/// What an attempt records beside its outcome.
#[derive(Debug, Default)]
pub(crate) struct AttemptSink {
    pub(crate) progress: Option<Progress>,
    pub(crate) notes: Vec<serde_json::Value>,
}

/// Most notes one attempt keeps (later ones are dropped).
pub(crate) const MAX_NOTES: usize = 32;
/// Longest progress message kept, in bytes.
pub(crate) const MAX_PROGRESS_MESSAGE: usize = 200;

/// What a running attempt knows and reports through.
#[derive(Debug, Clone)]
pub struct JobContext {
    job_id: JobId,
    attempt: u32,
    tenant: Option<Arc<str>>,
    cancel: CancellationToken,
    sink: Arc<Mutex<AttemptSink>>,
}

impl JobContext {
    pub(crate) fn new(
        job_id: JobId,
        attempt: u32,
        cancel: CancellationToken,
        sink: Arc<Mutex<AttemptSink>>,
    ) -> Self {
        Self {
            job_id,
            attempt,
            tenant: None,
            cancel,
            sink,
        }
    }

    /// This context for a job of `tenant`.
    pub fn with_tenant(mut self, tenant: Option<&str>) -> Self {
        self.tenant = tenant.map(Arc::from);
        self
    }

    /// The job's tenant, if it has one.
    pub fn tenant(&self) -> Option<&str> {
        self.tenant.as_deref()
    }

    /// A context outside any cluster, and the token that cancels it: for handler tests.
    pub fn new_for_test(job_id: JobId, attempt: u32) -> (Self, CancellationToken) {
        let cancel = CancellationToken::new();
        let ctx = Self::new(job_id, attempt, cancel.clone(), Arc::default());
        (ctx, cancel)
    }

    /// The job.
    pub fn job_id(&self) -> JobId {
        self.job_id
    }

    /// This attempt's number (1-based).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Resolves when the attempt is cancelled (a cancel request or the timeout).
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    /// Whether the attempt was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Reports progress (`GET /jobs/{id}` shows the latest while the attempt runs, and the
    /// job keeps the last one). `percent` is capped at 100, the message at 200 bytes.
    pub fn progress(&self, percent: u8, message: impl Into<String>) {
        let mut message: String = message.into();
        truncate(&mut message, MAX_PROGRESS_MESSAGE);
        lock(&self.sink).progress = Some(Progress {
            percent: percent.min(100),
            message,
        });
    }

    /// Records `detail` in this attempt's history entry (at most 32 per attempt).
    pub fn note(&self, detail: serde_json::Value) {
        let mut sink = lock(&self.sink);
        if sink.notes.len() < MAX_NOTES {
            sink.notes.push(detail);
        }
    }

    /// The latest progress reported.
    pub(crate) fn current_progress(&self) -> Option<Progress> {
        lock(&self.sink).progress.clone()
    }

    /// The notes recorded so far (taken: the attempt is over).
    pub(crate) fn take_notes(&self) -> Vec<serde_json::Value> {
        std::mem::take(&mut lock(&self.sink).notes)
    }
}

fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Never held across an await.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter_within_half() {
        let policy = BackoffPolicy {
            first: Duration::from_secs(1),
            max: Duration::from_secs(4),
            jitter: true,
        };
        for (attempt, base) in [(1, 1), (2, 2), (3, 4), (4, 4), (40, 4)] {
            let delay = policy.delay(attempt);
            let base = Duration::from_secs(base);
            assert!(
                delay >= base && delay <= base * 3 / 2,
                "{attempt}: {delay:?}"
            );
        }
    }

    #[test]
    fn a_test_context_reports_cancellation_progress_and_notes() {
        let (ctx, cancel) = JobContext::new_for_test(JobId::new(), 2);
        assert_eq!(ctx.attempt(), 2);
        assert!(!ctx.is_cancelled());
        ctx.progress(250, "x".repeat(500));
        let progress = ctx.current_progress().unwrap_or_default();
        assert_eq!(
            (progress.percent, progress.message.len()),
            (100, MAX_PROGRESS_MESSAGE)
        );
        for n in 0..40 {
            ctx.note(serde_json::json!(n));
        }
        assert_eq!(ctx.take_notes().len(), MAX_NOTES);
        cancel.cancel();
        assert!(ctx.is_cancelled());
    }
}
