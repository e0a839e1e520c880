//! `job-cron`: how a `[[cron]]` schedule targets a job type without the runtime knowing
//! jobs. A schedule sends the persisted `fire` to `job-cron/<job type>`:
//!
//! ```toml
//! [[cron]]
//! name = "nightly-report"
//! expression = "0 0 3 * * *"
//! target = { entity-type = "job-cron", entity-id = "report", message = "fire",
//!            payload = { schedule = "{{name}}", instant = "{{instant}}", payload = {} } }
//! ```
//!
//! `fire` claims the key `cron:<schedule>:<instant>` for the type (through `job-key`) and
//! enqueues that job: one job per instant, also when cron re-sends an instant or `fire`
//! is replayed after a crash (the key names the first claimant's job).

use serde::{Deserialize, Serialize};
use shoal::client::Request;
use shoal::entity::{Entity, EntityContext, EntityProtocol, HandlerError};
use utoipa::ToSchema;

use super::JobId;
use super::key::{JobKey, key_entity_id};

/// The `job-cron` entity type.
#[derive(Debug, Clone, Copy, Default)]
pub struct JobCron;

/// `job-cron`'s message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum JobCronMessage {
    /// Enqueues the job of one instant.
    Fire {
        /// The schedule's name.
        schedule: String,
        /// The instant (RFC 3339).
        instant: String,
        /// The job's payload.
        #[serde(default)]
        payload: serde_json::Value,
    },
}

/// The job enqueued for the instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobCronReply {
    /// Its id.
    pub job_id: String,
}

impl EntityProtocol for JobCron {
    const NAME: &'static str = "job-cron";
    type Message = JobCronMessage;
    type Reply = JobCronReply;

    fn is_persisted(_message: &JobCronMessage) -> bool {
        true
    }
}

impl Entity for JobCron {
    type State = ();

    async fn handle(
        &self,
        ctx: &EntityContext,
        _state: &mut (),
        message: JobCronMessage,
    ) -> Result<JobCronReply, HandlerError> {
        let JobCronMessage::Fire {
            schedule,
            instant,
            payload,
        } = message;
        let job_type = ctx.address.entity_id.as_str();
        let key = format!("cron:{schedule}:{instant}");
        let claim = Request::persisted(
            address(JobKey::NAME, &key_entity_id(None, job_type, &key))?,
            "claim",
            serde_json::json!({ "job_id": JobId::new().to_string() }),
        );
        let reply = ctx
            .ask(claim)
            .await
            .map_err(|e| HandlerError::retryable("claim_failed", e.to_string()))?;
        let value = match reply {
            shoal::message_storage::Reply::Ok { value } => value,
            shoal::message_storage::Reply::Err { code, message } => {
                return Err(HandlerError::retryable(code, message));
            }
        };
        let holder: super::key::JobKeyState = serde_json::from_value(value)
            .map_err(|e| HandlerError::retryable("claim_failed", e.to_string()))?;
        let job_id = holder
            .job_id
            .ok_or_else(|| HandlerError::retryable("claim_failed", "the key has no holder"))?;
        let enqueue = serde_json::json!({
            "type": job_type, "payload": payload, "key": key,
        });
        let request = Request::persisted(
            address(super::entity::Job::NAME, &job_id)?,
            "enqueue",
            enqueue,
        )
        .with_key(super::entity::ENQUEUE_KEY);
        ctx.send(request)
            .await
            .map_err(|e| HandlerError::retryable("enqueue_failed", e.to_string()))?;
        Ok(JobCronReply { job_id })
    }
}

fn address(entity_type: &str, id: &str) -> Result<shoal::ids::EntityAddress, HandlerError> {
    let bad = |e: shoal::ids::IdError| HandlerError::permanent("bad_target", e.to_string());
    Ok(shoal::ids::EntityAddress {
        entity_type: shoal::ids::EntityType::new(entity_type).map_err(bad)?,
        entity_id: shoal::ids::EntityId::new(id).map_err(bad)?,
    })
}
