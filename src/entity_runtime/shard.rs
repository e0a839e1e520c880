//! The supervisor of one owned shard: admits deliveries, owns the entity actors of the
//! shard, scans the shard's backlog, restarts failed entities with backoff, and drains or
//! stops with the shard. All of the shard's in-memory bookkeeping has this one owner.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::entity_actor::{EntityActor, EntityArgs, EntityMsg, Work};
use super::{Delivery, DeliveryError, EntityStatus, Shared, older_than};
use crate::ids::{EntityAddress, Epoch, MessageId, ShardId};
use crate::message_storage::{Completion, Reply, StoredMessage};

type ReplyTx = oneshot::Sender<Result<Reply, DeliveryError>>;

/// What became of one piece of work.
#[derive(Debug)]
pub(crate) enum WorkOutcome {
    /// A persisted message's final reply (committed now or earlier).
    Replied(Reply),
    /// A volatile message's reply.
    Volatile(Reply),
    /// The shard's epoch moved on: this runner no longer owns it.
    Fenced,
    /// Completion could not be written; the message stays in storage.
    StorageFailed(String),
}

pub(crate) enum ShardMsg {
    Deliver(Delivery, ReplyTx),
    Done {
        address: EntityAddress,
        seq: u64,
        id: Option<MessageId>,
        outcome: WorkOutcome,
    },
    Scan {
        initial: bool,
    },
    Scanned {
        messages: Vec<StoredMessage>,
        initial: bool,
        next_due: Option<chrono::DateTime<Utc>>,
    },
    ScanFailed(String),
    Tick,
    Status(EntityAddress, oneshot::Sender<EntityStatus>),
    Drain(oneshot::Sender<()>),
    Fence,
}

pub(crate) struct ShardActor;

pub(crate) struct ShardArgs {
    pub(crate) shard: ShardId,
    pub(crate) epoch: Epoch,
    pub(crate) shared: Arc<Shared>,
}

enum Pending {
    Persisted(MessageId),
    Volatile(ReplyTx),
}

struct Slot {
    actor: ActorRef<EntityMsg>,
    /// Unfinished work by the shard's sequence number, in the order it was handed over.
    pending: VecDeque<(u64, Pending)>,
    last_active: Instant,
    max_idle: Duration,
}

const RECENT_REPLIES: usize = 4096;

pub(crate) struct ShardState {
    shard: ShardId,
    epoch: Epoch,
    shared: Arc<Shared>,
    entities: HashMap<EntityAddress, Slot>,
    next_seq: u64,
    by_actor: HashMap<ActorId, EntityAddress>,
    waiters: HashMap<MessageId, Vec<ReplyTx>>,
    in_flight: HashSet<MessageId>,
    recent: HashMap<MessageId, Reply>,
    recent_order: VecDeque<MessageId>,
    /// Entities whose backlog is (partly) only in storage: pushes for them wait for a scan.
    overflowed: HashSet<EntityAddress>,
    /// Restart count and the instant until which a failed entity stays down.
    backoff: HashMap<EntityAddress, (u32, Instant)>,
    last_errors: HashMap<EntityAddress, String>,
    scanning: bool,
    rescan: bool,
    draining: Option<oneshot::Sender<()>>,
    ticker: Option<JoinHandle<()>>,
    due_timer: Option<(chrono::DateTime<Utc>, JoinHandle<()>)>,
}

