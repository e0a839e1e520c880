//! One live entity: a ractor actor that owns the entity's state and completes persisted
//! messages through message storage (reply, processed flag and state in one epoch-checked
//! transaction).
//!
//! With `concurrency` 1 the actor handles one message at a time, in order. Above 1 each
//! message runs as a task of its own, at most `concurrency` at once, sharing the state; a
//! task that panics or fails retryably fails the actor, so the shard restarts the entity
//! and replays its persisted messages, as it does for one-at-a-time entities. The handlers
//! run in a `JoinSet` the actor owns: when the actor stops they are aborted with it. A
//! handler that has returned completes its message on a task of its own, so an abort never
//! falls between a committed completion and the report that answers its caller.
//!
//! Lifecycle: the state is built by the type's activation hook on the first message (and
//! whenever it must be reloaded), bounded by `activation_timeout`; a hook that fails or
//! runs out of time fails the actor like a retryable handler failure. On
//! [`EntityMsg::Passivate`] the actor runs the passivation hook (bounded by
//! `passivation_timeout`) and stops itself; a plain stop (fencing, shard stop) skips it.
//! On [`EntityMsg::Sleep`] the actor hands its state to the shard and stops without the
//! hook: the entity stays activated as data, and the next actor starts from that state.
//!
//! Each handling gets a fresh call scope in its context. For a persisted message of a
//! `persist_state` type the scope holds an outbox: the handler's sends are taken from it
//! when the handler returns and written by the completion; once that commits, the targets'
//! owners are told (messages under derived keys only, see `entity/context.rs`).

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use super::Shared;
use super::mailbox::{ShardMsg, WorkOutcome};
use crate::entity::context::{Calls, Outgoing};
use crate::entity::{
    ActivationContext, AnyMessage, AnyState, EntityContext, ErasedEntity, HandlerError,
};
use crate::ids::{EntityAddress, Epoch, MessageId, ShardId};
use crate::message_storage::{Completion, CompletionOutcome, MessageStorage, Reply};

pub(crate) struct EntityActor;

pub(crate) struct EntityArgs {
    pub(crate) address: EntityAddress,
    pub(crate) shard: ShardId,
    pub(crate) epoch: Epoch,
    pub(crate) def: Arc<dyn ErasedEntity>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) shard_ref: ActorRef<ShardMsg>,
    /// The state an earlier actor of this entity handed back when it went to sleep.
    pub(crate) state: Option<AnyState>,
}

pub(crate) struct EntityState {
    args: EntityArgs,
    /// Built by the activation hook on the first message (so spawning never waits on the
    /// database or the hook); dropped
    /// whenever storage and memory may disagree, to be reloaded.
    state: Option<AnyState>,
    /// Messages waiting for one of the `concurrency` places (side-by-side types).
    queued: VecDeque<Work>,
    /// Handlers running side by side.
    running: usize,
    tasks: JoinSet<()>,
}

/// One message for the entity.
#[derive(Debug)]
pub(crate) struct Work {
    /// The shard's number for this piece of work (matches the `Done` to its caller).
    pub(crate) seq: u64,
    pub(crate) id: Option<MessageId>,
    pub(crate) tag: String,
    pub(crate) payload: serde_json::Value,
    pub(crate) attempts: i32,
}

pub(crate) enum EntityMsg {
    Work(Work),
    /// A side-by-side handler finished and reported to the shard.
    Finished,
    /// A side-by-side handler panicked or failed retryably: the entity restarts.
    Failed {
        id: Option<MessageId>,
        error: String,
    },
    /// The entity is idle or its shard drained: run the passivation hook, tell `done`,
    /// stop. The shard has already forgotten the actor.
    Passivate(oneshot::Sender<()>),
    /// The entity is idle and has no work: hand the state back (no hook) and stop.
    Sleep(oneshot::Sender<Option<AnyState>>),
}

