//! The `job` entity: one per job id, its state the [`JobView`] record, kept in Postgres.
//!
//! - `enqueue` (persisted, keyed `enqueue`) records the job and schedules `run {attempt 1}`
//!   at `run_at`. A second `enqueue` of the same id replies with the job as it is.
//! - `run {attempt, generation}` (persisted, scheduled) runs the attempt inside the handler,
//!   under the timeout and a cancellation token registered with the runner-local
//!   [`RunningAttempts`] (which `job-control` reaches). Its outcome, the new status and the
//!   next `run` commit together with the message's completion (the outbox), so a runner
//!   killed mid-attempt leaves `run` unprocessed and the next owner runs the attempt again:
//!   at-least-once attempts, exactly-once state. A `run` whose attempt or generation does
//!   not match the record is stale (an earlier schedule, or one before a retry or cancel)
//!   and does nothing.
//! - `retry` gives a dead or cancelled job a fresh attempt budget and runs it now; `cancel`
//!   cancels a job that is not running (a running attempt is cancelled through
//!   `job-control`); `get` (volatile) reads the record.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shoal::client::Request;
use shoal::entity::{Entity, EntityContext, EntityOptions, EntityProtocol, HandlerError};
use shoal::ids::{EntityAddress, EntityId, EntityType};
use shoal::redis::RedisClient;
use utoipa::ToSchema;

use shoal_notifications::entity::{NewEvent, Notification, NotificationMessage};

use super::attempt;
use super::control::RunningAttempts;
use super::limit::{self, Gate};
use super::record::AttemptEnd;
pub use super::record::JobBackoff;
use super::record::{Attempt, AttemptOutcome, JOB_ENTITY, JobStatus, JobView};
use super::registry::JobRegistry;

/// The job entity type.
#[derive(Debug, Clone)]
pub struct Job {
    pub(crate) registry: Arc<JobRegistry>,
    pub(crate) running: RunningAttempts,
    /// For concurrency leases (a limited type waits without it).
    pub(crate) redis: Option<RedisClient>,
}

impl Job {
    /// A job entity over `registry`'s types, sharing `running` with `job-control`, taking
    /// concurrency leases on `redis`.
    pub fn new(
        registry: Arc<JobRegistry>,
        running: RunningAttempts,
        redis: Option<RedisClient>,
    ) -> Self {
        Self {
            registry,
            running,
            redis,
        }
    }
}

/// What a new job asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewJob {
    /// The job type.
    #[serde(rename = "type")]
    pub job_type: String,
    /// Its payload (decoded against the type's payload at the gateway).
    pub payload: serde_json::Value,
    /// The unique key, if any: 1–255 characters, none a control character (the
    /// `Idempotency-Key` header's rule).
    #[serde(default)]
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]+$"
    )]
    pub key: Option<String>,
    /// Not before this.
    #[serde(default)]
    pub run_at: Option<DateTime<Utc>>,
    /// Attempts allowed (default: the type's).
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// One attempt's timeout, milliseconds (default: the type's).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// The waits between attempts (default: the type's).
    #[serde(default, deserialize_with = "shoal::gateway::object_only")]
    pub backoff: Option<JobBackoff>,
    /// 0 (first, the default) to 9 (last): how soon a job its type's limits made wait asks
    /// again, so under contention higher-priority jobs take the freed slots first.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 9)]
    pub priority: Option<u8>,
    /// The tenant whose notification stream gets the job's changes (topic `job`). `POST
    /// /jobs` sets it from `X-Tenant-Id` (from the token when auth is on); a body that
    /// names one is refused.
    #[serde(default)]
    pub tenant: Option<String>,
}

/// The idempotency key of a job's `enqueue` message: one per job id.
pub const ENQUEUE_KEY: &str = "enqueue";

/// The lowest priority.
pub const LOWEST_PRIORITY: u8 = 9;

/// A job's messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum JobMessage {
    /// Records the job and schedules its first attempt.
    Enqueue(NewJob),
    /// Runs attempt `attempt` of generation `generation`.
    Run {
        /// 1-based, counted over the whole history.
        attempt: u32,
        /// The record's generation when it was scheduled.
        generation: u32,
    },
    /// A dead or cancelled job runs again with a fresh attempt budget.
    Retry {},
    /// Cancels a job that is not running.
    Cancel {},
    /// Forgets a job finished in generation `generation` (sent by the `shoal-job-sweeper`
    /// singleton `[jobs] retention` after it finished, module `sweep`): its key is released
    /// and its record emptied (then `GET` is a 404).
    Prune {
        /// The generation that finished.
        generation: u32,
    },
    /// Reads the record.
    Get {},
}

