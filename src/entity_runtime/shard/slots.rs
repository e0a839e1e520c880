//! The shard's entity slots over their lives: idle entities put to sleep on the tick (their
//! actor hands its state back and stops: an idle entity is data, not a task), idle ones
//! passivated past `max_idle` (their passivation hook runs, nobody waits for it), a
//! drained shard passivating everything and
//! waiting for the hooks (bounded), an entity removed at once (a failure, fencing), and the
//! shard stopping everything it holds. Removing a slot always answers the work that was
//! waiting on it, so no caller is left hanging.

use std::sync::atomic::Ordering;
use std::time::Duration;

use ractor::ActorRef;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{Life, Pending, ScanKind, ShardMsg, ShardState, recovery};
use crate::entity::{ActivationContext, AnyState};
use crate::entity_runtime::entity_actor::{EntityMsg, passivate_state};
use crate::ids::EntityAddress;
use crate::transport::DeliveryError;

/// How much longer than the longest passivation timeout a drained shard waits for the
/// hooks of its entities (their actors enforce the timeout; this covers the handoff).
const PASSIVATION_GRACE: Duration = Duration::from_millis(100);
/// How long the shard waits for an idle actor to hand its state back; one that does not
/// answer in time is stopped, its state dropped (the next message activates it again).
const SLEEP_ANSWER: Duration = Duration::from_secs(1);

impl ShardState {
    pub(super) async fn tick(&mut self, myself: &ActorRef<ShardMsg>) {
        let now = Instant::now();
        let sleep_after = self.shared.config.sleep_after;
        let mut idle = Vec::new();
        let mut drowsy = Vec::new();
        for (address, slot) in &self.entities {
            if !slot.pending.is_empty() {
                continue;
            }
            let quiet = now.duration_since(slot.last_active);
            if quiet >= slot.max_idle {
                idle.push(address.clone());
            } else if quiet >= sleep_after
                && let Some(actor) = slot.actor()
            {
                drowsy.push((address.clone(), actor.clone()));
            }
        }
        for address in idle {
            // Nobody waits for the hook: the next activation may start before it ends.
            drop(self.passivate_slot(&address));
        }
        self.put_to_sleep(drowsy).await;
        self.backoff
            .retain(|_, (_, until)| *until + recovery::BACKOFF_KEPT > now);
        self.recheck_waiters(myself);
        // Entities whose backlog waits in storage (full mailbox, resident cap) get another
        // chance even if no completion woke us.
        if !self.overflowed.is_empty() {
            self.request_scan(myself, ScanKind::Settled);
        }
    }

    /// Turns idle entities' actors into data: each hands its state back and stops. Idle
    /// actors answer at once; the shard waits for all of them together, each at most
    /// [`SLEEP_ANSWER`]. One that does not answer is stopped, its state dropped.
    async fn put_to_sleep(&mut self, drowsy: Vec<(EntityAddress, ActorRef<EntityMsg>)>) {
        if drowsy.is_empty() {
            return;
        }
        let asks = drowsy.into_iter().map(|(address, actor)| async move {
            let (give, take) = oneshot::channel();
            let state = match actor.send_message(EntityMsg::Sleep(give)) {
                Ok(()) => tokio::time::timeout(SLEEP_ANSWER, take)
                    .await
                    .ok()
                    .and_then(Result::ok),
                Err(_) => None,
            };
            (address, actor, state)
        });
        // Nothing else reaches the shard while it waits: the slots are as they were.
        for (address, actor, state) in futures::future::join_all(asks).await {
            match state {
                Some(state) => {
                    self.by_actor.remove(&actor.get_id());
                    self.count_awake_down();
                    if let Some(slot) = self.entities.get_mut(&address) {
                        slot.life = Life::Asleep(state);
                    }
                }
                None => {
                    tracing::warn!(entity = %address, "an idle entity did not go to sleep; stopping it");
                    self.remove_slot(&address, "did not go to sleep");
                }
            }
        }
    }

    fn count_awake_down(&self) {
        let awake = self.shared.awake.fetch_sub(1, Ordering::Relaxed) - 1;
        crate::metrics::entities_awake(awake);
    }

