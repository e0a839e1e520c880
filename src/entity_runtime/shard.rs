//! The supervisor of one owned shard: admits deliveries, owns the entity actors of the
//! shard, scans the shard's backlog, restarts failed entities with backoff, and drains or
//! stops with the shard. All of the shard's in-memory bookkeeping has this one owner.
//!
//! Every caller waiting on a persisted message is answered with what storage holds: the
//! reply a completion committed, a stored reply read back (a duplicate whose original was
//! completed elsewhere or long ago, a completion that committed but reported an error),
//! or an error (the shard moved; the transport's deadline). Per-entity maps are bounded:
//! live entities by the runner's resident cap, last errors by [`LAST_ERRORS_PER_SHARD`],
//! restart backoffs by [`BACKOFFS_PER_SHARD`], overflowed entities by the stored backlog
//! (each has unprocessed rows; a finished scan pass prunes the rest), waiters by their
//! callers (closed ones are dropped every tick).

mod answers;
mod recovery;
mod scan;
mod slots;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::Shared;
use super::bounded::BoundedMap;
use super::entity_actor::{EntityActor, EntityArgs, EntityMsg, Work};
use crate::entity::{AnyState, ErasedEntity};
use crate::ids::{EntityAddress, Epoch, MessageId, ShardId};
use crate::message_storage::StoredMessage;
use crate::transport::{Delivery, DeliveryError, EntityStatus};

pub(crate) use super::mailbox::{ReplyTx, ScanKind, ShardMsg, WorkOutcome};
use answers::Waiting;
use scan::ScanState;

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

/// Where a stored message comes from when it is dispatched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Pushed by its sender: it waits behind an overflowed entity's stored backlog.
    Push,
    /// Found by a backlog scan, which delivers in id order.
    Scan,
}

/// What became of a stored message handed to [`ShardState::dispatch_persisted`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dispatch {
    /// Given to its entity: one more delivery attempt.
    Delivered,
    /// Left in storage for a later scan (no room, or it would overtake older ones).
    Stays,
    /// Dealt with without running it: completed with an error, or postponed.
    Settled,
}

/// Distinct entities whose last error a shard remembers (for explain).
pub(crate) const LAST_ERRORS_PER_SHARD: usize = 64;
/// Longest last error kept, in bytes (longer ones are cut).
const LAST_ERROR_BYTES: usize = 512;
/// Distinct entities whose restart backoff a shard remembers; past it the oldest entry is
/// forgotten (that entity restarts without waiting out its backoff).
const BACKOFFS_PER_SHARD: usize = 4096;
/// Shortest interval of the shard's tick (passivation, waiter rechecks).
const TICK_MIN: Duration = Duration::from_millis(50);

/// How a resident entity is kept.
enum Life {
    /// An actor runs it.
    Awake(ActorRef<EntityMsg>),
    /// Idle past `sleep_after`: no actor, only the state its last actor built (`None` if
    /// it never activated). The next message starts an actor from that state; the hooks
    /// do not run (the entity stays activated).
    Asleep(Option<AnyState>),
}

struct Slot {
    life: Life,
    /// Unfinished work by the shard's sequence number, in the order it was handed over.
    pending: VecDeque<(u64, Pending)>,
    last_active: Instant,
    max_idle: Duration,
}

impl Slot {
    fn actor(&self) -> Option<&ActorRef<EntityMsg>> {
        match &self.life {
            Life::Awake(actor) => Some(actor),
            Life::Asleep(_) => None,
        }
    }

    /// Hands work to the entity's actor (the slot is awake after `activate`).
    fn send(&self, work: Work) -> bool {
        self.actor()
            .is_some_and(|actor| actor.send_message(EntityMsg::Work(work)).is_ok())
    }
}

