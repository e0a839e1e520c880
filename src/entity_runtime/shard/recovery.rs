//! What a shard does with work that cannot simply run: an entity that failed (restart
//! with backoff, replay), a message that failed too often (completed with an error), and a
//! message whose entity type this runner does not have (it waits in storage, with backoff,
//! for a bounded number of attempts).
//!
//! A message whose type is unknown here (a rolling upgrade: the sender has the type, this
//! owner not yet) is *postponed*: its `deliver_at` moves to now + `type-wait-backoff` ×
//! 2^attempts and one attempt is counted, so scans pass it by and `/ready` does not count
//! it as stalled; its callers are told at once that it waits ([`DeliveryError::TypeNotDeployed`],
//! retryable) and explain shows why. Once the type is deployed the message runs at its next
//! due time. After `max-delivery-attempts` it is completed with the error reply
//! `unknown_entity_type`, which is then what every caller reads.

use std::time::Duration;

use chrono::Utc;
use ractor::{ActorId, ActorRef};
use tokio::time::Instant;

use super::{DeliveryError, Pending, ShardMsg, ShardState};
use crate::backoff::Backoff;
use crate::entity_runtime::entity_actor::complete;
use crate::entity_runtime::shard::{LAST_ERROR_BYTES, ScanKind};
use crate::ids::EntityAddress;
use crate::message_storage::{Completion, Reply, StoredMessage};

/// How long a restart backoff is remembered after it ends (a failure within it doubles).
pub(super) const BACKOFF_KEPT: Duration = Duration::from_secs(60);
/// The restart backoff doubles at most this many times.
const BACKOFF_DOUBLINGS: u32 = 5;

impl ShardState {
    /// Remembers an entity's last error for explain, cut to [`LAST_ERROR_BYTES`].
    pub(super) fn note_error(&mut self, address: EntityAddress, mut error: String) {
        if error.len() > LAST_ERROR_BYTES {
            let mut cut = LAST_ERROR_BYTES;
            while !error.is_char_boundary(cut) {
                cut -= 1;
            }
            error.truncate(cut);
            error.push('…');
        }
        self.last_errors.insert(address, error);
    }

