//! The ownership loop: one task per runner that owns the runner's dedicated lock session.
//!
//! Every `poll_interval` it reads the live runners, computes the assignment, acquires the
//! shards assigned to it that are free, and drains then releases the shards no longer
//! assigned to it. Every `lock_check_interval` it re-confirms its locks on the session.
//!
//! Invariants:
//! - A shard is reported as owned (in [`OwnershipView`] and to the [`ShardLifecycle`]) only
//!   between a successful acquisition and the moment its lock is released or the runner
//!   fences itself.
//! - Every call on the session runs under a deadline of `last confirmation + lock_deadline`.
//!   When it passes, the runner **fences**: it stops every shard at once and drops the
//!   session, before the server (whose dead-peer detection is configured well above the
//!   deadline) could free the locks and hand the shards to anyone else. It then rejoins as a
//!   new runner incarnation.
//! - A shard's lock is released only after its work has drained (or `drain_timeout`), and
//!   the locks stay confirmed while shards drain, during shutdown too.
//! - A peer whose session is alive but which makes no progress for `hang_timeout` (frozen,
//!   wedged, paused) has its sessions ended by the survivors ([`progress`]), which frees
//!   its locks as a kill would. A peer's end wakes this runner at once ([`peers`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

mod peers;
mod progress;

use crate::backoff::Backoff;
use crate::ids::{Epoch, RunnerId, ShardId};
use crate::metrics as m;
use crate::runner_storage::{
    LockSession, RunnerInfo, RunnerRegistration, RunnerStorage, StorageError,
};
use crate::sharding::{Sharding, assign};
use peers::PeerWatchers;
use progress::ProgressTracker;

/// What the layer above (the entity runtime) is told about shards.
pub trait ShardLifecycle: Send + Sync + 'static {
    /// The runner now owns `shard` under `epoch`.
    fn acquired(&self, shard: ShardId, epoch: Epoch);
    /// The shard is being given up: stop taking work for it and finish what is in flight.
    /// The lock is released when the returned future completes (or `drain_timeout` passes).
    fn drain(&self, shard: ShardId) -> BoxFuture<'static, ()>;
    /// The runner fenced itself: stop the work of these shards at once, completing nothing.
    fn fenced(&self, shards: &[ShardId]);
}

/// Timings of the loop (from `[runner]` in the config).
#[derive(Debug, Clone)]
pub struct OwnershipConfig {
    /// The cluster's sharding.
    pub sharding: Sharding,
    /// How often live runners are read and the assignment recomputed.
    pub poll_interval: Duration,
    /// How often locks are re-confirmed.
    pub lock_check_interval: Duration,
    /// Unconfirmed for this long → fence.
    pub lock_deadline: Duration,
    /// Longest wait for a shard's work to drain before its lock is released.
    pub drain_timeout: Duration,
    /// A live peer without progress for this long is taken over.
    pub hang_timeout: Duration,
    /// Most peers watched on connections of their own for an instant takeover.
    pub watch_peers: usize,
    /// What the runner registers as.
    pub registration: RunnerRegistration,
}

/// Where the loop is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OwnershipPhase {
    /// Registering (first start, or rejoining after fencing).
    #[default]
    Joining,
    /// Registered and balancing.
    Active,
    /// Fenced itself; rejoining.
    Fenced,
    /// Draining and releasing everything.
    ShuttingDown,
    /// Done: every lock released.
    Stopped,
}

/// What this runner believes it owns, published after every change.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OwnershipView {
    /// The current incarnation's id, once registered.
    pub runner_id: Option<RunnerId>,
    /// Lifecycle phase.
    pub phase: OwnershipPhase,
    /// Shards owned, with the epoch they were acquired under.
    pub owned: BTreeMap<ShardId, Epoch>,
    /// Owned shards being drained before release.
    pub draining: BTreeSet<ShardId>,
    /// Live runners as last read.
    pub live_runners: Vec<RunnerInfo>,
    /// How many times this process fenced itself.
    pub fenced_count: u64,
}

