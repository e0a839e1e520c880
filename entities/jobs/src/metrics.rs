//! The job system's metrics (exported with the runner's on `/metrics`):
//!
//! - `shoal_job_attempts_total{type, outcome}` and `shoal_job_attempt_seconds{type}`: every
//!   attempt and how long it ran.
//! - `shoal_jobs_finished_total{type, status}`: jobs reaching `succeeded`, `dead` (the dead
//!   letters) or `cancelled`.
//! - `shoal_job_queue_lag_seconds{type}`: start time − due time of each attempt.
//! - `shoal_jobs_pruned_total{type}`: finished jobs forgotten after the retention.

use chrono::{DateTime, Utc};

use super::record::AttemptEnd;
use super::record::JobStatus;

/// An attempt ended.
pub(crate) fn attempt_finished(
    job_type: &str,
    started: DateTime<Utc>,
    ended: DateTime<Utc>,
    end: &AttemptEnd,
) {
    let outcome = serde_json::to_value(end.outcome)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let seconds = (ended - started).num_microseconds().unwrap_or(0) as f64 / 1e6;
    metrics::counter!("shoal_job_attempts_total", "type" => job_type.to_owned(), "outcome" => outcome)
        .increment(1);
    metrics::histogram!("shoal_job_attempt_seconds", "type" => job_type.to_owned()).record(seconds);
}

/// An attempt started `lag` after it was due.
pub(crate) fn attempt_started(job_type: &str, due: Option<DateTime<Utc>>, started: DateTime<Utc>) {
    if let Some(due) = due {
        let lag = (started - due).num_milliseconds().max(0) as f64 / 1e3;
        metrics::histogram!("shoal_job_queue_lag_seconds", "type" => job_type.to_owned())
            .record(lag);
    }
}

/// A job finished with `status`.
pub(crate) fn job_finished(job_type: &str, status: JobStatus) {
    let status = match status {
        JobStatus::Succeeded => "succeeded",
        JobStatus::Dead => "dead",
        JobStatus::Cancelled => "cancelled",
        _ => return,
    };
    metrics::counter!("shoal_jobs_finished_total", "type" => job_type.to_owned(), "status" => status)
        .increment(1);
}

/// A finished job was pruned.
pub(crate) fn job_pruned(job_type: &str) {
    metrics::counter!("shoal_jobs_pruned_total", "type" => job_type.to_owned()).increment(1);
}
