//! The shard's entity slots over their lives: idle entities passivated on the tick (their
//! passivation hook runs, nobody waits for it), a drained shard passivating everything and
//! waiting for the hooks (bounded), an entity removed at once (a failure, fencing), and the
//! shard stopping everything it holds. Removing a slot always answers the work that was
//! waiting on it, so no caller is left hanging.

use std::sync::atomic::Ordering;
use std::time::Duration;

use ractor::ActorRef;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{Pending, ScanKind, ShardMsg, ShardState, recovery};
use crate::entity_runtime::entity_actor::EntityMsg;
use crate::ids::EntityAddress;
use crate::transport::DeliveryError;

/// How much longer than the longest passivation timeout a drained shard waits for the
/// hooks of its entities (their actors enforce the timeout; this covers the handoff).
const PASSIVATION_GRACE: Duration = Duration::from_millis(100);

impl ShardState {
    pub(super) fn tick(&mut self, myself: &ActorRef<ShardMsg>) {
        let now = Instant::now();
        let idle: Vec<EntityAddress> = self
            .entities
            .iter()
            .filter(|(_, slot)| {
                slot.pending.is_empty() && now.duration_since(slot.last_active) >= slot.max_idle
            })
            .map(|(address, _)| address.clone())
            .collect();
        for address in idle {
            // Nobody waits for the hook: the next activation may start before it ends.
            drop(self.passivate_slot(&address));
        }
        self.backoff
            .retain(|_, (_, until)| *until + recovery::BACKOFF_KEPT > now);
        self.recheck_waiters(myself);
        // Entities whose backlog waits in storage (full mailbox, resident cap) get another
        // chance even if no completion woke us.
        if !self.overflowed.is_empty() {
            self.request_scan(myself, ScanKind::Settled);
        }
    }

    /// Stops an entity at once (no passivation hook) and fails its unfinished work.
    pub(super) fn remove_slot(&mut self, address: &EntityAddress, why: &str) {
        if let Some(actor) = self.forget_slot(address, why) {
            actor.stop(Some(why.to_owned()));
        }
    }

    /// Passivates an idle entity: it runs its passivation hook, then stops itself. The
    /// receiver resolves when the hook has returned (or the actor is gone).
    pub(super) fn passivate_slot(
        &mut self,
        address: &EntityAddress,
    ) -> Option<oneshot::Receiver<()>> {
        let actor = self.forget_slot(address, "passivated")?;
        let (done_tx, done_rx) = oneshot::channel();
        if let Err(error) = actor.send_message(EntityMsg::Passivate(done_tx)) {
            tracing::debug!(entity = %address, %error, "could not passivate; stopping");
            actor.stop(Some("passivated".to_owned()));
        }
        Some(done_rx)
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

    /// Removes an entity's slot and fails its unfinished work; returns its actor, still
    /// running, for the caller to stop or passivate.
    pub(super) fn forget_slot(
        &mut self,
        address: &EntityAddress,
        why: &str,
    ) -> Option<ActorRef<EntityMsg>> {
        let slot = self.entities.remove(address)?;
        self.by_actor.remove(&slot.actor.get_id());
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
        Some(slot.actor)
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