impl Actor for ShardActor {
    type Msg = ShardMsg;
    type State = ShardState;
    type Arguments = ShardArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ShardMsg>,
        args: ShardArgs,
    ) -> Result<ShardState, ActorProcessingErr> {
        // Passivation granularity; backlog scans are driven by the runtime's sweep.
        let tick_every = args
            .shared
            .config
            .scan_interval
            .max(Duration::from_millis(50));
        let ticker_ref = myself.clone();
        let ticker = tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick_every);
            loop {
                interval.tick().await;
                if ticker_ref.send_message(ShardMsg::Tick).is_err() {
                    break;
                }
            }
        });
        Ok(ShardState {
            shard: args.shard,
            epoch: args.epoch,
            shared: args.shared,
            entities: HashMap::new(),
            next_seq: 0,
            by_actor: HashMap::new(),
            waiters: HashMap::new(),
            in_flight: HashSet::new(),
            recent: HashMap::new(),
            recent_order: VecDeque::new(),
            overflowed: HashSet::new(),
            backoff: HashMap::new(),
            last_errors: HashMap::new(),
            scanning: false,
            rescan: false,
            draining: None,
            ticker: Some(ticker),
            due_timer: None,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<ShardMsg>,
        state: &mut ShardState,
    ) -> Result<(), ActorProcessingErr> {
        state.stop_everything();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<ShardMsg>,
        message: ShardMsg,
        state: &mut ShardState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ShardMsg::Deliver(delivery, reply) => state.admit(&myself, delivery, reply).await,
            ShardMsg::Done {
                address,
                seq,
                id,
                outcome,
            } => state.done(&myself, address, seq, id, outcome),
            ShardMsg::Scan { initial } => state.start_scan(&myself, initial),
            ShardMsg::Scanned {
                messages,
                initial,
                next_due,
            } => state.scanned(&myself, messages, initial, next_due).await,
            ShardMsg::ScanFailed(error) => {
                tracing::warn!(shard = %state.shard, %error, "backlog scan failed");
                state.scanning = false;
            }
            ShardMsg::Tick => state.tick(&myself),
            ShardMsg::Status(address, tx) => {
                let _ = tx.send(state.status(&address));
            }
            ShardMsg::Drain(done) => {
                state.draining = Some(done);
                state.refuse_waiters();
            }
            ShardMsg::Fence => {
                tracing::warn!(shard = %state.shard, "fenced: stopping entities at once");
                myself.stop(Some("fenced".to_owned()));
                return Ok(());
            }
        }
        if state.drained() {
            if let Some(done) = state.draining.take() {
                let _ = done.send(());
            }
            myself.stop(Some("drained".to_owned()));
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<ShardMsg>,
        event: SupervisionEvent,
        state: &mut ShardState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, error) => {
                state.entity_failed(&myself, cell.get_id(), error.to_string());
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                // Normal stops are ours (passivation, shard stop); the slot is already gone
                // unless the actor stopped by itself.
                if let Some(address) = state.by_actor.remove(&cell.get_id()) {
                    state.remove_slot(&address, "entity stopped");
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl ShardState {
    async fn admit(&mut self, myself: &ActorRef<ShardMsg>, delivery: Delivery, reply: ReplyTx) {
        match delivery {
            Delivery::Persisted { message, duplicate } => {
                let id = message.id;
                if let Some(stored) = self.recent.get(&id) {
                    let _ = reply.send(Ok(stored.clone()));
                    return;
                }
                if self.draining.is_some() {
                    let _ = reply.send(Err(DeliveryError::ShardMoving(self.shard)));
                    return;
                }
                self.waiters.entry(id).or_default().push(reply);
                if self.in_flight.contains(&id) {
                    return;
                }
                let future = message.deliver_at.is_some_and(|at| at > Utc::now());
                if duplicate || future {
                    // The stored message runs (when due); a scan brings it.
                    if let Some(at) = message.deliver_at.filter(|_| future) {
                        self.arm_due_timer(myself, at);
                    } else {
                        self.request_scan(myself);
                    }
                    return;
                }
                if !self.dispatch_persisted(myself, message, false).await {
                    self.request_scan(myself);
                }
            }
            Delivery::Volatile {
                address,
                tag,
                payload,
            } => {
                if self.draining.is_some() {
                    let _ = reply.send(Err(DeliveryError::ShardMoving(self.shard)));
                    return;
                }
                let capacity = self.capacity(&address);
                self.next_seq += 1;
                let seq = self.next_seq;
                let slot = match self.activate(myself, &address).await {
                    Ok(slot) => slot,
                    Err(error) => {
                        let _ = reply.send(Err(error));
                        return;
                    }
                };
                if slot.pending.len() >= capacity {
                    crate::metrics::mailbox_full();
                    let _ = reply.send(Err(DeliveryError::MailboxFull(address.to_string())));
                    return;
                }
                let work = Work {
                    seq,
                    id: None,
                    tag,
                    payload,
                    attempts: 0,
                };
                if slot.actor.send_message(EntityMsg::Work(work)).is_ok() {
                    slot.pending.push_back((seq, Pending::Volatile(reply)));
                    slot.last_active = Instant::now();
                } else {
                    let _ = reply.send(Err(DeliveryError::ShardMoving(self.shard)));
                }
            }
        }
    }

    fn capacity(&self, address: &EntityAddress) -> usize {
        self.capacity_of(address, |o| o.mailbox_capacity.get())
    }

    /// An option of the entity's type (1 for an unknown type).
    fn capacity_of(
        &self,
        address: &EntityAddress,
        option: impl Fn(&crate::entity::EntityOptions) -> usize,
    ) -> usize {
        self.shared
            .registry
            .get(&address.entity_type)
            .map_or(1, |def| option(def.options()))
    }

    /// Starts (or finds) the entity's actor.
    async fn activate(
        &mut self,
        myself: &ActorRef<ShardMsg>,
        address: &EntityAddress,
    ) -> Result<&mut Slot, DeliveryError> {
        if !self.entities.contains_key(address) {
            if let Some((_, until)) = self.backoff.get(address)
                && Instant::now() < *until
            {
                return Err(DeliveryError::HandlerFailed(format!(
                    "{address} is restarting after a failure"
                )));
            }
            let def = self
                .shared
                .registry
                .get(&address.entity_type)
                .cloned()
                .ok_or_else(|| DeliveryError::UnknownEntityType(address.entity_type.to_string()))?;
            let resident = &self.shared.resident;
            if resident.load(Ordering::Relaxed) >= self.shared.config.max_resident_entities {
                return Err(DeliveryError::Overloaded);
            }
            let max_idle = def.options().max_idle;
            let args = EntityArgs {
                address: address.clone(),
                shard: self.shard,
                epoch: self.epoch,
                def,
                shared: self.shared.clone(),
                shard_ref: myself.clone(),
            };
            let (actor, _) = Actor::spawn_linked(None, EntityActor, args, myself.get_cell())
                .await
                .map_err(|e| DeliveryError::HandlerFailed(e.to_string()))?;
            resident.fetch_add(1, Ordering::Relaxed);
            crate::metrics::entities_resident(resident.load(Ordering::Relaxed));
            self.by_actor.insert(actor.get_id(), address.clone());
            self.entities.insert(
                address.clone(),
                Slot {
                    actor,
                    pending: VecDeque::new(),
                    last_active: Instant::now(),
                    max_idle,
                },
            );
        }
        self.entities
            .get_mut(address)
            .ok_or(DeliveryError::ShardMoving(self.shard))
    }

    /// Hands a stored message to its entity if there is room and it keeps the entity's
    /// order; returns false if it stays in storage for a later scan.
    async fn dispatch_persisted(
        &mut self,
        myself: &ActorRef<ShardMsg>,
        message: StoredMessage,
        from_scan: bool,
    ) -> bool {
        let entity = message.address.clone();
        if self.draining.is_some() || (!from_scan && self.overflowed.contains(&entity)) {
            return false;
        }
        if message.attempts >= self.shared.config.max_attempts {
            self.give_up(myself, message);
            return true;
        }
        let capacity = self.capacity(&message.address);
        self.next_seq += 1;
        let seq = self.next_seq;
        let slot = match self.activate(myself, &message.address).await {
            Ok(slot) if slot.pending.len() < capacity => slot,
            _ => {
                self.overflowed.insert(entity);
                return false;
            }
        };
        let work = Work {
            seq,
            id: Some(message.id),
            tag: message.tag,
            payload: message.payload,
            attempts: message.attempts,
        };
        if slot.actor.send_message(EntityMsg::Work(work)).is_err() {
            return false;
        }
        slot.pending
            .push_back((seq, Pending::Persisted(message.id)));
        slot.last_active = Instant::now();
        self.in_flight.insert(message.id);
        true
    }

    /// A message that failed `max_attempts` times gets an error reply instead of another
    /// attempt: reported once, never looping.
    fn give_up(&mut self, myself: &ActorRef<ShardMsg>, message: StoredMessage) {
        tracing::error!(
            shard = %self.shard,
            message_id = %message.id,
            entity = %message.address,
            attempts = message.attempts,
            "message failed too many times; completing it with an error"
        );
        self.in_flight.insert(message.id);
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
        let completion = Completion {
            message_id: message.id,
            shard: self.shard,
            epoch: self.epoch,
            reply: reply.clone(),
            state: None,
        };
        let storage = self.shared.storage.clone();
        let myself = myself.clone();
        let address = message.address;
        tokio::spawn(async move {
            let outcome = match storage.complete(completion).await {
                Ok(_) => match storage.reply(message.id).await {
                    Ok(Some(stored)) => WorkOutcome::Replied(stored),
                    _ => WorkOutcome::Replied(reply),
                },
                Err(error) => WorkOutcome::StorageFailed(error.to_string()),
            };
            // Not in the entity's slot: no sequence number matches.
            let _ = myself.send_message(ShardMsg::Done {
                address,
                seq: 0,
                id: Some(message.id),
                outcome,
            });
        });
    }

    fn done(
        &mut self,
        myself: &ActorRef<ShardMsg>,
        address: EntityAddress,
        seq: u64,
        id: Option<MessageId>,
        outcome: WorkOutcome,
    ) {
        // In order for one-at-a-time entities, in any order for side-by-side ones; a
        // give-up was never in the slot.
        let pending = self.entities.get_mut(&address).and_then(|slot| {
            slot.last_active = Instant::now();
            let at = slot.pending.iter().position(|(s, _)| *s == seq)?;
            slot.pending.remove(at).map(|(_, pending)| pending)
        });
        match (id, outcome) {
            (None, WorkOutcome::Volatile(reply)) => {
                if let Some(Pending::Volatile(tx)) = pending {
                    let _ = tx.send(Ok(reply));
                }
            }
            (Some(id), outcome) => {
                self.in_flight.remove(&id);
                self.finish_persisted(myself, id, outcome);
            }
            (None, _) => {}
        }
        if self.overflowed.contains(&address) {
            self.request_scan(myself);
        }
    }

    fn finish_persisted(
        &mut self,
        myself: &ActorRef<ShardMsg>,
        id: MessageId,
        outcome: WorkOutcome,
    ) {
        match outcome {
            WorkOutcome::Replied(reply) | WorkOutcome::Volatile(reply) => {
                crate::metrics::message_processed();
                for waiter in self.waiters.remove(&id).unwrap_or_default() {
                    let _ = waiter.send(Ok(reply.clone()));
                }
                self.remember(id, reply);
            }
            WorkOutcome::Fenced => {
                tracing::warn!(shard = %self.shard, epoch = %self.epoch, "completion refused: epoch moved on");
                for waiter in self.waiters.remove(&id).unwrap_or_default() {
                    let _ = waiter.send(Err(DeliveryError::ShardMoving(self.shard)));
                }
                let _ = myself.send_message(ShardMsg::Fence);
            }
            WorkOutcome::StorageFailed(error) => {
                // Still unprocessed in storage: a later scan delivers it again.
                tracing::warn!(shard = %self.shard, message_id = %id, %error, "completion failed");
            }
        }
    }

    fn remember(&mut self, id: MessageId, reply: Reply) {
        if self.recent.insert(id, reply).is_none() {
            self.recent_order.push_back(id);
        }
        while self.recent_order.len() > RECENT_REPLIES {
            if let Some(old) = self.recent_order.pop_front() {
                self.recent.remove(&old);
            }
        }
    }

    fn request_scan(&mut self, myself: &ActorRef<ShardMsg>) {
        if self.scanning {
            self.rescan = true;
        } else {
            self.start_scan(myself, false);
        }
    }

    fn start_scan(&mut self, myself: &ActorRef<ShardMsg>, initial: bool) {
        if self.scanning {
            self.rescan = true;
            return;
        }
        self.scanning = true;
        self.rescan = false;
        let storage = self.shared.storage.clone();
        let shard = self.shard;
        let limit = self.shared.config.scan_batch;
        let myself = myself.clone();
        tokio::spawn(async move {
            let now = Utc::now();
            let result = async {
                let messages = storage.unprocessed(shard, now, limit).await?;
                let next_due = storage.next_due(shard, now).await?;
                Ok::<_, crate::message_storage::MessageStorageError>((messages, next_due))
            }
            .await;
            let message = match result {
                Ok((messages, next_due)) => ShardMsg::Scanned {
                    messages,
                    initial,
                    next_due,
                },
                Err(error) => ShardMsg::ScanFailed(error.to_string()),
            };
            let _ = myself.send_message(message);
        });
    }

    async fn scanned(
        &mut self,
        myself: &ActorRef<ShardMsg>,
        messages: Vec<StoredMessage>,
        initial: bool,
        next_due: Option<chrono::DateTime<Utc>>,
    ) {
        self.scanning = false;
        let full = messages.len() >= self.shared.config.scan_batch;
        let grace = self.shared.config.scan_grace;
        let mut blocked: HashSet<EntityAddress> = HashSet::new();
        let mut redelivered = Vec::new();
        for message in messages {
            let entity = message.address.clone();
            if self.in_flight.contains(&message.id)
                || self.recent.contains_key(&message.id)
                || blocked.contains(&entity)
            {
                continue;
            }
            // Young unscheduled messages are probably being pushed right now; leave them
            // unless the entity's backlog is only in storage.
            let young = message.deliver_at.is_none() && !older_than(message.id, grace);
            if !initial && young && !self.overflowed.contains(&entity) {
                continue;
            }
            let id = message.id;
            if self.dispatch_persisted(myself, message, true).await {
                redelivered.push(id);
            } else {
                blocked.insert(entity);
            }
        }
        if !full {
            self.overflowed.retain(|e| blocked.contains(e));
        }
        if !redelivered.is_empty() {
            crate::metrics::messages_redelivered(redelivered.len());
            let storage = self.shared.storage.clone();
            tokio::spawn(async move {
                if let Err(error) = storage.record_attempts(&redelivered).await {
                    tracing::warn!(%error, "could not record delivery attempts");
                }
            });
        }
        if let Some(at) = next_due {
            self.arm_due_timer(myself, at);
        }
        if self.rescan || (full && blocked.is_empty()) {
            self.start_scan(myself, false);
        }
    }

    fn arm_due_timer(&mut self, myself: &ActorRef<ShardMsg>, at: chrono::DateTime<Utc>) {
        if let Some((current, _)) = &self.due_timer
            && *current <= at
            && *current > Utc::now()
        {
            return;
        }
        if let Some((_, old)) = self.due_timer.take() {
            old.abort();
        }
        let wait = (at - Utc::now()).to_std().unwrap_or_default();
        let myself = myself.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let _ = myself.send_message(ShardMsg::Scan { initial: false });
        });
        self.due_timer = Some((at, timer));
    }

    fn tick(&mut self, myself: &ActorRef<ShardMsg>) {
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
            self.remove_slot(&address, "passivated");
        }
        self.backoff
            .retain(|_, (_, until)| *until + Duration::from_secs(60) > now);
        // Entities whose backlog waits in storage (full mailbox, resident cap) get another
        // chance even if no completion woke us.
        if !self.overflowed.is_empty() {
            self.request_scan(myself);
        }
    }

    fn remove_slot(&mut self, address: &EntityAddress, why: &str) {
        if let Some(slot) = self.entities.remove(address) {
            self.by_actor.remove(&slot.actor.get_id());
            slot.actor.stop(Some(why.to_owned()));
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
        }
    }

    fn entity_failed(&mut self, myself: &ActorRef<ShardMsg>, actor: ActorId, error: String) {
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
        self.last_errors.insert(address.clone(), error.clone());
        self.remove_slot(&address, &format!("handler failed: {error}"));
        let (count, until) = self
            .backoff
            .entry(address.clone())
            .or_insert((0, Instant::now()));
        *count += 1;
        let delay = self.shared.config.restart_backoff * 2u32.pow((*count - 1).min(5));
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
            let _ = myself.send_message(ShardMsg::Scan { initial: false });
        });
    }

    fn status(&self, address: &EntityAddress) -> EntityStatus {
        let slot = self.entities.get(address);
        EntityStatus {
            resident: slot.is_some(),
            mailbox_depth: slot.map_or(0, |s| s.pending.len()),
            last_error: self.last_errors.get(address).cloned(),
        }
    }

    /// While draining, callers waiting on messages not in flight go elsewhere.
    fn refuse_waiters(&mut self) {
        let in_flight = &self.in_flight;
        let shard = self.shard;
        self.waiters.retain(|id, waiters| {
            if in_flight.contains(id) {
                return true;
            }
            for waiter in waiters.drain(..) {
                let _ = waiter.send(Err(DeliveryError::ShardMoving(shard)));
            }
            false
        });
    }

    fn drained(&self) -> bool {
        self.draining.is_some()
            && self.entities.values().all(|s| s.pending.is_empty())
            && self.in_flight.is_empty()
    }

    fn stop_everything(&mut self) {
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
        for (_, waiters) in self.waiters.drain() {
            for waiter in waiters {
                let _ = waiter.send(Err(DeliveryError::ShardMoving(self.shard)));
            }
        }
        if let Some(done) = self.draining.take() {
            let _ = done.send(());
        }
    }
}
