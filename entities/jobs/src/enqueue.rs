//! Enqueuing from Rust: [`enqueue`] does what `POST /jobs` does — claims the unique key
//! (if any) at `job-key`, then sends `enqueue` to the job — through any [`JobCaller`]: a
//! [`ShoalClient`] (any node) or a handler's [`EntityContext`]. From a handler of a
//! persisted message, a job without a key of its own gets one derived from the handling
//! ([`EntityContext::derive_key`]), so a replayed handler enqueues the same job, not a
//! second one. [`JobRequest::of`] builds the request from a handler type's typed payload.
//!
//! The payload is not checked against the registry here: a typed request is encoded from
//! the type's own payload, and an untyped one is checked by its caller (the gateway route
//! does); a job whose type no runner knows ends `dead` with `unknown_type`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shoal::client::{ClientError, EntityRef, ShoalClient};
use shoal::entity::{EntityContext, EntityProtocol};
use utoipa::ToSchema;

use super::JobId;
use super::entity::{Job, JobMessage, NewJob};
use super::handler::JobHandler;
use super::key::{JobKey, JobKeyMessage, key_entity_id};
use super::record::JobBackoff;

/// How long [`enqueue`] from a client waits for the job's first handling (a due job's
/// first attempt, or recording a later one) before it answers anyway.
pub const PACE: Duration = Duration::from_millis(250);

/// Who enqueues: a client, or a handler through its context.
pub trait JobCaller {
    /// A typed handle on entity `id` of type `E`, through this caller.
    fn entity_ref<E: EntityProtocol>(&self, id: &str) -> EntityRef<E>;

    /// A key for a job enqueued without one, if this caller can derive one that a replay
    /// derives again.
    fn derived_key(&self) -> Option<String>;
}

impl JobCaller for ShoalClient {
    fn entity_ref<E: EntityProtocol>(&self, id: &str) -> EntityRef<E> {
        self.entity::<E>(id)
    }

    fn derived_key(&self) -> Option<String> {
        None
    }
}

impl JobCaller for EntityContext {
    fn entity_ref<E: EntityProtocol>(&self, id: &str) -> EntityRef<E> {
        self.entity::<E>(id)
    }

    fn derived_key(&self) -> Option<String> {
        self.derive_key().map(|key| format!("ctx:{key}"))
    }
}

/// An enqueued job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Enqueued {
    /// The job's id (the existing job's, when its key was taken).
    pub id: String,
    /// Where its status is read.
    pub status_url: String,
}

/// A job to enqueue, built from a handler type's payload.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRequest(NewJob);

impl JobRequest {
    /// A job of type `H` carrying `payload` (with the type's defaults).
    pub fn of<H: JobHandler>(payload: &H::Payload) -> Result<Self, ClientError> {
        let payload = serde_json::to_value(payload)
            .map_err(|e| ClientError::InvalidRequest(format!("payload of `{}`: {e}", H::TYPE)))?;
        Ok(Self(NewJob {
            job_type: H::TYPE.to_owned(),
            payload,
            key: None,
            run_at: None,
            max_attempts: None,
            timeout_ms: None,
            backoff: None,
            priority: None,
            tenant: None,
        }))
    }

    /// The unique key: enqueuing it again names the same job.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.0.key = Some(key.into());
        self
    }

    /// Not before `at`.
    pub fn run_at(mut self, at: DateTime<Utc>) -> Self {
        self.0.run_at = Some(at);
        self
    }

    /// Attempts allowed.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.0.max_attempts = Some(attempts.max(1));
        self
    }

    /// One attempt's timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.0.timeout_ms = Some((timeout.as_millis() as u64).max(1));
        self
    }

    /// The waits between attempts.
    pub fn backoff(mut self, backoff: JobBackoff) -> Self {
        self.0.backoff = Some(backoff);
        self
    }

    /// The priority, 0 (first) to 9 (last) when the type's limits make jobs wait.
    pub fn priority(mut self, priority: u8) -> Self {
        self.0.priority = Some(priority.min(super::entity::LOWEST_PRIORITY));
        self
    }

    /// The tenant whose notification stream gets the job's changes (topic `job`).
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.0.tenant = Some(tenant.into());
        self
    }

    /// The request as `POST /jobs` takes it.
    pub fn into_new_job(self) -> NewJob {
        self.0
    }
}

impl From<JobRequest> for NewJob {
    fn from(request: JobRequest) -> Self {
        request.0
    }
}

/// Enqueues `new` through `caller`: the key's job if the key is taken, else a new job
/// (a uuid v7 id). A resend after an error is safe: the key (given or derived) names the
/// same job, and a job without one is enqueued under its id once.
pub async fn enqueue(
    caller: &impl JobCaller,
    new: impl Into<NewJob>,
) -> Result<Enqueued, ClientError> {
    let mut new = new.into();
    let mut id = JobId::new().to_string();
    if new.key.is_none() {
        // Kept in the record like a given key, so pruning the job releases it.
        new.key = caller.derived_key();
    }
    if let Some(key) = &new.key {
        let claim = JobKeyMessage::Claim { job_id: id.clone() };
        let holder = caller
            .entity_ref::<JobKey>(&key_entity_id(new.tenant.as_deref(), &new.job_type, key))
            .ask(claim)
            .await?;
        id = holder.job_id.unwrap_or(id);
    }
    // Stored is enough: the job runs from its `enqueue` message (its first attempt in
    // the same handling when due), and `GET /jobs/{id}` reads a stored `enqueue` its job
    // has not run yet as the queued job it is. Waiting up to PACE for the handling keeps
    // a burst of enqueues at the pace the runners take them.
    caller
        .entity_ref::<Job>(&id)
        .send_paced(JobMessage::Enqueue(new), PACE)
        .await?;
    let status_url = format!("/jobs/{id}");
    Ok(Enqueued { id, status_url })
}
