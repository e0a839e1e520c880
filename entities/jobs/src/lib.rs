//! The job system: background work as entity messages.
//!
//! A job type is a [`JobHandler`] registered in a [`JobRegistry`]. Every job is one `job`
//! entity (id [`JobId`], a uuid v7) whose persisted state is the job record; its attempts
//! run inside its persisted `run` message, so an attempt's outcome, the job's new status
//! and the next `run` (scheduled after the backoff as a timed message, never polled)
//! commit together with the message's completion. See docs/ARCHITECTURE.md
//! "Built-in entities → job".

mod attempt;
pub mod control;
pub mod cron;
pub mod diagnostic;
pub mod enqueue;
pub mod entity;
pub mod gauges;
pub mod handler;
pub mod key;
mod limit;
pub mod listing;
mod metrics;
pub mod record;
pub mod registry;
pub mod routes;
pub mod sweep;
pub mod webhook;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use enqueue::{Enqueued, JobCaller, JobRequest, enqueue};
pub use handler::{
    BackoffPolicy, JobContext, JobError, JobHandler, JobOptions, LimitKeyFn, Progress, RateLimit,
};
pub use record::{Attempt, AttemptOutcome, JobStatus, JobView};
pub use registry::{JobLimits, JobRegistry, JobRegistryError};

use std::sync::Arc;

use shoal::entity::{EntityRegistry, RegistryError};

/// The job types built into the binary (the diagnostic ones); `pool` is the database the
/// `diag.count` type writes to (none on a node that only validates payloads).
pub fn job_types(pool: Option<sqlx::PgPool>) -> Result<JobRegistry, JobRegistryError> {
    let mut types = JobRegistry::new();
    types
        .register(diagnostic::Flaky)?
        .register(diagnostic::Sleep)?
        .register(diagnostic::Noop)?
        .register(diagnostic::Limited)?
        .register(diagnostic::Rated)?
        .register(diagnostic::Count::new(pool))?;
    Ok(types)
}

/// The application's `[jobs]` section (`SHOAL__JOBS__…` in the environment).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct JobsConfig {
    /// How long a finished job (and its key) is kept before it is pruned. Default 7 days.
    #[serde(with = "humantime_serde")]
    pub retention: std::time::Duration,
    /// How often the leading runner counts waiting and dead jobs for `shoal_jobs`
    /// (see [`gauges`]). Default 15 s.
    #[serde(with = "humantime_serde")]
    pub gauge_interval: std::time::Duration,
    /// How often the leading runner prunes jobs past the retention and deletes the emptied
    /// rows of pruned jobs and released keys (see [`sweep`]). Default 5 min.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: std::time::Duration,
    /// The most `max_attempts` a job may ask for (`POST /jobs` answers 400 beyond it).
    /// Default 100.
    pub max_attempts_limit: u32,
    /// The shortest `backoff.first_ms` a job may ask for (400 below it). Default `100ms`.
    #[serde(with = "humantime_serde")]
    pub min_backoff: std::time::Duration,
    /// `[jobs.webhook]`: the `webhook` type, offered when it has signing secrets.
    pub webhook: crate::webhook::job::WebhookConfig,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            retention: std::time::Duration::from_secs(7 * 24 * 3600),
            gauge_interval: std::time::Duration::from_secs(15),
            sweep_interval: std::time::Duration::from_secs(300),
            max_attempts_limit: JobLimits::default().max_attempts,
            min_backoff: JobLimits::default().min_backoff,
            webhook: crate::webhook::job::WebhookConfig::default(),
        }
    }
}

impl JobsConfig {
    /// The limits on what one job may ask for.
    pub fn limits(&self) -> JobLimits {
        JobLimits {
            max_attempts: self.max_attempts_limit.max(1),
            min_backoff: self.min_backoff,
        }
    }
}

/// Registers the job system's entity types (`job`, `job-control`, `job-key`, `job-cron`)
/// over `types`;
/// concurrency-limited types take their leases on `redis`.
pub fn register(
    registry: &mut EntityRegistry,
    types: Arc<JobRegistry>,
    redis: Option<shoal::redis::RedisClient>,
) -> Result<(), RegistryError> {
    let running = control::RunningAttempts::default();
    registry
        .register(entity::Job::new(types, running.clone(), redis))?
        .register_concurrent(control::JobControl::new(running))?
        .register(key::JobKey)?
        .register(cron::JobCron)?;
    Ok(())
}

/// A job's id: a uuid v7 (time-ordered), also the `job` entity's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(uuid::Uuid);

impl JobId {
    /// What a job id is: a uuid in its hyphenated form.
    pub const PATTERN: &'static str =
        "^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$";

    /// A fresh id (uuid v7).
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7())
    }

    /// The uuid.
    pub fn as_uuid(&self) -> uuid::Uuid {
        self.0
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// A job id that is not a uuid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a job id (a uuid)")]
pub struct BadJobId(String);

impl FromStr for JobId {
    type Err = BadJobId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // 36 characters: only the hyphenated form (not braced, simple or urn).
        (s.len() == 36)
            .then(|| uuid::Uuid::parse_str(s).ok())
            .flatten()
            .map(Self)
            .ok_or_else(|| BadJobId(s.to_owned()))
    }
}
