//! Running one attempt: the handler's future under the job's timeout and a cancellation
//! token registered in [`RunningAttempts`], so a cancel request reaches it.
//!
//! Past the timeout, or when cancelled, the token trips first and the handler gets
//! [`crate::handler::GRACE`] to observe it and return; then its future is dropped, so nothing of it runs
//! on. A timed-out attempt fails as retryable; a cancelled one cancels the job.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::JobId;
use super::control::RunningAttempts;
use super::handler::{AttemptSink, GRACE, JobContext, JobError};
use super::record::{AttemptEnd, AttemptOutcome, JobStatus, JobView};
use super::registry::ErasedJob;

enum Stop {
    Timeout,
    Cancel,
}

/// Awaits `work`; if it is still running after `after`, runs `save` beside it and awaits
/// both, so what `save` writes is written before the caller goes on with `work`'s result.
pub(crate) async fn with_checkpoint<T>(
    work: impl Future<Output = T>,
    save: impl Future<Output = ()>,
    after: Duration,
) -> T {
    tokio::pin!(work);
    tokio::select! {
        done = &mut work => return done,
        () = tokio::time::sleep(after) => {}
    }
    let (done, ()) = tokio::join!(work, save);
    done
}

/// Runs attempt `number` of the job in `state`.
pub(crate) async fn run(
    handler: &Arc<dyn ErasedJob>,
    running: &RunningAttempts,
    state: &JobView,
    number: u32,
) -> AttemptEnd {
    let job_id: JobId = state.id.parse().unwrap_or_default();
    let cancel = CancellationToken::new();
    let ctx = JobContext::new(
        job_id,
        number,
        cancel.clone(),
        Arc::new(Mutex::new(AttemptSink::default())),
    )
    .with_tenant(state.tenant.as_deref());
    let mut live = state.clone();
    live.status = JobStatus::Running;
    let started = Utc::now();
    super::metrics::attempt_started(&state.job_type, state.next_run_at, started);
    let _guard = running.start(&state.id, cancel.clone(), ctx.clone(), live);
    let timeout = Duration::from_millis(state.timeout_ms);
    let work = handler.run(&ctx, state.payload.clone());
    tokio::pin!(work);
    let stop = tokio::select! {
        result = &mut work => return ended(&ctx, result, cancel.is_cancelled()),
        () = tokio::time::sleep(timeout) => Stop::Timeout,
        () = cancel.cancelled() => Stop::Cancel,
    };
    cancel.cancel();
    // The handler's late result is ignored: the attempt is over either way; awaiting it
    // lets it observe the cancellation and record notes.
    let _ = tokio::time::timeout(GRACE, &mut work).await;
    let (outcome, error) = match stop {
        Stop::Timeout => (
            AttemptOutcome::TimedOut,
            format!("timed out after {} ms", state.timeout_ms),
        ),
        Stop::Cancel => (AttemptOutcome::Cancelled, "cancelled".to_owned()),
    };
    AttemptEnd {
        outcome,
        output: None,
        error: Some(error),
        retry_after: None,
        notes: ctx.take_notes(),
        progress: ctx.current_progress(),
    }
}

/// The handler returned. A failure after a cancel request (the handler saw the token and
/// stopped) is the cancellation, not a failure.
fn ended(
    ctx: &JobContext,
    result: Result<serde_json::Value, JobError>,
    cancelled: bool,
) -> AttemptEnd {
    let (outcome, output, error, retry_after) = match result {
        Ok(output) => (AttemptOutcome::Succeeded, Some(output), None, None),
        Err(_) if cancelled => (
            AttemptOutcome::Cancelled,
            None,
            Some("cancelled".to_owned()),
            None,
        ),
        Err(JobError::Retryable { message, after }) => {
            (AttemptOutcome::Failed, None, Some(message), after)
        }
        Err(JobError::Permanent { message }) => {
            (AttemptOutcome::FailedPermanently, None, Some(message), None)
        }
    };
    AttemptEnd {
        outcome,
        output,
        error,
        retry_after,
        notes: ctx.take_notes(),
        progress: ctx.current_progress(),
    }
}