impl Actor for EntityActor {
    type Msg = EntityMsg;
    type State = EntityState;
    type Arguments = EntityArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<EntityMsg>,
        mut args: EntityArgs,
    ) -> Result<EntityState, ActorProcessingErr> {
        let state = args.state.take();
        Ok(EntityState {
            args,
            state,
            queued: VecDeque::new(),
            running: 0,
            tasks: JoinSet::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<EntityMsg>,
        message: EntityMsg,
        entity: &mut EntityState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            EntityMsg::Work(work) if entity.concurrency() == 1 => {
                let (seq, id) = (work.seq, work.id);
                let outcome = entity.run(work).await?;
                entity.report(seq, id, outcome);
            }
            EntityMsg::Work(work) => {
                entity.queued.push_back(work);
                entity.start_queued(&myself).await?;
            }
            EntityMsg::Finished => {
                entity.running = entity.running.saturating_sub(1);
                // A task that died outside its handler would hold its place for good.
                while let Some(joined) = entity.tasks.try_join_next() {
                    if let Err(error) = joined
                        && error.is_panic()
                    {
                        return Err(format!("a handler task panicked: {error}").into());
                    }
                }
                entity.start_queued(&myself).await?;
            }
            EntityMsg::Failed { id, error } => {
                if let Some(id) = id {
                    let _ = entity.args.shared.storage.record_attempts(&[id]).await;
                }
                return Err(error.into());
            }
            EntityMsg::Passivate(done) => {
                entity.passivate().await;
                let _ = done.send(());
                myself.stop(Some("passivated".to_owned()));
            }
            EntityMsg::Sleep(give) => {
                let _ = give.send(entity.state.take());
                myself.stop(Some("asleep".to_owned()));
            }
        }
        Ok(())
    }
}

impl EntityState {
    fn concurrency(&self) -> usize {
        self.args.def.concurrency()
    }

    fn report(&self, seq: u64, id: Option<MessageId>, outcome: WorkOutcome) {
        let done = ShardMsg::Done {
            address: self.args.address.clone(),
            seq,
            id,
            outcome,
        };
        // The shard actor is gone only when the shard stopped; nothing left to tell.
        let _ = self.args.shard_ref.send_message(done);
    }

    /// The state, built by the activation hook if there is none. `Err` fails the actor
    /// (the entity restarts with backoff, as after a retryable handler failure).
    async fn load(&mut self) -> Result<&mut AnyState, ActorProcessingErr> {
        if self.state.is_none() {
            let def = self.args.def.clone();
            let stored = if def.persist_state() {
                self.args
                    .shared
                    .storage
                    .load_state(&self.args.address)
                    .await?
            } else {
                None
            };
            let ctx = self.activation_context();
            let timeout = def.options().activation_timeout;
            let state = match tokio::time::timeout(timeout, def.activate(&ctx, stored)).await {
                Ok(Ok(state)) => state,
                Ok(Err(error)) => return Err(format!("activation failed: {error}").into()),
                Err(_) => {
                    return Err(format!("activation took longer than {timeout:?}").into());
                }
            };
            self.state = Some(state);
        }
        self.state
            .as_mut()
            .ok_or_else(|| "entity state missing after load".into())
    }

    /// Runs the passivation hook, if the entity was activated, within its timeout.
    async fn passivate(&mut self) {
        let Some(state) = self.state.take() else {
            return;
        };
        let ctx = self.activation_context();
        passivate_state(self.args.def.as_ref(), &ctx, state).await;
    }

    fn activation_context(&self) -> ActivationContext {
        ActivationContext {
            address: self.args.address.clone(),
            shard: self.args.shard,
            epoch: self.args.epoch,
            runner_id: self.args.shared.runner_id(),
        }
    }

    fn context(&self, work: &Work) -> EntityContext {
        // Only a completion that writes the state can carry the messages that go with it.
        let outbox = work.id.is_some() && self.args.def.persist_state();
        EntityContext {
            address: self.args.address.clone(),
            shard: self.args.shard,
            epoch: self.args.epoch,
            runner_id: self.args.shared.runner_id(),
            message_id: work.id,
            attempts: work.attempts,
            calls: Calls::new(self.args.shared.outbound(), outbox),
        }
    }