    /// Stops an entity at once (no passivation hook) and fails its unfinished work.
    pub(super) fn remove_slot(&mut self, address: &EntityAddress, why: &str) {
        if let Some(Life::Awake(actor)) = self.forget_slot(address, why) {
            actor.stop(Some(why.to_owned()));
        }
    }

    /// Passivates an idle entity: its passivation hook runs (in its actor, which then stops
    /// itself, or, for a sleeping entity, on a task of its own). The receiver resolves when
    /// the hook has returned (or the actor is gone); `None`: there is no hook to run.
    pub(super) fn passivate_slot(
        &mut self,
        address: &EntityAddress,
    ) -> Option<oneshot::Receiver<()>> {
        let (done_tx, done_rx) = oneshot::channel();
        match self.forget_slot(address, "passivated")? {
            Life::Awake(actor) => {
                if let Err(error) = actor.send_message(EntityMsg::Passivate(done_tx)) {
                    tracing::debug!(entity = %address, %error, "could not passivate; stopping");
                    actor.stop(Some("passivated".to_owned()));
                }
            }
            Life::Asleep(None) => return None,
            Life::Asleep(Some(state)) => self.passivate_asleep(address, state, done_tx),
        }
        Some(done_rx)
    }

    /// Runs a sleeping entity's passivation hook on a task of its own.
    fn passivate_asleep(
        &self,
        address: &EntityAddress,
        state: AnyState,
        done: oneshot::Sender<()>,
    ) {
        let Some(def) = self.shared.registry.get(&address.entity_type).cloned() else {
            return;
        };
        let ctx = ActivationContext {
            address: address.clone(),
            shard: self.shard,
            epoch: self.epoch,
            runner_id: self.shared.runner_id(),
        };
        tokio::spawn(async move {
            passivate_state(def.as_ref(), &ctx, state).await;
            let _ = done.send(());
        });
    }

    /// Passivates every entity of a drained shard and waits for their hooks (each bounded
    /// by its type's `passivation_timeout`, so a lost reply cannot hold the shard).
    pub(super) async fn passivate_all(&mut self) {
        let longest = self
            .entities
            .keys()
            .map(|a| {
                self.shared
                    .registry
                    .get(&a.entity_type)
                    .map_or(Duration::ZERO, |def| def.options().passivation_timeout)
            })
            .max()
            .unwrap_or(Duration::ZERO);
        let addresses: Vec<EntityAddress> = self.entities.keys().cloned().collect();
        let hooks: Vec<_> = addresses
            .iter()
            .filter_map(|address| self.passivate_slot(address))
            .collect();
        let all = futures::future::join_all(hooks);
        let _ = tokio::time::timeout(longest + PASSIVATION_GRACE, all).await;
    }

    /// Removes an entity's slot and fails its unfinished work; returns how it was kept (an
    /// actor still running, for the caller to stop or passivate, or its sleeping state).
    pub(super) fn forget_slot(&mut self, address: &EntityAddress, why: &str) -> Option<Life> {
        let slot = self.entities.remove(address)?;
        if let Life::Awake(actor) = &slot.life {
            self.by_actor.remove(&actor.get_id());
            self.count_awake_down();
        }
        let resident = self.shared.resident.fetch_sub(1, Ordering::Relaxed) - 1;
        crate::metrics::entities_resident(resident);
        for (_, pending) in slot.pending {
            match pending {
                Pending::Persisted(id) => {
                    self.in_flight.remove(&id);
                }
                Pending::Volatile(tx) => {
                    let _ = tx.send(Err(DeliveryError::HandlerFailed(why.to_owned())));
                }
            }
        }
        Some(slot.life)
    }

    pub(super) fn stop_everything(&mut self) {
        if let Some(ticker) = self.ticker.take() {
            ticker.abort();
        }
        if let Some((_, timer)) = self.due_timer.take() {
            timer.abort();
        }
        let ids: Vec<EntityAddress> = self.entities.keys().cloned().collect();
        for id in ids {
            self.remove_slot(&id, "shard stopped");
        }
        for (_, waiting) in self.waiters.drain() {
            for waiter in waiting.callers {
                let _ = waiter.send(Err(DeliveryError::ShardMoving(self.shard)));
            }
        }
        if let Some(done) = self.draining.take() {
            let _ = done.send(());
        }
    }
}