pub(crate) struct ShardState {
    shard: ShardId,
    epoch: Epoch,
    shared: Arc<Shared>,
    entities: HashMap<EntityAddress, Slot>,
    next_seq: u64,
    by_actor: HashMap<ActorId, EntityAddress>,
    waiters: HashMap<MessageId, Waiting>,
    /// Messages being handled, completed or postponed here (scans skip them).
    in_flight: HashSet<MessageId>,
    /// Messages whose stored reply is being read.
    looking_up: HashSet<MessageId>,
    /// Entities whose backlog is (partly) only in storage: pushes for them wait for a scan.
    overflowed: HashSet<EntityAddress>,
    /// Restart count and the instant until which a failed entity stays down.
    backoff: BoundedMap<EntityAddress, (u32, Instant)>,
    last_errors: BoundedMap<EntityAddress, String>,
    scan: ScanState,
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
        let tick_every = args.shared.config.scan_interval.max(TICK_MIN);
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
            looking_up: HashSet::new(),
            overflowed: HashSet::new(),
            backoff: BoundedMap::new(BACKOFFS_PER_SHARD),
            last_errors: BoundedMap::new(LAST_ERRORS_PER_SHARD),
            scan: ScanState::default(),
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
            ShardMsg::Scan(kind) => state.request_scan(&myself, kind),
            ShardMsg::Scanned { messages, next_due } => {
                state.scanned(&myself, messages, next_due).await;
            }
            ShardMsg::ScanFailed(error) => state.scan_failed(&myself, error),
            ShardMsg::StoredReply { id, reply } => state.stored_reply(id, reply),
            ShardMsg::Postponed(id) => {
                state.in_flight.remove(&id);
            }
            ShardMsg::Tick => state.tick(&myself).await,
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
            state.passivate_all().await;
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
                if let Some(stored) = self.shared.recent.get(id) {
                    let _ = reply.send(Ok(stored));
                    return;
                }
                if self.draining.is_some() {
                    let _ = reply.send(Err(DeliveryError::ShardMoving(self.shard)));
                    return;
                }
                self.add_waiter(id, reply);
                if self.in_flight.contains(&id) {
                    return;
                }
                let future = message.deliver_at.is_some_and(|at| at > Utc::now());
                if duplicate || future {
                    // The stored message runs (when due); a scan brings it.
                    if let Some(at) = message.deliver_at.filter(|_| future) {
                        self.arm_due_timer(myself, at);
                    } else {
                        self.request_scan(myself, ScanKind::Settled);
                    }
                    if duplicate {
                        // Its original may have been completed long ago or elsewhere.
                        self.look_up(myself, id);
                    }
                    return;
                }
                if self.dispatch_persisted(myself, message, Source::Push).await == Dispatch::Stays {
                    self.request_scan(myself, ScanKind::Settled);
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
                if slot.send(work) {
                    slot.pending.push_back((seq, Pending::Volatile(reply)));
                    slot.last_active = Instant::now();
                } else {
                    let _ = reply.send(Err(DeliveryError::ShardMoving(self.shard)));
                }
            }
        }
    }

    fn capacity(&self, address: &EntityAddress) -> usize {
        self.capacity_of(address, |def| def.options().mailbox_capacity.get())
    }

    /// An option of the entity's type (1 for an unknown type).
    fn capacity_of(
        &self,
        address: &EntityAddress,
        option: impl Fn(&dyn crate::entity::ErasedEntity) -> usize,
    ) -> usize {
        self.shared
            .registry
            .get(&address.entity_type)
            .map_or(1, |def| option(def.as_ref()))
    }

    /// Finds the entity's actor, or starts one: from the state it slept with, or, for an
    /// entity that is not resident, fresh (if the resident cap and its backoff allow).
    async fn activate(
        &mut self,
        myself: &ActorRef<ShardMsg>,
        address: &EntityAddress,
    ) -> Result<&mut Slot, DeliveryError> {
        match self.entities.get_mut(address).map(|slot| &mut slot.life) {
            Some(Life::Awake(_)) => {}
            Some(Life::Asleep(state)) => {
                let state = state.take();
                let woken = match self.definition(address) {
                    Ok(def) => self.spawn_entity(myself, address, def, state).await,
                    Err(error) => Err(error),
                };
                match woken {
                    Ok(actor) => {
                        if let Some(slot) = self.entities.get_mut(address) {
                            slot.life = Life::Awake(actor);
                        }
                    }
                    Err(error) => {
                        self.remove_slot(address, "could not wake");
                        return Err(error);
                    }
                }
            }
            None => {
                if let Some((_, until)) = self.backoff.get(address)
                    && Instant::now() < *until
                {
                    return Err(DeliveryError::HandlerFailed(format!(
                        "{address} is restarting after a failure"
                    )));
                }
                let def = self.definition(address)?;
                let max_idle = def.options().max_idle;
                let resident = &self.shared.resident;
                if resident.load(Ordering::Relaxed) >= self.shared.config.max_resident_entities {
                    return Err(DeliveryError::Overloaded);
                }
                let actor = self.spawn_entity(myself, address, def, None).await?;
                let resident = self.shared.resident.fetch_add(1, Ordering::Relaxed) + 1;
                crate::metrics::entities_resident(resident);
                self.entities.insert(
                    address.clone(),
                    Slot {
                        life: Life::Awake(actor),
                        pending: VecDeque::new(),
                        last_active: Instant::now(),
                        max_idle,
                    },
                );
            }
        }
        self.entities
            .get_mut(address)
            .ok_or(DeliveryError::ShardMoving(self.shard))
    }

    /// The entity's type, if this runner hosts it.
    fn definition(&self, address: &EntityAddress) -> Result<Arc<dyn ErasedEntity>, DeliveryError> {
        self.shared
            .registry
            .get(&address.entity_type)
            .cloned()
            .ok_or_else(|| DeliveryError::UnknownEntityType(address.entity_type.to_string()))
    }

    /// Starts an actor for the entity, supervised by this shard.
    async fn spawn_entity(
        &mut self,
        myself: &ActorRef<ShardMsg>,
        address: &EntityAddress,
        def: Arc<dyn ErasedEntity>,
        state: Option<AnyState>,
    ) -> Result<ActorRef<EntityMsg>, DeliveryError> {
        let args = EntityArgs {
            address: address.clone(),
            shard: self.shard,
            epoch: self.epoch,
            def,
            shared: self.shared.clone(),
            shard_ref: myself.clone(),
            state,
        };
        let (actor, _) = Actor::spawn_linked(None, EntityActor, args, myself.get_cell())
            .await
            .map_err(|e| DeliveryError::HandlerFailed(e.to_string()))?;
        let awake = self.shared.awake.fetch_add(1, Ordering::Relaxed) + 1;
        crate::metrics::entities_awake(awake);
        self.by_actor.insert(actor.get_id(), address.clone());
        Ok(actor)
    }

    /// Hands a stored message to its entity if there is room and it keeps the entity's
    /// order.
    async fn dispatch_persisted(
        &mut self,
        myself: &ActorRef<ShardMsg>,
        message: StoredMessage,
        source: Source,
    ) -> Dispatch {
        let entity = message.address.clone();
        if self.draining.is_some() || (source == Source::Push && self.overflowed.contains(&entity))
        {
            return Dispatch::Stays;
        }
        if self.shared.registry.get(&entity.entity_type).is_none() {
            self.wait_for_type(myself, message);
            return Dispatch::Settled;
        }
        if message.attempts >= self.shared.config.max_attempts {
            self.give_up(myself, message);
            return Dispatch::Settled;
        }
        let capacity = self.capacity(&message.address);
        self.next_seq += 1;
        let seq = self.next_seq;
        let slot = match self.activate(myself, &message.address).await {
            Ok(slot) if slot.pending.len() < capacity => slot,
            _ => {
                self.overflowed.insert(entity);
                return Dispatch::Stays;
            }
        };
        let work = Work {
            seq,
            id: Some(message.id),
            tag: message.tag,
            payload: message.payload,
            attempts: message.attempts,
        };
        if !slot.send(work) {
            return Dispatch::Stays;
        }
        slot.pending
            .push_back((seq, Pending::Persisted(message.id)));
        slot.last_active = Instant::now();
        self.in_flight.insert(message.id);
        Dispatch::Delivered
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
            self.request_scan(myself, ScanKind::Settled);
        }
    }

    fn status(&self, address: &EntityAddress) -> EntityStatus {
        let slot = self.entities.get(address);
        EntityStatus {
            resident: slot.is_some(),
            mailbox_depth: slot.map_or(0, |s| s.pending.len()),
            last_error: self.last_errors.get(address).cloned(),
        }
    }

    fn drained(&self) -> bool {
        self.draining.is_some()
            && self.entities.values().all(|s| s.pending.is_empty())
            && self.in_flight.is_empty()
    }
}