    /// Decodes a message; an undecodable one gets its final `bad_message` reply instead.
    fn decode(&self, work: &mut Work) -> Result<AnyMessage, Reply> {
        let payload = std::mem::take(&mut work.payload);
        self.args
            .def
            .decode(&work.tag, payload)
            .map_err(|error| Reply::Err {
                code: "bad_message".to_owned(),
                message: error.to_string(),
            })
    }

    /// Handles one message. `Err` means the entity must restart (retryable failure).
    async fn run(&mut self, mut work: Work) -> Result<WorkOutcome, ActorProcessingErr> {
        let def = self.args.def.clone();
        let message = match self.decode(&mut work) {
            Ok(message) => message,
            Err(reply) => return Ok(self.finish(work.id, reply, false, Vec::new()).await),
        };
        let ctx = self.context(&work);
        let span = handler_span(&ctx, &work.tag);
        let state = self.load().await?;
        let result = tracing::Instrument::instrument(def.handle(&ctx, state, message), span).await;
        // Taken whatever the result: a retryable failure drops it with the state change.
        let outbox = ctx.calls.take_outbox();
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
        let persist = def.persist_state();
        Ok(self.finish(work.id, reply, persist, outbox).await)
    }

    /// The volatile reply, or the persisted message's completion (with its outbox).
    async fn finish(
        &mut self,
        id: Option<MessageId>,
        reply: Reply,
        with_state: bool,
        outbox: Vec<Outgoing>,
    ) -> WorkOutcome {
        let Some(id) = id else {
            return WorkOutcome::Volatile(reply);
        };
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
            reply,
            state,
            outbox: outbox.iter().map(|o| o.message.clone()).collect(),
        };
        let (outcome, in_step) = complete(self.args.shared.storage.as_ref(), completion).await;
        if in_step {
            self.notify_owners(outbox);
        }
        // Stored state may now differ from memory: reload it. State that lives only in
        // memory (and a side-by-side entity's shared state) is kept.
        if !in_step && self.args.def.persist_state() {
            self.state = None;
        }
        outcome
    }

    /// Tells the owners of a committed outbox's messages, best effort (their scans find
    /// them anyway). A message under the caller's own key may have met an earlier one and
    /// not been inserted: pushing it would run a message that is not stored.
    fn notify_owners(&self, outbox: Vec<Outgoing>) {
        let Some(client) = self.args.shared.client.get() else {
            return;
        };
        for outgoing in outbox.into_iter().filter(|o| o.derived_key) {
            client.notify_stored_from(&self.args.address, outgoing.message);
        }
    }

    /// Starts queued messages while fewer than `concurrency` run.
    async fn start_queued(
        &mut self,
        myself: &ActorRef<EntityMsg>,
    ) -> Result<(), ActorProcessingErr> {
        while self.running < self.concurrency() {
            let Some(mut work) = self.queued.pop_front() else {
                return Ok(());
            };
            let message = match self.decode(&mut work) {
                Ok(message) => message,
                Err(reply) => {
                    let outcome = self.finish(work.id, reply, false, Vec::new()).await;
                    self.report(work.seq, work.id, outcome);
                    continue;
                }
            };
            let ctx = self.context(&work);
            let span = handler_span(&ctx, &work.tag);
            let handler = self
                .args
                .def
                .clone()
                .handle_detached(ctx, self.load().await?, message);
            let handler = tracing::Instrument::instrument(handler, span);
            let storage = self.args.shared.storage.clone();
            let (shard, epoch) = (self.args.shard, self.args.epoch);
            let (shard_ref, address, myself) = (
                self.args.shard_ref.clone(),
                self.args.address.clone(),
                myself.clone(),
            );
            let (seq, id) = (work.seq, work.id);
            self.running += 1;
            self.tasks.spawn(async move {
                let reply = match AssertUnwindSafe(handler).catch_unwind().await {
                    Ok(Ok(value)) => Reply::Ok { value },
                    Ok(Err(HandlerError {
                        retryable: false,
                        code,
                        message,
                    })) => Reply::Err { code, message },
                    Ok(Err(HandlerError { code, message, .. })) => {
                        let error = format!("{code}: {message}");
                        let _ = myself.send_message(EntityMsg::Failed { id, error });
                        return;
                    }
                    Err(panic) => {
                        let error = panic_message(panic.as_ref());
                        let _ = myself.send_message(EntityMsg::Failed { id, error });
                        return;
                    }
                };
                // The completion runs outside the `JoinSet`: a sibling's failure aborts the
                // set, and an abort between the commit and `Done` would leave the caller
                // waiting on a message that is processed and never scanned again.
                tokio::spawn(async move {
                    let outcome = match id {
                        Some(message_id) => {
                            let completion = Completion {
                                message_id,
                                shard,
                                epoch,
                                reply,
                                state: None,
                                outbox: Vec::new(),
                            };
                            let completed = complete(storage.as_ref(), completion);
                            match AssertUnwindSafe(completed).catch_unwind().await {
                                Ok((outcome, _)) => outcome,
                                Err(panic) => {
                                    let error = panic_message(panic.as_ref());
                                    let _ = myself.send_message(EntityMsg::Failed { id, error });
                                    return;
                                }
                            }
                        }
                        None => WorkOutcome::Volatile(reply),
                    };
                    let done = ShardMsg::Done {
                        address,
                        seq,
                        id,
                        outcome,
                    };
                    let _ = shard_ref.send_message(done);
                    let _ = myself.send_message(EntityMsg::Finished);
                });
            });
        }
        Ok(())
    }
}

