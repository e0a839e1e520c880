//! How a shard answers the callers of persisted messages: with the reply a completion
//! committed, with the stored reply read back (a duplicate whose original completed
//! elsewhere, a completion that reported an error after it may have committed, a waiter
//! rechecked with backoff), or with an error (fenced, moving). Callers that gave up are
//! dropped on the shard's tick.

use std::time::Duration;

use ractor::ActorRef;
use tokio::time::Instant;

use super::{DeliveryError, ReplyTx, ShardMsg, ShardState, WorkOutcome};
use crate::backoff::Backoff;
use crate::ids::MessageId;
use crate::message_storage::Reply;

/// First and longest wait before storage is asked again for the reply of a message whose
/// callers wait while it is not in flight here.
const WAITER_RECHECK_FIRST: Duration = Duration::from_secs(1);
const WAITER_RECHECK_MAX: Duration = Duration::from_secs(30);
/// Stored-reply reads a shard starts per tick at most.
const RECHECKS_PER_TICK: usize = 64;
/// Callers waiting on one persisted message, and when storage is next asked for its reply.
pub(super) struct Waiting {
    pub(super) callers: Vec<ReplyTx>,
    recheck_at: Instant,
    recheck: Backoff,
}

impl ShardState {
    pub(super) fn finish_persisted(
        &mut self,
        myself: &ActorRef<ShardMsg>,
        id: MessageId,
        outcome: WorkOutcome,
    ) {
        match outcome {
            WorkOutcome::Replied(reply) | WorkOutcome::Volatile(reply) => {
                crate::metrics::message_processed();
                self.answer(id, reply);
            }
            WorkOutcome::Fenced => {
                tracing::warn!(shard = %self.shard, epoch = %self.epoch, "completion refused: epoch moved on");
                for waiter in self
                    .waiters
                    .remove(&id)
                    .map(|w| w.callers)
                    .unwrap_or_default()
                {
                    let _ = waiter.send(Err(DeliveryError::ShardMoving(self.shard)));
                }
                let _ = myself.send_message(ShardMsg::Fence);
            }
            WorkOutcome::StorageFailed(error) => {
                // Still unprocessed in storage (a later scan delivers it again), or it
                // committed and only the answer was lost: storage knows which.
                tracing::warn!(shard = %self.shard, message_id = %id, %error, "completion failed");
                self.look_up(myself, id);
            }
        }
    }

    /// Answers every caller of `id` with its stored reply, and remembers it.
    pub(super) fn answer(&mut self, id: MessageId, reply: Reply) {
        for waiter in self
            .waiters
            .remove(&id)
            .map(|w| w.callers)
            .unwrap_or_default()
        {
            let _ = waiter.send(Ok(reply.clone()));
        }
        self.shared.recent.remember(id, reply);
    }

    pub(super) fn add_waiter(&mut self, id: MessageId, caller: ReplyTx) {
        self.waiters
            .entry(id)
            .or_insert_with(|| {
                let mut recheck = Backoff::new(WAITER_RECHECK_FIRST, WAITER_RECHECK_MAX);
                Waiting {
                    callers: Vec::new(),
                    recheck_at: Instant::now() + recheck.next_delay(),
                    recheck,
                }
            })
            .callers
            .push(caller);
    }

    /// Reads `id`'s stored reply; its callers get it if it is there.
    pub(super) fn look_up(&mut self, myself: &ActorRef<ShardMsg>, id: MessageId) {
        if !self.looking_up.insert(id) {
            return;
        }
        let storage = self.shared.storage.clone();
        let myself = myself.clone();
        tokio::spawn(async move {
            let reply = match storage.reply(id).await {
                Ok(reply) => reply,
                Err(error) => {
                    tracing::warn!(message_id = %id, %error, "could not read a stored reply");
                    None
                }
            };
            let _ = myself.send_message(ShardMsg::StoredReply { id, reply });
        });
    }

    pub(super) fn stored_reply(&mut self, id: MessageId, reply: Option<Reply>) {
        self.looking_up.remove(&id);
        if let Some(reply) = reply {
            self.answer(id, reply);
        }
    }

    /// Drops callers that gave up (their deadline passed) and asks storage again for the
    /// replies of messages whose callers still wait while nothing here runs them.
    pub(super) fn recheck_waiters(&mut self, myself: &ActorRef<ShardMsg>) {
        let now = Instant::now();
        let in_flight = &self.in_flight;
        let mut due = Vec::new();
        self.waiters.retain(|id, waiting| {
            waiting.callers.retain(|caller| !caller.is_closed());
            if waiting.callers.is_empty() {
                return false;
            }
            if !in_flight.contains(id) && waiting.recheck_at <= now && due.len() < RECHECKS_PER_TICK
            {
                due.push(*id);
                waiting.recheck_at = now + waiting.recheck.next_delay();
            }
            true
        });
        for id in due {
            self.look_up(myself, id);
        }
    }

    /// While draining, callers waiting on messages not in flight go elsewhere.
    pub(super) fn refuse_waiters(&mut self) {
        let in_flight = &self.in_flight;
        let shard = self.shard;
        self.waiters.retain(|id, waiting| {
            if in_flight.contains(id) {
                return true;
            }
            for waiter in waiting.callers.drain(..) {
                let _ = waiter.send(Err(DeliveryError::ShardMoving(shard)));
            }
            false
        });
    }
}
