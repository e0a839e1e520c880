//! The entity runtime of one runner: a ractor supervisor per owned shard, an actor per live
//! entity under it.
//!
//! - Deliveries (pushed by the transport, or found by a backlog scan) go to the shard's
//!   `shard::ShardActor`, which admits them against the entity's mailbox capacity and the
//!   runner's resident-entity cap and hands them to the entity's `entity_actor`.
//! - A persisted message that finds no room stays in storage; the entity is marked
//!   *overflowed*, newer pushes for it are left in storage too (so order is kept), and a
//!   backlog scan delivers them in id order once room frees.
//! - Each shard scans its backlog on acquisition, on a timer (messages older than a grace
//!   period, so it does not race pushes in flight), when room frees, and when the earliest
//!   scheduled message falls due.
//! - A handler that panics or fails retryably kills only its entity actor: the shard actor
//!   restarts it with backoff and replays its in-flight persisted messages from storage;
//!   after `max_attempts` a message is completed with an error reply instead of looping.
//! - A persisted message whose type this runner does not have waits in storage with backoff
//!   (`TypeNotDeployed` to its callers) and is completed with `unknown_entity_type` after
//!   `max_attempts` (see `shard/recovery.rs`).
//! - Replies completed recently are remembered runner-wide within a byte budget
//!   (`recent`); callers are otherwise answered from storage.
//! - Handlers reach other entities through their context with the runner's client
//!   ([`EntityRuntime::connect`]); for `persist_state` types their persisted sends ride on
//!   the completion of the message (a transactional outbox, see `entity/context.rs`), and
//!   are pushed to their owners once it commits.
//! - On drain the shard refuses new work, waits for in-flight work, then stops; on fencing
//!   it stops at once (its completions would be refused by the epoch check anyway).

mod bounded;
mod entity_actor;
mod mailbox;
mod recent;
mod shard;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use ractor::ActorRef;
use tokio::sync::{oneshot, watch};

use crate::client::ShoalClient;
use crate::entity::{EntityRegistry, Outbound};
use crate::ids::{EntityAddress, Epoch, MessageId, RunnerId, ShardId};
use crate::message_storage::{MessageStorage, Reply};
use crate::ownership::ShardLifecycle;
use crate::sharding::Sharding;
use crate::transport::wire::{Delivery, DeliveryError, EntityStatus};

use recent::RecentReplies;
use shard::{ScanKind, ShardActor, ShardArgs, ShardMsg};

/// How long the sweep lets a burst of shard acquisitions gather before it checks them for a
/// backlog in one query (a takeover acquires hundreds of shards within milliseconds).
const ACQUIRED_GATHER: Duration = Duration::from_millis(10);

/// How often [`EntityRuntime::standalone`] checks that every shard's actor has started.
const STANDALONE_START_POLL: Duration = Duration::from_millis(5);

/// Runtime settings (from `[runner]` in the config).
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// The cluster's sharding.
    pub sharding: Sharding,
    /// Most entities resident on this runner at once.
    pub max_resident_entities: usize,
    /// Interval of the backlog scan.
    pub scan_interval: Duration,
    /// A periodic scan ignores messages younger than this (they are being pushed).
    pub scan_grace: Duration,
    /// Rows read per scan.
    pub scan_batch: usize,
    /// Delivery attempts before a message that keeps failing gets an error reply.
    pub max_attempts: i32,
    /// First restart backoff of a failed entity (doubles up to 32 × this).
    pub restart_backoff: Duration,
    /// First wait of a persisted message whose entity type this runner does not have
    /// (doubles per attempt, up to 32 × this).
    pub type_wait_backoff: Duration,
    /// Bytes of recently completed replies the runner remembers (all shards together).
    pub recent_replies_bytes: usize,
    /// An entity idle this long (and not yet past its type's `max_idle`) goes to sleep: its
    /// actor stops and the shard keeps its state, so an idle entity costs its state and a
    /// map entry, not a task. The next message starts an actor from that state.
    pub sleep_after: Duration,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            sharding: Sharding::default(),
            max_resident_entities: 100_000,
            scan_interval: Duration::from_secs(1),
            scan_grace: Duration::from_millis(1500),
            scan_batch: 1000,
            max_attempts: 5,
            restart_backoff: Duration::from_millis(100),
            type_wait_backoff: Duration::from_secs(4),
            recent_replies_bytes: 16 * 1024 * 1024,
            sleep_after: Duration::from_secs(2),
        }
    }
}

pub(crate) struct Shared {
    registry: EntityRegistry,
    storage: Arc<dyn MessageStorage>,
    config: RuntimeConfig,
    runner_id: watch::Receiver<Option<RunnerId>>,
    resident: AtomicUsize,
    /// Resident entities that have an actor (the rest sleep).
    awake: AtomicUsize,
    recent: RecentReplies,
    /// How handlers reach other entities; set once, by [`EntityRuntime::connect`].
    client: OnceLock<ShoalClient>,
    /// The same client as handlers' contexts see it.
    outbound: OnceLock<Arc<dyn Outbound>>,
}