impl EntityProtocol for Job {
    const NAME: &'static str = JOB_ENTITY;
    type Message = JobMessage;
    type Reply = JobView;

    fn is_persisted(message: &JobMessage) -> bool {
        !matches!(message, JobMessage::Get {})
    }

    fn idempotency_key(message: &JobMessage) -> Option<String> {
        matches!(message, JobMessage::Enqueue(_)).then(|| ENQUEUE_KEY.to_owned())
    }

    fn options(&self) -> EntityOptions {
        EntityOptions {
            max_idle: Duration::from_secs(30),
            ..EntityOptions::default()
        }
    }
}

impl Entity for Job {
    type State = JobView;
    const PERSIST_STATE: bool = true;

    async fn handle(
        &self,
        ctx: &EntityContext,
        state: &mut JobView,
        message: JobMessage,
    ) -> Result<JobView, HandlerError> {
        let mut before = (state.status, state.attempts_made(), state.generation);
        match message {
            JobMessage::Enqueue(new) => {
                let recorded = state.status == JobStatus::New;
                if recorded {
                    self.enqueue(ctx, state, new).await?;
                    publish_if_changed(ctx, state, &mut before).await;
                }
                if state.status == JobStatus::Queued && state.attempts_made() == 0 {
                    // Due now: the first attempt runs in this handling and commits with the
                    // enqueue (one message per job). A redelivery after a crash finds the
                    // job queued (from its checkpoint, or new again) and runs it.
                    let generation = state.generation;
                    self.run(ctx, state, 1, generation, recorded).await?;
                }
            }
            JobMessage::Prune { generation } => prune(ctx, state, generation).await?,
            JobMessage::Run {
                attempt,
                generation,
            } => self.run(ctx, state, attempt, generation, false).await?,
            JobMessage::Retry {} => retry(ctx, state).await?,
            JobMessage::Cancel {} => cancel(state),
            JobMessage::Get {} => {}
        }
        publish_if_changed(ctx, state, &mut before).await;
        Ok(state.clone())
    }
}

/// The record's status, attempt count and generation: what a published change is.
type Change = (JobStatus, u32, u32);

/// Publishes the job's change if it changed since `before` (then `before` is now).
async fn publish_if_changed(ctx: &EntityContext, state: &JobView, before: &mut Change) {
    let now = (state.status, state.attempts_made(), state.generation);
    if now != *before && state.status != JobStatus::New {
        publish_change(ctx, state).await;
    }
    *before = now;
}

/// The record of job `id` that `enqueue` (stored as message `message`) makes at `now`,
/// with the type's defaults and the operator's limits; `None` for a type `registry` does
/// not have. Also what `GET /jobs/{id}` shows of a stored `enqueue` not run yet.
pub(crate) fn recorded(
    registry: &JobRegistry,
    id: &str,
    new: NewJob,
    message: Option<shoal::ids::MessageId>,
    now: DateTime<Utc>,
) -> Option<JobView> {
    let options = registry.get(&new.job_type)?.options();
    let limits = registry.limits();
    // Created when its sender stored it (the message id's instant), not when it ran.
    let created_at = message
        .and_then(shoal::snowflake::created_at)
        .map_or(now, |at| at.min(now));
    let run_at = new.run_at.unwrap_or(created_at).max(created_at);
    Some(JobView {
        id: id.to_owned(),
        job_type: new.job_type,
        payload: new.payload,
        key: new.key,
        status: if run_at > now {
            JobStatus::Scheduled
        } else {
            JobStatus::Queued
        },
        // `POST /jobs` refuses more; a job enqueued from Rust is held to the same.
        max_attempts: new
            .max_attempts
            .map_or(options.max_attempts, |n| n.min(limits.max_attempts))
            .max(1),
        timeout_ms: new
            .timeout_ms
            .unwrap_or(options.timeout.as_millis() as u64)
            .max(1),
        backoff: new.backoff.map(|own| own.at_least(limits.min_backoff)),
        priority: new.priority.unwrap_or(0).min(LOWEST_PRIORITY),
        tenant: new.tenant,
        run_at: Some(run_at),
        next_run_at: Some(run_at),
        created_at: Some(created_at),
        updated_at: Some(now),
        ..JobView::default()
    })
}