/// Runs a type's passivation hook on an activated entity's state, cut off at the type's
/// `passivation_timeout` (from the entity's actor, or from its shard for a sleeping one).
pub(crate) async fn passivate_state(
    def: &dyn ErasedEntity,
    ctx: &ActivationContext,
    state: AnyState,
) {
    let timeout = def.options().passivation_timeout;
    if tokio::time::timeout(timeout, def.passivate(ctx, state))
        .await
        .is_err()
    {
        tracing::warn!(entity = %ctx.address, ?timeout, "the passivation hook ran out of time");
    }
}

fn handler_span(ctx: &EntityContext, tag: &str) -> tracing::Span {
    tracing::debug_span!(
        "handle",
        entity = %ctx.address,
        shard = %ctx.shard,
        epoch = %ctx.epoch,
        message_id = ?ctx.message_id,
        tag = %tag,
    )
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".to_owned());
    format!("panicked: {text}")
}

/// Writes a completion. Also says whether the entity's memory still matches storage
/// (false when this completion's state change was not written).
pub(crate) async fn complete(
    storage: &dyn MessageStorage,
    completion: Completion,
) -> (WorkOutcome, bool) {
    let id = completion.message_id;
    let reply = completion.reply.clone();
    match storage.complete(completion).await {
        Ok(CompletionOutcome::Committed) => (WorkOutcome::Replied(reply), true),
        Ok(CompletionOutcome::AlreadyProcessed | CompletionOutcome::Unstorable) => {
            // A redelivery, or a result storage could not hold: our state change was not
            // written; the stored reply counts.
            let outcome = match storage.reply(id).await {
                Ok(Some(stored)) => WorkOutcome::Replied(stored),
                Ok(None) => WorkOutcome::StorageFailed("processed without a reply".into()),
                Err(error) => WorkOutcome::StorageFailed(error.to_string()),
            };
            (outcome, false)
        }
        Ok(CompletionOutcome::Fenced) => (WorkOutcome::Fenced, false),
        Err(error) => (WorkOutcome::StorageFailed(error.to_string()), false),
    }
}
