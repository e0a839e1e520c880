//! One live entity: a ractor actor that handles its messages one at a time, owns the
//! entity's state, and completes persisted messages through message storage (reply,
//! processed flag and state in one epoch-checked transaction).

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::Shared;
use super::shard::{ShardMsg, WorkOutcome};
use crate::entity::{AnyState, EntityContext, ErasedEntity, HandlerError};
use crate::ids::{EntityAddress, Epoch, MessageId, ShardId};
use crate::message_storage::{Completion, CompletionOutcome, Reply};

pub(crate) struct EntityActor;

pub(crate) struct EntityArgs {
    pub(crate) address: EntityAddress,
    pub(crate) shard: ShardId,
    pub(crate) epoch: Epoch,
    pub(crate) def: Arc<dyn ErasedEntity>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) shard_ref: ActorRef<ShardMsg>,
}

pub(crate) struct EntityState {
    args: EntityArgs,
    /// Loaded on the first message (so spawning never waits on the database); dropped
    /// whenever storage and memory may disagree, to be reloaded.
    state: Option<AnyState>,
}

/// One message for the entity.
#[derive(Debug)]
pub(crate) struct Work {
    pub(crate) id: Option<MessageId>,
    pub(crate) tag: String,
    pub(crate) payload: serde_json::Value,
    pub(crate) attempts: i32,
}

impl Actor for EntityActor {
    type Msg = Work;
    type State = EntityState;
    type Arguments = EntityArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Work>,
        args: EntityArgs,
    ) -> Result<EntityState, ActorProcessingErr> {
        Ok(EntityState { args, state: None })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Work>,
        work: Work,
        entity: &mut EntityState,
    ) -> Result<(), ActorProcessingErr> {
        let id = work.id;
        let outcome = entity.run(work).await?;
        let done = ShardMsg::Done {
            address: entity.args.address.clone(),
            id,
            outcome,
        };
        // The shard actor is gone only when the shard stopped; nothing left to tell.
        let _ = entity.args.shard_ref.send_message(done);
        Ok(())
    }
}

impl EntityState {
    async fn load(&mut self) -> Result<&mut AnyState, ActorProcessingErr> {
        if self.state.is_none() {
            let def = &self.args.def;
            let stored = if def.options().persist_state {
                self.args
                    .shared
                    .storage
                    .load_state(&self.args.address)
                    .await?
            } else {
                None
            };
            self.state = Some(def.new_state(stored)?);
        }
        self.state
            .as_mut()
            .ok_or_else(|| "entity state missing after load".into())
    }

    /// Handles one message. `Err` means the entity must restart (retryable failure).
    async fn run(&mut self, work: Work) -> Result<WorkOutcome, ActorProcessingErr> {
        let def = self.args.def.clone();
        let message = match def.decode(&work.tag, work.payload) {
            Ok(message) => message,
            Err(error) => {
                let reply = Reply::Err {
                    code: "bad_message".to_owned(),
                    message: error.to_string(),
                };
                return match work.id {
                    Some(id) => Ok(self.complete(id, reply, false).await),
                    None => Ok(WorkOutcome::Volatile(reply)),
                };
            }
        };
        let ctx = EntityContext {
            address: self.args.address.clone(),
            shard: self.args.shard,
            epoch: self.args.epoch,
            runner_id: self.args.shared.runner_id(),
            message_id: work.id,
            attempts: work.attempts,
        };
        let span = tracing::debug_span!(
            "handle",
            entity = %ctx.address,
            shard = %ctx.shard,
            epoch = %ctx.epoch,
            message_id = ?ctx.message_id,
            tag = %work.tag,
        );
        let state = self.load().await?;
        let result = tracing::Instrument::instrument(def.handle(&ctx, state, message), span).await;
        let reply = match result {
            Ok(value) => Reply::Ok { value },
            Err(HandlerError {
                retryable: true,
                code,
                message,
            }) => {
                // Memory may be ahead of storage now: reload on the next message.
                self.state = None;
                return Err(format!("{code}: {message}").into());
            }
            Err(HandlerError { code, message, .. }) => Reply::Err { code, message },
        };
        match work.id {
            Some(id) => {
                let persist = def.options().persist_state;
                Ok(self.complete(id, reply, persist).await)
            }
            None => Ok(WorkOutcome::Volatile(reply)),
        }
    }

    async fn complete(&mut self, id: MessageId, reply: Reply, with_state: bool) -> WorkOutcome {
        let storage = self.args.shared.storage.clone();
        let state = match (with_state, &self.state) {
            (true, Some(state)) => match self.args.def.encode_state(state) {
                Ok(json) => Some((self.args.address.clone(), json)),
                Err(error) => {
                    self.state = None;
                    return WorkOutcome::StorageFailed(format!("state does not encode: {error}"));
                }
            },
            _ => None,
        };
        let completion = Completion {
            message_id: id,
            shard: self.args.shard,
            epoch: self.args.epoch,
            reply: reply.clone(),
            state,
        };
        match storage.complete(completion).await {
            Ok(CompletionOutcome::Committed) => WorkOutcome::Replied(reply),
            Ok(CompletionOutcome::AlreadyProcessed) => {
                // A redelivery: our state change was not written; the stored reply counts.
                self.state = None;
                match storage.reply(id).await {
                    Ok(Some(stored)) => WorkOutcome::Replied(stored),
                    Ok(None) => WorkOutcome::StorageFailed("processed without a reply".into()),
                    Err(error) => WorkOutcome::StorageFailed(error.to_string()),
                }
            }
            Ok(CompletionOutcome::Fenced) => {
                self.state = None;
                WorkOutcome::Fenced
            }
            Err(error) => {
                self.state = None;
                WorkOutcome::StorageFailed(error.to_string())
            }
        }
    }
}