/// Publishes the job's change to its tenant's stream (topic `job`), if it has a tenant:
/// a send through the handler's context, so it rides on the completion (the outbox) and
/// the stream shows each committed change once, in order. A send that cannot be made
/// (a tenant id the entity id rules refuse) is logged; it never fails the job.
async fn publish_change(ctx: &EntityContext, state: &JobView) {
    let Some(tenant) = &state.tenant else {
        return;
    };
    let last = state.attempts.last();
    let event = NewEvent {
        topic: JOB_TOPIC.to_owned(),
        data: serde_json::json!({
            "id": state.id,
            "type": state.job_type,
            "status": state.status,
            "attempts": state.attempts_made(),
            "outcome": last.map(|a| a.outcome),
            "error": last.and_then(|a| a.error.clone()),
        }),
    };
    let sent = ctx
        .entity::<Notification>(tenant.as_str())
        .send(NotificationMessage::Publish(event))
        .await;
    if let Err(error) = sent {
        tracing::warn!(job = %state.id, %tenant, %error, "could not publish the job's change");
    }
}

/// The topic of job changes on a tenant's stream.
pub const JOB_TOPIC: &str = "job";

impl Job {
    async fn enqueue(
        &self,
        ctx: &EntityContext,
        state: &mut JobView,
        new: NewJob,
    ) -> Result<(), HandlerError> {
        if state.status != JobStatus::New {
            return Ok(());
        }
        let now = Utc::now();
        let id = ctx.address.entity_id.as_str();
        let unknown = format!("no job type `{}`", new.job_type);
        *state = recorded(&self.registry, id, new, ctx.message_id, now)
            .ok_or_else(|| HandlerError::permanent("unknown_type", unknown))?;
        let run_at = state.run_at.unwrap_or(now);
        if run_at > now {
            return schedule_run(ctx, state, run_at).await;
        }
        Ok(())
    }