    pub(super) fn entity_failed(
        &mut self,
        myself: &ActorRef<ShardMsg>,
        actor: ActorId,
        error: String,
    ) {
        let Some(address) = self.by_actor.remove(&actor) else {
            return;
        };
        tracing::error!(shard = %self.shard, entity = %address, %error, "entity failed; restarting with backoff");
        crate::metrics::entity_restart();
        // One at a time, the failed message is the oldest unfinished one; side-by-side
        // entities record the attempt themselves, as only they know which one failed.
        let one_at_a_time = self.capacity_of(&address, |o| o.concurrency.get()) == 1;
        let culprit = self
            .entities
            .get(&address)
            .filter(|_| one_at_a_time)
            .and_then(|slot| match slot.pending.front() {
                Some((_, Pending::Persisted(id))) => Some(*id),
                _ => None,
            });
        self.note_error(address.clone(), error.clone());
        self.remove_slot(&address, &format!("handler failed: {error}"));
        let (count, until) = self
            .backoff
            .get_or_insert_with(address.clone(), || (0, Instant::now()));
        *count += 1;
        let delay = Backoff::nth(
            self.shared.config.restart_backoff,
            *count - 1,
            BACKOFF_DOUBLINGS,
        );
        *until = Instant::now() + delay;
        // Replay: its persisted messages are still unprocessed; a scan after the backoff
        // delivers them again in order.
        self.overflowed.insert(address);
        if let Some(id) = culprit {
            let storage = self.shared.storage.clone();
            tokio::spawn(async move {
                let _ = storage.record_attempts(&[id]).await;
            });
        }
        let myself = myself.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = myself.send_message(ShardMsg::Scan(ScanKind::Settled));
        });
    }

    /// A message that failed `max_attempts` times gets an error reply instead of another
    /// attempt: reported once, never looping.
    pub(super) fn give_up(&mut self, myself: &ActorRef<ShardMsg>, message: StoredMessage) {
        tracing::error!(
            shard = %self.shard,
            message_id = %message.id,
            entity = %message.address,
            attempts = message.attempts,
            "message failed too many times; completing it with an error"
        );
        let reply = Reply::Err {
            code: "too_many_attempts".to_owned(),
            message: format!(
                "the handler failed {} times; last error: {}",
                message.attempts,
                self.last_errors
                    .get(&message.address)
                    .map_or("unknown", String::as_str)
            ),
        };
        self.complete_with(myself, message, reply);
    }

    /// Completes a message with `reply` without running it. Its callers are answered with
    /// what storage then holds: this reply if it committed, the stored one if another
    /// completion came first, `ShardMoving` if the epoch moved on (the next owner decides).
    fn complete_with(&mut self, myself: &ActorRef<ShardMsg>, message: StoredMessage, reply: Reply) {
        self.in_flight.insert(message.id);
        let completion = Completion {
            message_id: message.id,
            shard: self.shard,
            epoch: self.epoch,
            reply,
            state: None,
        };
        let storage = self.shared.storage.clone();
        let myself = myself.clone();
        let (id, address) = (message.id, message.address);
        tokio::spawn(async move {
            let (outcome, _) = complete(storage.as_ref(), completion).await;
            // Not in the entity's slot: no sequence number matches.
            let _ = myself.send_message(ShardMsg::Done {
                address,
                seq: 0,
                id: Some(id),
                outcome,
            });
        });
    }

    /// A message whose type this runner does not have: postponed with backoff, its callers
    /// told it waits; completed with `unknown_entity_type` after `max_attempts`.
    pub(super) fn wait_for_type(&mut self, myself: &ActorRef<ShardMsg>, message: StoredMessage) {
        let max = self.shared.config.max_attempts;
        let entity_type = message.address.entity_type.to_string();
        if message.attempts >= max {
            tracing::warn!(shard = %self.shard, message_id = %message.id, %entity_type, "entity type never deployed here; completing the message with an error");
            self.note_error(
                message.address.clone(),
                format!(
                    "entity type `{entity_type}` is not deployed on this runner: completed with \
                     `unknown_entity_type` after {} attempts",
                    message.attempts
                ),
            );
            let reply = Reply::Err {
                code: "unknown_entity_type".to_owned(),
                message: format!(
                    "entity type `{entity_type}` was not deployed on the entity's runner \
                     after {} attempts",
                    message.attempts
                ),
            };
            self.complete_with(myself, message, reply);
            return;
        }
        let attempts = u32::try_from(message.attempts).unwrap_or(0);
        let wait = Backoff::nth(
            self.shared.config.type_wait_backoff,
            attempts,
            BACKOFF_DOUBLINGS,
        );
        let until = Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
        self.note_error(
            message.address.clone(),
            format!(
                "entity type `{entity_type}` is not deployed on this runner; attempt {} of {max}, \
                 next at {}",
                message.attempts + 1,
                until.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            ),
        );
        let error = DeliveryError::TypeNotDeployed(entity_type);
        for waiter in self
            .waiters
            .remove(&message.id)
            .map(|w| w.callers)
            .unwrap_or_default()
        {
            let _ = waiter.send(Err(error.clone()));
        }
        // Scans skip it until storage has it postponed.
        self.in_flight.insert(message.id);
        let storage = self.shared.storage.clone();
        let id = message.id;
        let me = myself.clone();
        tokio::spawn(async move {
            if let Err(error) = storage.postpone(id, until).await {
                tracing::warn!(message_id = %id, %error, "could not postpone a message");
            }
            let _ = me.send_message(ShardMsg::Postponed(id));
        });
        self.arm_due_timer(myself, until);
    }
}