impl Shared {
    fn runner_id(&self) -> Option<RunnerId> {
        *self.runner_id.borrow()
    }

    fn outbound(&self) -> Option<Arc<dyn Outbound>> {
        self.outbound.get().cloned()
    }
}

/// The entity runtime of one runner. Cheap to clone.
#[derive(Clone)]
pub struct EntityRuntime {
    shared: Arc<Shared>,
    shards: Arc<Mutex<HashMap<ShardId, ActorRef<ShardMsg>>>>,
    /// Shards acquired since the last sweep: checked for a backlog in one query.
    acquired: Arc<Mutex<Vec<ShardId>>>,
    acquired_notify: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for EntityRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntityRuntime")
            .field("shards", &self.shards_lock().len())
            .field("resident", &self.resident())
            .finish()
    }
}

impl EntityRuntime {
    /// A runtime hosting `registry`'s types, backed by `storage`. `runner_id` follows the
    /// runner's current incarnation.
    pub fn new(
        registry: EntityRegistry,
        storage: Arc<dyn MessageStorage>,
        config: RuntimeConfig,
        runner_id: watch::Receiver<Option<RunnerId>>,
    ) -> Self {
        let recent = RecentReplies::new(config.recent_replies_bytes);
        Self {
            shared: Arc::new(Shared {
                registry,
                storage,
                config,
                runner_id,
                resident: AtomicUsize::new(0),
                awake: AtomicUsize::new(0),
                recent,
                client: OnceLock::new(),
                outbound: OnceLock::new(),
            }),
            shards: Arc::new(Mutex::new(HashMap::new())),
            acquired: Arc::new(Mutex::new(Vec::new())),
            acquired_notify: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// A runtime on in-memory storage that owns every shard under epoch 1: one process, no
    /// Postgres, no ownership loop (unit tests, benches). Returns once every shard runs, with
    /// the storage it uses.
    pub async fn standalone(
        registry: EntityRegistry,
        config: RuntimeConfig,
    ) -> (Self, crate::message_storage::memory::MemoryMessageStorage) {
        let storage = crate::message_storage::memory::MemoryMessageStorage::new();
        let sharding = config.sharding;
        let (_, runner_id) = watch::channel(RunnerId::new(1).ok());
        let runtime = Self::new(registry, Arc::new(storage.clone()), config, runner_id);
        for shard in sharding.all() {
            storage.set_epoch(shard, Epoch::new(1));
            runtime.acquired(shard, Epoch::new(1));
        }
        while runtime.shards().len() < sharding.all().count() {
            tokio::time::sleep(STANDALONE_START_POLL).await;
        }
        (runtime, storage)
    }

    fn shards_lock(&self) -> MutexGuard<'_, HashMap<ShardId, ActorRef<ShardMsg>>> {
        self.shards.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives handlers `client` to reach other entities with (`ctx.ask`, `ctx.send`,
    /// `ctx.schedule`). The runner connects its own client; until then (or in a runtime never
    /// connected) those calls answer
    /// [`crate::client::ClientError::NotConnected`]. Returns false (and
    /// changes nothing) if a client was connected before.
    pub fn connect(&self, client: ShoalClient) -> bool {
        let outbound: Arc<dyn Outbound> = Arc::new(client.clone());
        if self.shared.client.set(client).is_err() {
            return false;
        }
        let _ = self.shared.outbound.set(outbound);
        true
    }

    /// Entities resident on this runner.
    pub fn resident(&self) -> usize {
        self.shared.resident.load(Ordering::Relaxed)
    }

    /// Resident entities that have an actor now (the others sleep as data).
    pub fn awake(&self) -> usize {
        self.shared.awake.load(Ordering::Relaxed)
    }

    /// Estimated bytes of recently completed replies this runner remembers (at most
    /// `recent_replies_bytes`).
    pub fn recent_replies_bytes(&self) -> usize {
        self.shared.recent.bytes()
    }

    /// The registry of types this runtime hosts.
    pub fn registry(&self) -> &EntityRegistry {
        &self.shared.registry
    }

    /// The shards this runtime currently runs.
    pub fn shards(&self) -> Vec<ShardId> {
        let mut shards: Vec<ShardId> = self.shards_lock().keys().copied().collect();
        shards.sort();
        shards
    }

    /// Hands a message to its entity and waits for the reply. A volatile message of a type
    /// this runner does not have is refused; a persisted one is stored already, so its
    /// shard keeps it waiting for the type (`TypeNotDeployed`).
    pub async fn deliver(&self, delivery: Delivery) -> Result<Reply, DeliveryError> {
        let address = delivery.address();
        let volatile = matches!(delivery, Delivery::Volatile { .. });
        if volatile && self.shared.registry.get(&address.entity_type).is_none() {
            return Err(DeliveryError::UnknownEntityType(
                address.entity_type.to_string(),
            ));
        }
        let shard = self.shared.config.sharding.shard_of(&address.entity_id);
        let actor = self
            .shards_lock()
            .get(&shard)
            .cloned()
            .ok_or(DeliveryError::NotOwner(shard))?;
        let (reply_tx, reply_rx) = oneshot::channel();
        actor
            .send_message(ShardMsg::Deliver(delivery, reply_tx))
            .map_err(|_| DeliveryError::ShardMoving(shard))?;
        reply_rx
            .await
            .unwrap_or(Err(DeliveryError::ShardMoving(shard)))
    }

    /// What the runtime knows about one entity.
    pub async fn entity_status(&self, address: &EntityAddress) -> EntityStatus {
        let shard = self.shared.config.sharding.shard_of(&address.entity_id);
        let Some(actor) = self.shards_lock().get(&shard).cloned() else {
            return EntityStatus::default();
        };
        let (tx, rx) = oneshot::channel();
        if actor
            .send_message(ShardMsg::Status(address.clone(), tx))
            .is_err()
        {
            return EntityStatus::default();
        }
        rx.await.unwrap_or_default()
    }

    /// Every `scan_interval`, asks storage once which owned shards have a backlog older
    /// than the scan grace (pushes lost on the way, a previous owner's leftovers) and has
    /// those shards scan. Newly acquired shards are checked at once, in one query for all
    /// of them, and only those with unprocessed messages scan: a runner taking over hundreds
    /// of shards sends one query, not hundreds. One query per runner, however many shards
    /// it owns.
    pub async fn sweep_backlog(self, shutdown: tokio_util::sync::CancellationToken) {
        let mut interval = tokio::time::interval(self.shared.config.scan_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.acquired_notify.notified() => {
                    tokio::time::sleep(ACQUIRED_GATHER).await;
                    self.scan_acquired().await;
                    continue;
                }
                _ = interval.tick() => {}
            }
            let shards = self.shards();
            let before = crate::snowflake::id_before(self.shared.config.scan_grace);
            let found = self
                .shared
                .storage
                .shards_with_backlog(&shards, before, chrono::Utc::now())
                .await;
            match found {
                Ok(found) => {
                    let map = self.shards_lock();
                    for shard in found {
                        if let Some(actor) = map.get(&shard) {
                            let _ = actor.send_message(ShardMsg::Scan(ScanKind::Settled));
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, "backlog sweep failed"),
            }
        }
    }

    async fn scan_acquired(&self) {
        let acquired =
            std::mem::take(&mut *self.acquired.lock().unwrap_or_else(|e| e.into_inner()));
        if acquired.is_empty() {
            return;
        }
        // Everything unprocessed counts, scheduled or not: the scan also arms the due timer.
        let far_future = chrono::Utc::now() + chrono::Duration::days(36_500);
        let with_backlog = self
            .shared
            .storage
            .shards_with_backlog(&acquired, MessageId::new(i64::MAX), far_future)
            .await
            .unwrap_or_else(|error| {
                tracing::warn!(%error, "backlog check of acquired shards failed; scanning all");
                acquired.clone()
            });
        let map = self.shards_lock();
        for shard in with_backlog {
            if let Some(actor) = map.get(&shard) {
                let _ = actor.send_message(ShardMsg::Scan(ScanKind::Acquired));
            }
        }
    }

    async fn start_shard(self, shard: ShardId, epoch: Epoch) {
        let args = ShardArgs {
            shard,
            epoch,
            shared: self.shared.clone(),
        };
        match ractor::Actor::spawn(None, ShardActor, args).await {
            Ok((actor, _)) => {
                if let Some(old) = self.shards_lock().insert(shard, actor) {
                    old.stop(Some("replaced by a newer acquisition".to_owned()));
                }
                self.acquired
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(shard);
                self.acquired_notify.notify_one();
            }
            Err(error) => tracing::error!(%shard, %error, "cannot start shard supervisor"),
        }
    }
}

impl ShardLifecycle for EntityRuntime {
    fn acquired(&self, shard: ShardId, epoch: Epoch) {
        tokio::spawn(self.clone().start_shard(shard, epoch));
    }

    fn drain(&self, shard: ShardId) -> BoxFuture<'static, ()> {
        let actor = self.shards_lock().remove(&shard);
        Box::pin(async move {
            let Some(actor) = actor else { return };
            let (done_tx, done_rx) = oneshot::channel();
            if actor.send_message(ShardMsg::Drain(done_tx)).is_ok() {
                let _ = done_rx.await;
            }
        })
    }

    fn fenced(&self, shards: &[ShardId]) {
        let mut map = self.shards_lock();
        for shard in shards {
            if let Some(actor) = map.remove(shard) {
                let _ = actor.send_message(ShardMsg::Fence);
            }
        }
    }
}

/// Ids of messages older than `grace` (snowflake ids carry their creation millisecond).
pub(crate) fn older_than(id: MessageId, grace: Duration) -> bool {
    crate::snowflake::now_ms().saturating_sub(crate::snowflake::created_ms(id))
        >= grace.as_millis() as u64
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod ctx_tests;
#[cfg(test)]
mod lifecycle_tests;