    async fn run(
        &self,
        ctx: &EntityContext,
        state: &mut JobView,
        attempt: u32,
        generation: u32,
        unsaved: bool,
    ) -> Result<(), HandlerError> {
        let expected = state.attempts_made() + 1;
        if state.status.is_finished() || generation != state.generation || attempt != expected {
            return Ok(());
        }
        let Some(handler) = self.registry.get(&state.job_type).cloned() else {
            // The type is not deployed on this runner: wait for it, as messages do.
            return Err(HandlerError::retryable(
                "unknown_type",
                format!("job type `{}` is not registered here", state.job_type),
            ));
        };
        let timeout = Duration::from_millis(state.timeout_ms);
        let options = handler.options();
        let redis = self.redis.as_ref();
        let lease =
            match limit::admit(redis, &state.job_type, &options, &state.payload, timeout).await {
                Gate::Open(lease) => lease,
                Gate::Wait { after, reason } => {
                    let after = limit::by_priority(after, state.priority);
                    state.waiting = Some(reason);
                    state.updated_at = Some(Utc::now());
                    let at = Utc::now() + chrono::Duration::from_std(after).unwrap_or_default();
                    return schedule_run(ctx, state, at).await;
                }
            };
        let started_at = Utc::now();
        let work = attempt::run(&handler, &self.running, state, attempt);
        let end = if unsaved {
            // A record not stored yet is stored if the attempt outlasts CHECKPOINT_AFTER,
            // so listings show a long first attempt's job while it runs.
            let saved = checkpoint(ctx, state);
            attempt::with_checkpoint(work, saved, CHECKPOINT_AFTER).await
        } else {
            work.await
        };
        let ended_at = Utc::now();
        if let Some(lease) = lease {
            // A failed release expires with the lease TTL.
            let _ = lease.release().await;
        }
        state.waiting = None;
        super::metrics::attempt_finished(&state.job_type, started_at, ended_at, &end);
        self.record(ctx, state, attempt, started_at, ended_at, end, &handler)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn record(
        &self,
        ctx: &EntityContext,
        state: &mut JobView,
        number: u32,
        started_at: DateTime<Utc>,
        ended_at: DateTime<Utc>,
        end: AttemptEnd,
        handler: &Arc<dyn super::registry::ErasedJob>,
    ) -> Result<(), HandlerError> {
        state.updated_at = Some(ended_at);
        state.progress = end.progress.clone().or(state.progress.take());
        state.push_attempt(Attempt {
            number,
            started_at,
            ended_at,
            outcome: end.outcome,
            error: end.error.clone(),
            notes: end.notes,
        });
        match end.outcome {
            AttemptOutcome::Succeeded => {
                state.result = end.output;
                finish(state, JobStatus::Succeeded, None);
            }
            AttemptOutcome::Cancelled => finish(state, JobStatus::Cancelled, end.error),
            AttemptOutcome::FailedPermanently => finish(state, JobStatus::Dead, end.error),
            AttemptOutcome::Failed | AttemptOutcome::TimedOut => {
                if state.budget_used() >= state.max_attempts {
                    finish(state, JobStatus::Dead, end.error);
                } else {
                    let budget = state.budget_used();
                    let policy = match state.backoff {
                        Some(own) => super::BackoffPolicy {
                            first: Duration::from_millis(own.first_ms),
                            max: Duration::from_millis(own.max_ms),
                            jitter: true,
                        },
                        None => handler.options().backoff,
                    };
                    let delay = end.retry_after.unwrap_or_else(|| policy.delay(budget));
                    state.status = JobStatus::Retrying;
                    state.waiting = end.error;
                    let at = ended_at + chrono::Duration::from_std(delay).unwrap_or_default();
                    schedule_run(ctx, state, at).await?;
                }
            }
        }
        Ok(())
    }
}

fn finish(state: &mut JobView, status: JobStatus, error: Option<String>) {
    state.status = status;
    state.waiting = error;
    state.next_run_at = None;
    state.finished_at = state.updated_at;
    super::metrics::job_finished(&state.job_type, status);
}

async fn retry(ctx: &EntityContext, state: &mut JobView) -> Result<(), HandlerError> {
    if !matches!(state.status, JobStatus::Dead | JobStatus::Cancelled) {
        return Err(HandlerError::permanent(
            "not_retryable",
            format!(
                "only a dead or cancelled job can be retried; this one is {:?}",
                state.status
            ),
        ));
    }
    let now = Utc::now();
    state.generation += 1;
    state.budget_start = state.attempts_made();
    state.status = JobStatus::Queued;
    state.finished_at = None;
    state.result = None;
    state.updated_at = Some(now);
    schedule_run(ctx, state, now).await
}

async fn prune(
    ctx: &EntityContext,
    state: &mut JobView,
    generation: u32,
) -> Result<(), HandlerError> {
    if !state.status.is_finished() || state.generation != generation {
        return Ok(()); // retried since: a later finish schedules its own prune
    }
    if let Some(key) = &state.key {
        let address = EntityAddress {
            entity_type: EntityType::new(super::key::JobKey::NAME)
                .map_err(|e| HandlerError::permanent("bad_type", e.to_string()))?,
            entity_id: EntityId::new(super::key::key_entity_id(
                state.tenant.as_deref(),
                &state.job_type,
                key,
            ))
            .map_err(|e| HandlerError::permanent("bad_key", e.to_string()))?,
        };
        let body = serde_json::json!({ "job_id": state.id });
        ctx.send(Request::persisted(address, "release", body))
            .await
            .map_err(|e| HandlerError::retryable("send_failed", e.to_string()))?;
    }
    super::metrics::job_pruned(&state.job_type);
    *state = JobView::default();
    Ok(())
}

fn cancel(state: &mut JobView) {
    if state.status == JobStatus::New || state.status.is_finished() {
        return;
    }
    state.generation += 1;
    state.updated_at = Some(Utc::now());
    finish(state, JobStatus::Cancelled, Some("cancelled".to_owned()));
}

/// How long a first attempt run with its enqueue may take before its record is stored
/// ahead of the completion: a fast job costs no write of its own for it.
pub const CHECKPOINT_AFTER: Duration = Duration::from_millis(200);

/// Stores the record as it is (queued) while its first attempt runs. A failure is logged:
/// the completion stores the record in any case, and a fenced write means the shard
/// moved, which the completion reports.
async fn checkpoint(ctx: &EntityContext, state: &JobView) {
    if let Err(error) = ctx.checkpoint(state).await {
        tracing::warn!(job = %state.id, %error, "could not store the record ahead of its first attempt");
    }
}

/// Schedules the next attempt of `state` for `at` (in the completion's outbox).
async fn schedule_run(
    ctx: &EntityContext,
    state: &mut JobView,
    at: DateTime<Utc>,
) -> Result<(), HandlerError> {
    state.next_run_at = Some(at);
    let body = serde_json::json!({
        "attempt": state.attempts_made() + 1,
        "generation": state.generation,
    });
    let request = Request::persisted(ctx.address.clone(), "run", body);
    ctx.schedule(request, at)
        .await
        .map_err(|e| HandlerError::retryable("schedule_failed", e.to_string()))?;
    Ok(())
}

/// The `job` entity with id `id`.
pub fn address(id: &str) -> Result<EntityAddress, shoal::ids::IdError> {
    Ok(EntityAddress {
        entity_type: EntityType::new(Job::NAME)?,
        entity_id: EntityId::new(id)?,
    })
}
