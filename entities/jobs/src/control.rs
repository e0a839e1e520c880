//! The running side of jobs: [`RunningAttempts`], this runner's registry of attempts in
//! progress, and `job-control`, the [`ConcurrentEntity`] that reaches it.
//!
//! A running attempt holds its `job` entity's mailbox, so a `cancel` or `get` sent to the
//! job would wait behind it. `job-control` has the same entity id as the job, so it lives
//! on the same shard and so the same runner; its messages run concurrently and are
//! volatile: `cancel` trips the running attempt's token (the attempt ends `cancelled`) and
//! sends the persisted `cancel` to the job, so a job that is not running is cancelled too;
//! `status` returns the live view of a running attempt (record plus progress), if any.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use shoal::client::Request;
use shoal::entity::{ConcurrentEntity, EntityContext, EntityProtocol, HandlerError};
use shoal::ids::{EntityAddress, EntityType};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use super::handler::{JobContext, lock};
use super::record::JobView;

/// Most attempts one runner tracks at once (a bound on the map; attempts past it run but
/// cannot be cancelled early or show live progress).
pub const MAX_RUNNING: usize = 100_000;

struct Running {
    cancel: CancellationToken,
    ctx: JobContext,
    view: JobView,
}

/// This runner's attempts in progress, by job id. Cheap to clone (shared).
#[derive(Clone, Default)]
pub struct RunningAttempts(Arc<Mutex<HashMap<String, Running>>>);

/// Removes an attempt from [`RunningAttempts`] when it ends (also when its future is
/// dropped).
pub(crate) struct RunningGuard {
    attempts: RunningAttempts,
    job_id: String,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        lock(&self.attempts.0).remove(&self.job_id);
    }
}

impl std::fmt::Debug for RunningAttempts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningAttempts")
            .field("running", &self.len())
            .finish()
    }
}

impl RunningAttempts {
    pub(crate) fn start(
        &self,
        job_id: &str,
        cancel: CancellationToken,
        ctx: JobContext,
        view: JobView,
    ) -> RunningGuard {
        let mut map = lock(&self.0);
        if map.len() < MAX_RUNNING {
            map.insert(job_id.to_owned(), Running { cancel, ctx, view });
        }
        RunningGuard {
            attempts: self.clone(),
            job_id: job_id.to_owned(),
        }
    }

    /// Trips the running attempt's token; whether one was running.
    pub(crate) fn cancel(&self, job_id: &str) -> bool {
        match lock(&self.0).get(job_id) {
            Some(running) => {
                running.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// The live view of a running attempt.
    pub(crate) fn view(&self, job_id: &str) -> Option<JobView> {
        lock(&self.0).get(job_id).map(|running| {
            let mut view = running.view.clone();
            view.progress = running.ctx.current_progress().or(view.progress);
            view
        })
    }

    /// Attempts running now.
    pub fn len(&self) -> usize {
        lock(&self.0).len()
    }

    /// Whether none is running.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The `job-control` entity type.
#[derive(Debug, Clone, Default)]
pub struct JobControl {
    pub(crate) running: RunningAttempts,
}

impl JobControl {
    /// A control entity over `running` (shared with the `job` entity type).
    pub fn new(running: RunningAttempts) -> Self {
        Self { running }
    }
}

/// `job-control`'s messages (volatile).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum JobControlMessage {
    /// Cancels the job, running or not.
    Cancel {},
    /// The live view of a running attempt.
    Status {},
}

/// `job-control`'s reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobControlReply {
    /// Whether an attempt was running here.
    pub running: bool,
    /// Its live view.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<JobView>,
}

impl EntityProtocol for JobControl {
    const NAME: &'static str = "job-control";
    type Message = JobControlMessage;
    type Reply = JobControlReply;

    fn is_persisted(_message: &JobControlMessage) -> bool {
        false
    }
}

impl ConcurrentEntity for JobControl {
    type State = ();
    const CONCURRENCY: usize = 16;

    async fn handle(
        &self,
        ctx: &EntityContext,
        _state: &(),
        message: JobControlMessage,
    ) -> Result<JobControlReply, HandlerError> {
        let id = ctx.address.entity_id.as_str();
        match message {
            JobControlMessage::Cancel {} => {
                let running = self.running.cancel(id);
                let job = EntityAddress {
                    entity_type: EntityType::new(super::record::JOB_ENTITY)
                        .map_err(|e| HandlerError::permanent("bad_type", e.to_string()))?,
                    entity_id: ctx.address.entity_id.clone(),
                };
                ctx.send(Request::persisted(job, "cancel", serde_json::json!({})))
                    .await
                    .map_err(|e| HandlerError::retryable("send_failed", e.to_string()))?;
                Ok(JobControlReply {
                    running,
                    live: None,
                })
            }
            JobControlMessage::Status {} => {
                let live = self.running.view(id);
                Ok(JobControlReply {
                    running: live.is_some(),
                    live,
                })
            }
        }
    }
}