/// The sending side of a running ownership loop.
#[derive(Debug, Clone)]
pub struct OwnershipHandle {
    view_rx: watch::Receiver<OwnershipView>,
}

impl OwnershipHandle {
    /// The latest view.
    pub fn view(&self) -> OwnershipView {
        self.view_rx.borrow().clone()
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<OwnershipView> {
        self.view_rx.clone()
    }
}

/// Starts the loop on `tasks`; it runs until `shutdown` is cancelled, then drains, releases
/// every lock and unregisters. The returned future resolves when that is done.
pub fn spawn_ownership(
    storage: Arc<dyn RunnerStorage>,
    lifecycle: Arc<dyn ShardLifecycle>,
    config: OwnershipConfig,
    shutdown: CancellationToken,
) -> (OwnershipHandle, tokio::task::JoinHandle<()>) {
    let (view_tx, view_rx) = watch::channel(OwnershipView::default());
    let owner = OwnershipLoop {
        storage,
        lifecycle,
        config,
        shutdown,
        view_tx,
    };
    let join = tokio::spawn(owner.run());
    (OwnershipHandle { view_rx }, join)
}

struct OwnershipLoop {
    storage: Arc<dyn RunnerStorage>,
    lifecycle: Arc<dyn ShardLifecycle>,
    config: OwnershipConfig,
    shutdown: CancellationToken,
    view_tx: watch::Sender<OwnershipView>,
}

/// Why a session's loop ended.
enum SessionEnd {
    Shutdown,
    Fenced,
}

/// One registered incarnation: the session and what it holds.
struct Incarnation {
    session: Box<dyn LockSession>,
    owned: BTreeMap<ShardId, Epoch>,
    draining: BTreeSet<ShardId>,
    drains: JoinSet<ShardId>,
    /// Start of the last session call that succeeded.
    confirmed_at: Instant,
    polls: u64,
    watchers: PeerWatchers,
    progress: ProgressTracker,
    /// Shards assigned here that the last rebalance could not lock.
    wanting: bool,
    /// The next early poll's delay while `wanting`, and since when it wants.
    wanting_poll: Backoff,
    wanting_since: Option<Instant>,
}

/// While shards assigned here are still held elsewhere (a peer draining them for this
/// runner, a dying session that has not freed them yet), the next poll comes this soon for
/// [`WANTING_EAGER`], then doubling up to `poll_interval`: a handover costs a drain, not a
/// drain plus a poll, and a long drain costs a few cheap lock attempts.
const WANTING_POLL: Duration = Duration::from_millis(20);
const WANTING_EAGER: Duration = Duration::from_secs(1);

/// The session could not be confirmed in time: fence.
struct Lost(&'static str);

impl OwnershipLoop {
    async fn run(self) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            self.publish(|v| v.phase = v.phase_after_join());
            let registered = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                r = self.storage.register(&self.config.registration) => r,
            };
            let session = match registered {
                Ok(session) => session,
                Err(error) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, ?delay, "runner registration failed; retrying");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
            };
            backoff.reset();
            match self.run_incarnation(session).await {
                SessionEnd::Shutdown => break,
                SessionEnd::Fenced => continue,
            }
        }
        self.publish(|v| {
            v.phase = OwnershipPhase::Stopped;
            v.owned.clear();
            v.draining.clear();
        });
    }

    fn publish(&self, change: impl FnOnce(&mut OwnershipView)) {
        self.view_tx.send_modify(change);
    }

    fn publish_holdings(&self, inc: &Incarnation) {
        let owned = inc.owned.clone();
        let draining = inc.draining.clone();
        m::shards_owned(owned.len());
        self.publish(|v| {
            v.owned = owned;
            v.draining = draining;
        });
    }

    async fn run_incarnation(&self, session: Box<dyn LockSession>) -> SessionEnd {
        let runner_id = session.runner_id();
        tracing::info!(runner_id = %runner_id, "registered; holding liveness lock");
        self.publish(|v| {
            v.runner_id = Some(runner_id);
            v.phase = OwnershipPhase::Active;
        });
        let mut inc = Incarnation {
            session,
            owned: BTreeMap::new(),
            draining: BTreeSet::new(),
            drains: JoinSet::new(),
            confirmed_at: Instant::now(),
            polls: 0,
            watchers: PeerWatchers::new(self.storage.clone(), self.config.watch_peers),
            progress: ProgressTracker::new(self.config.hang_timeout),
            wanting: false,
            wanting_poll: Backoff::new(WANTING_POLL, self.config.poll_interval),
            wanting_since: None,
        };
        let mut poll = tokio::time::interval(self.config.poll_interval);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut check = tokio::time::interval(self.config.lock_check_interval);
        check.set_missed_tick_behavior(MissedTickBehavior::Delay);

        loop {
            let step = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break self.shut_down(inc).await,
                _ = check.tick() => self.confirm(&mut inc).await,
                Some(drained) = inc.drains.join_next() => {
                    let mut shards: Vec<ShardId> = drained.ok().into_iter().collect();
                    while let Some(more) = inc.drains.try_join_next() {
                        shards.extend(more.ok());
                    }
                    self.release(&mut inc, shards).await
                }
                peer = inc.watchers.next_gone() => {
                    tracing::info!(%peer, "a peer's session ended; rebalancing now");
                    m::peer_gone();
                    inc.wanting_poll.reset();
                    inc.wanting_since = None;
                    self.rebalanced(&mut inc, &mut poll, Some(peer)).await
                }
                _ = poll.tick() => self.rebalanced(&mut inc, &mut poll, None).await,
            };
            if let Err(Lost(why)) = step {
                break self.fence(inc, why);
            }
        }
    }

    /// Rebalances, then polls early while assigned shards are still held elsewhere.
    async fn rebalanced(
        &self,
        inc: &mut Incarnation,
        poll: &mut tokio::time::Interval,
        gone: Option<RunnerId>,
    ) -> Result<(), Lost> {
        self.rebalance(inc, gone).await?;
        if inc.wanting {
            let since = *inc.wanting_since.get_or_insert_with(Instant::now);
            let delay = if since.elapsed() >= WANTING_EAGER {
                inc.wanting_poll.next_delay()
            } else {
                inc.wanting_poll.current()
            };
            poll.reset_after(delay);
        } else {
            inc.wanting_poll.reset();
            inc.wanting_since = None;
        }
        Ok(())
    }

    /// Runs a session call under the fencing deadline.
    async fn guarded<'a, T>(
        &self,
        confirmed_at: &mut Instant,
        call: BoxFuture<'a, Result<T, StorageError>>,
    ) -> Result<T, Lost> {
        let started = Instant::now();
        let deadline = *confirmed_at + self.config.lock_deadline;
        match tokio::time::timeout_at(deadline, call).await {
            Ok(Ok(value)) => {
                *confirmed_at = started;
                Ok(value)
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "lock session call failed");
                Err(Lost("lock session failed"))
            }
            Err(_) => Err(Lost("locks not confirmed within lock-deadline")),
        }
    }

    async fn confirm(&self, inc: &mut Incarnation) -> Result<(), Lost> {
        if inc.confirmed_at.elapsed() < self.config.lock_check_interval / 2 {
            return Ok(());
        }
        let held = inc.owned.len();
        let call = inc.session.confirm(held);
        let intact = self.guarded(&mut inc.confirmed_at, call).await?;
        if intact {
            Ok(())
        } else {
            Err(Lost("a held lock is no longer held"))
        }
    }

    /// Recomputes the assignment and acquires and drains to match it. `gone` is a peer a
    /// watcher just saw end: the live runners are then the last ones read without it (no
    /// read on the takeover's path; the next poll reads them again).
    async fn rebalance(&self, inc: &mut Incarnation, gone: Option<RunnerId>) -> Result<(), Lost> {
        // Pool calls never fence, but they must not hold the loop past the next check.
        let budget = self
            .config
            .lock_check_interval
            .max(self.config.poll_interval)
            * 2;
        let live = match gone {
            Some(peer) => {
                let mut live = self.view_tx.borrow().live_runners.clone();
                live.retain(|r| r.id != peer);
                live
            }
            None => {
                inc.polls += 1;
                match tokio::time::timeout(budget, self.storage.live_runners()).await {
                    Ok(Ok(live)) => live,
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "could not read live runners; keeping shards");
                        return Ok(());
                    }
                    Err(_) => {
                        tracing::warn!("reading live runners timed out; keeping shards");
                        return Ok(());
                    }
                }
            }
        };
        let me = inc.session.runner_id();
        m::runners_alive(live.len());
        let ids: Vec<RunnerId> = live.iter().map(|r| r.id).collect();
        self.publish(|v| v.live_runners = live);
        if !ids.contains(&me) {
            // Our liveness lock is not visible: the confirmation decides what that means.
            return Ok(());
        }
        inc.watchers.sync(me, &ids);
        let assignment = assign(self.config.sharding, &ids);
        let desired: BTreeSet<ShardId> = assignment.shards_of(me).collect();

        let to_drain: Vec<ShardId> = inc
            .owned
            .keys()
            .filter(|s| !desired.contains(s) && !inc.draining.contains(s))
            .copied()
            .collect();
        for shard in to_drain {
            self.start_drain(inc, shard);
        }

        let to_acquire: Vec<ShardId> = desired
            .iter()
            .filter(|s| !inc.owned.contains_key(s))
            .copied()
            .collect();
        inc.wanting = false;
        if !to_acquire.is_empty() {
            let call = inc.session.try_acquire(&to_acquire);
            let acquired = self.guarded(&mut inc.confirmed_at, call).await?;
            inc.wanting = acquired.len() < to_acquire.len();
            for (shard, epoch) in &acquired {
                inc.owned.insert(*shard, *epoch);
                self.lifecycle.acquired(*shard, *epoch);
            }
            if !acquired.is_empty() {
                m::lock_acquisitions(acquired.len());
                tracing::debug!(count = acquired.len(), "acquired shards");
            }
        }
        self.publish_holdings(inc);
        if gone.is_some() {
            return Ok(());
        }
        // After acquiring: judging peers is never on the path of a takeover.
        self.end_hung_peers(inc, me, budget).await;
        if inc.polls.is_multiple_of(240) {
            self.prune_dead_registrations().await;
        }
        Ok(())
    }

    /// Ends the sessions of live peers that made no progress for `hang_timeout`. Only a
    /// runner that is itself confirmed judges others.
    async fn end_hung_peers(&self, inc: &mut Incarnation, me: RunnerId, budget: Duration) {
        if inc.confirmed_at.elapsed() > self.config.lock_deadline / 2 {
            return;
        }
        let readings = match tokio::time::timeout(budget, self.storage.progress()).await {
            Ok(Ok(readings)) => readings,
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not read peers' progress");
                return;
            }
            Err(_) => return,
        };
        let (hung, longest) = inc.progress.observe(Instant::now(), me, &readings);
        m::peer_progress_gap(longest);
        for peer in hung {
            let id = peer.progress.id;
            match tokio::time::timeout(budget, self.storage.end_hung(id, peer.progress.mark)).await
            {
                Ok(Ok(true)) => {
                    tracing::warn!(
                        peer = %id,
                        stalled_ms = peer.stalled_for.as_millis() as u64,
                        "a live peer made no progress for runner.hang-timeout; ended its \
                         sessions to take its shards over"
                    );
                    m::hung_runner_ended();
                }
                Ok(Ok(false)) => {}
                Ok(Err(error)) => tracing::warn!(peer = %id, %error, "could not end a hung peer"),
                Err(_) => tracing::warn!(peer = %id, "ending a hung peer timed out"),
            }
        }
    }

    fn start_drain(&self, inc: &mut Incarnation, shard: ShardId) {
        inc.draining.insert(shard);
        let drain = self.lifecycle.drain(shard);
        let timeout = self.config.drain_timeout;
        inc.drains.spawn(async move {
            // A drain that panics or overruns still ends in the release of its shard.
            match tokio::time::timeout(timeout, AssertUnwindSafe(drain).catch_unwind()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => tracing::error!(%shard, "shard drain panicked; releasing"),
                Err(_) => tracing::warn!(%shard, "shard did not drain in time; releasing anyway"),
            }
            shard
        });
    }

    async fn release(&self, inc: &mut Incarnation, shards: Vec<ShardId>) -> Result<(), Lost> {
        // Stop reporting the shards as owned before their locks can be taken by anyone.
        for shard in &shards {
            inc.owned.remove(shard);
            inc.draining.remove(shard);
        }
        self.publish_holdings(inc);
        let call = inc.session.release(&shards);
        self.guarded(&mut inc.confirmed_at, call).await?;
        m::shard_releases(shards.len());
        tracing::debug!(count = shards.len(), "released shards");
        Ok(())
    }

    async fn prune_dead_registrations(&self) {
        let cutoff = chrono::Utc::now() - chrono::Duration::hours(1);
        if let Ok(Ok(pruned)) =
            tokio::time::timeout(Duration::from_secs(1), self.storage.prune_dead(cutoff)).await
            && pruned > 0
        {
            tracing::info!(pruned, "pruned registrations of dead runners");
        }
    }

    fn fence(&self, inc: Incarnation, why: &'static str) -> SessionEnd {
        let shards: Vec<ShardId> = inc.owned.keys().copied().collect();
        tracing::error!(
            runner_id = %inc.session.runner_id(),
            reason = why,
            shards = shards.len(),
            "fencing: stopping every shard and rejoining as a new runner"
        );
        self.lifecycle.fenced(&shards);
        m::fencing_event();
        m::lock_losses(shards.len());
        m::shards_owned(0);
        self.publish(|v| {
            v.owned.clear();
            v.draining.clear();
            v.phase = OwnershipPhase::Fenced;
            v.fenced_count += 1;
        });
        // Dropping the session closes the socket if it can; a partitioned one is freed by
        // the server's keepalive detection.
        drop(inc);
        SessionEnd::Fenced
    }

    async fn shut_down(&self, mut inc: Incarnation) -> SessionEnd {
        self.publish(|v| v.phase = OwnershipPhase::ShuttingDown);
        let runner_id = inc.session.runner_id();
        tracing::info!(%runner_id, shards = inc.owned.len(), "shutting down: draining shards");
        let remaining: Vec<ShardId> = inc
            .owned
            .keys()
            .filter(|s| !inc.draining.contains(s))
            .copied()
            .collect();
        for shard in remaining {
            self.start_drain(&mut inc, shard);
        }
        // Locks stay confirmed while handlers drain: a drain longer than the lock deadline
        // must not turn into a fence that frees every lock under running handlers.
        let mut check = tokio::time::interval(self.config.lock_check_interval);
        check.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let step = tokio::select! {
                biased;
                _ = check.tick() => self.confirm(&mut inc).await,
                drained = inc.drains.join_next() => match drained {
                    // Shard by shard, so each is free for the others as soon as it drains.
                    Some(Ok(shard)) => self.release(&mut inc, vec![shard]).await,
                    Some(Err(_)) => Ok(()),
                    None => break,
                },
            };
            if let Err(Lost(why)) = step {
                tracing::warn!(
                    reason = why,
                    "locks lost while shutting down; the session's end frees the rest"
                );
                self.fence(inc, why);
                return SessionEnd::Shutdown;
            }
        }
        let close = inc.session.close();
        match tokio::time::timeout(self.config.lock_deadline, close).await {
            Ok(Ok(())) => tracing::info!(%runner_id, "released every shard and unregistered"),
            Ok(Err(error)) => tracing::warn!(%error, "unregistering failed"),
            Err(_) => tracing::warn!("unregistering timed out"),
        }
        m::shards_owned(0);
        SessionEnd::Shutdown
    }
}

impl OwnershipView {
    fn phase_after_join(&self) -> OwnershipPhase {
        match self.phase {
            OwnershipPhase::Fenced => OwnershipPhase::Fenced,
            _ => OwnershipPhase::Joining,
        }
    }
}

#[cfg(test)]
mod tests;
