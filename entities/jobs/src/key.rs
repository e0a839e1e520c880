//! `job-key`: one entity per `type:key`, whose persisted `claim {job_id}` returns the
//! first claimant's job id, so enqueuing the same key again (also concurrently, also from
//! another gateway) names the same job. Its state is kept in Postgres; a key stays taken
//! until its job is pruned (the pruner sends `release`).

use serde::{Deserialize, Serialize};
use shoal::entity::{Entity, EntityContext, EntityProtocol, HandlerError};
use utoipa::ToSchema;

/// The `job-key` entity type.
#[derive(Debug, Clone, Copy, Default)]
pub struct JobKey;

/// `job-key`'s messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum JobKeyMessage {
    /// Takes the key for `job_id` unless it is taken; replies with the holder.
    Claim {
        /// The job that would hold the key.
        job_id: String,
    },
    /// Frees the key if `job_id` holds it.
    Release {
        /// The holder.
        job_id: String,
    },
}

/// The key's holder.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobKeyState {
    /// The job holding the key.
    pub job_id: Option<String>,
}

impl EntityProtocol for JobKey {
    const NAME: &'static str = "job-key";
    type Message = JobKeyMessage;
    type Reply = JobKeyState;

    fn is_persisted(_message: &JobKeyMessage) -> bool {
        true
    }
}

impl Entity for JobKey {
    type State = JobKeyState;
    const PERSIST_STATE: bool = true;

    async fn handle(
        &self,
        _ctx: &EntityContext,
        state: &mut JobKeyState,
        message: JobKeyMessage,
    ) -> Result<JobKeyState, HandlerError> {
        match message {
            JobKeyMessage::Claim { job_id } => {
                state.job_id.get_or_insert(job_id);
            }
            JobKeyMessage::Release { job_id } => {
                if state.job_id.as_deref() == Some(job_id.as_str()) {
                    state.job_id = None;
                }
            }
        }
        Ok(state.clone())
    }
}

/// The `job-key` entity id of `key` for `job_type`, in `tenant`'s own key space when the
/// job has one (two tenants' equal keys never name one job): `~{tenant}:{type}:{key}`,
/// else `{type}:{key}` (neither a type nor a tenant holds `~` or `:`, so the two forms
/// never meet).
pub fn key_entity_id(tenant: Option<&str>, job_type: &str, key: &str) -> String {
    match tenant {
        Some(tenant) => format!("~{tenant}:{job_type}:{key}"),
        None => format!("{job_type}:{key}"),
    }
}

#[cfg(test)]
mod tests {
    use super::key_entity_id;

    #[test]
    fn tenants_have_key_spaces_of_their_own() {
        assert_eq!(key_entity_id(None, "t", "k"), "t:k");
        assert_eq!(key_entity_id(Some("a"), "t", "k"), "~a:t:k");
        assert_ne!(
            key_entity_id(Some("a"), "t", "k"),
            key_entity_id(Some("b"), "t", "k")
        );
        // A key that looks like a tenant's form stays in the untenanted space.
        assert_ne!(
            key_entity_id(None, "t", "x:k"),
            key_entity_id(Some("t"), "x", "k")
        );
    }
}
