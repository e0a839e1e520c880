//! In-memory runner storage, for tests of the layers above in one process.
//!
//! It models the parts of Postgres that matter to ownership: a session holds locks until it
//! is closed, dropped or expired; a partitioned session hangs (as a cut network does) while
//! the "server" still counts its locks as held, until [`MemoryRunnerStorage::expire`]
//! plays the server noticing the dead peer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{
    ClusterSnapshot, LockSession, ProgressMark, RunnerInfo, RunnerProgress, RunnerRegistration,
    RunnerStatus, RunnerStorage, StorageError,
};
use crate::ids::{Epoch, RunnerId, ShardId};

#[derive(Debug, Default)]
struct State {
    shards_per_group: Option<u32>,
    next_id: i32,
    runners: BTreeMap<RunnerId, Registered>,
    locks: BTreeMap<ShardId, RunnerId>,
    epochs: BTreeMap<ShardId, Epoch>,
}

#[derive(Debug)]
struct Registered {
    info: RunnerInfo,
    session: SessionState,
    /// Session calls made so far: the progress mark.
    calls: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionState {
    Alive,
    /// Calls hang; locks still held.
    Partitioned,
    /// Session ended; locks freed.
    Ended,
}

/// Runner storage held in memory. Clones share state, like processes sharing a database.
#[derive(Debug, Clone, Default)]
pub struct MemoryRunnerStorage {
    state: Arc<Mutex<State>>,
    /// Woken whenever a session ends.
    ended: Arc<tokio::sync::Notify>,
}

impl MemoryRunnerStorage {
    /// Empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock is a test bug; the data is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Cuts the runner's session: its calls hang from now on, but its locks stay held.
    pub fn partition(&self, runner: RunnerId) {
        if let Some(r) = self.lock().runners.get_mut(&runner) {
            r.session = SessionState::Partitioned;
        }
    }

    /// Ends the runner's session as the server would after detecting a dead peer.
    pub fn expire(&self, runner: RunnerId) {
        end_session(&mut self.lock(), runner);
        self.ended.notify_waiters();
    }

    /// Freezes the runner as SIGSTOP would: its calls hang and its progress mark stops,
    /// while the "server" keeps its session (and locks) alive. The same as a partition.
    pub fn freeze(&self, runner: RunnerId) {
        self.partition(runner);
    }

    fn is_gone(&self, runner: RunnerId) -> bool {
        self.lock()
            .runners
            .get(&runner)
            .is_none_or(|r| r.session == SessionState::Ended)
    }
}

fn end_session(state: &mut State, runner: RunnerId) {
    if let Some(r) = state.runners.get_mut(&runner) {
        r.session = SessionState::Ended;
    }
    state.locks.retain(|_, holder| *holder != runner);
}

#[async_trait]
impl RunnerStorage for MemoryRunnerStorage {
    async fn ensure_cluster(&self, shards_per_group: u32) -> Result<(), StorageError> {
        let mut state = self.lock();
        let stored = *state.shards_per_group.get_or_insert(shards_per_group);
        if stored != shards_per_group {
            return Err(StorageError::ShardCountMismatch {
                cluster: crate::ids::ClusterName::default(),
                stored,
                configured: shards_per_group,
            });
        }
        Ok(())
    }

    async fn register(
        &self,
        registration: &RunnerRegistration,
    ) -> Result<Box<dyn LockSession>, StorageError> {
        let mut state = self.lock();
        state.next_id += 1;
        let id = RunnerId::new(state.next_id).map_err(|e| StorageError::Other(e.to_string()))?;
        state.runners.insert(
            id,
            Registered {
                info: RunnerInfo {
                    id,
                    address: registration.address.clone(),
                    started_at: Utc::now(),
                },
                session: SessionState::Alive,
                calls: 0,
            },
        );
        Ok(Box::new(MemoryLockSession {
            storage: self.clone(),
            runner_id: id,
            closed: false,
        }))
    }

    async fn live_runners(&self) -> Result<Vec<RunnerInfo>, StorageError> {
        Ok(self
            .lock()
            .runners
            .values()
            .filter(|r| r.session != SessionState::Ended)
            .map(|r| r.info.clone())
            .collect())
    }

    async fn snapshot(&self) -> Result<ClusterSnapshot, StorageError> {
        let state = self.lock();
        let runners = state
            .runners
            .values()
            .map(|r| RunnerStatus {
                id: r.info.id,
                address: r.info.address.clone(),
                alive: r.session != SessionState::Ended,
                shards: state.locks.values().filter(|h| **h == r.info.id).count(),
                started_at: r.info.started_at,
            })
            .collect();
        Ok(ClusterSnapshot {
            runners,
            owners: state.locks.clone(),
            epochs: state.epochs.clone(),
        })
    }

    async fn prune_dead(&self, older_than: DateTime<Utc>) -> Result<u64, StorageError> {
        let mut state = self.lock();
        let before = state.runners.len();
        state
            .runners
            .retain(|_, r| r.session != SessionState::Ended || r.info.started_at >= older_than);
        Ok((before - state.runners.len()) as u64)
    }

    async fn progress(&self) -> Result<Vec<RunnerProgress>, StorageError> {
        Ok(self
            .lock()
            .runners
            .values()
            .filter(|r| r.session != SessionState::Ended)
            .map(|r| RunnerProgress {
                id: r.info.id,
                mark: ProgressMark(r.calls),
            })
            .collect())
    }

    async fn end_hung(&self, runner: RunnerId, mark: ProgressMark) -> Result<bool, StorageError> {
        let ended = {
            let mut state = self.lock();
            let hung = state
                .runners
                .get(&runner)
                .is_some_and(|r| r.session != SessionState::Ended && r.calls == mark.0);
            if hung {
                end_session(&mut state, runner);
            }
            hung
        };
        if ended {
            self.ended.notify_waiters();
        }
        Ok(ended)
    }

    async fn await_gone(&self, runner: RunnerId) -> Result<(), StorageError> {
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.is_gone(runner) {
                return Ok(());
            }
            ended.await;
        }
    }
}

/// A session of [`MemoryRunnerStorage`].
#[derive(Debug)]
pub struct MemoryLockSession {
    storage: MemoryRunnerStorage,
    runner_id: RunnerId,
    closed: bool,
}

impl MemoryLockSession {
    /// Waits forever if partitioned; errors if ended.
    async fn usable(&self) -> Result<(), StorageError> {
        let session = self
            .storage
            .lock()
            .runners
            .get_mut(&self.runner_id)
            .map(|r| {
                if r.session == SessionState::Alive {
                    r.calls += 1;
                }
                r.session
            });
        match session {
            Some(SessionState::Alive) => Ok(()),
            Some(SessionState::Partitioned) => std::future::pending().await,
            _ => Err(StorageError::Unavailable("session ended".to_owned())),
        }
    }
}

#[async_trait]
impl LockSession for MemoryLockSession {
    fn runner_id(&self) -> RunnerId {
        self.runner_id
    }

    async fn try_acquire(
        &mut self,
        shards: &[ShardId],
    ) -> Result<Vec<(ShardId, Epoch)>, StorageError> {
        self.usable().await?;
        let mut state = self.storage.lock();
        let mut acquired = Vec::new();
        let wanted: BTreeSet<ShardId> = shards.iter().copied().collect();
        for shard in wanted {
            let holder = state.locks.entry(shard).or_insert(self.runner_id);
            if *holder == self.runner_id {
                let epoch = state
                    .epochs
                    .entry(shard)
                    .and_modify(|e| *e = Epoch::new(e.get() + 1))
                    .or_insert(Epoch::new(1));
                acquired.push((shard, *epoch));
            }
        }
        Ok(acquired)
    }

    async fn release(&mut self, shards: &[ShardId]) -> Result<(), StorageError> {
        self.usable().await?;
        let mut state = self.storage.lock();
        for shard in shards {
            if state.locks.get(shard) == Some(&self.runner_id) {
                state.locks.remove(shard);
            }
        }
        Ok(())
    }

    async fn confirm(&mut self, held: usize) -> Result<bool, StorageError> {
        self.usable().await?;
        let state = self.storage.lock();
        let count = state
            .locks
            .values()
            .filter(|h| **h == self.runner_id)
            .count();
        Ok(count == held)
    }

    async fn close(mut self: Box<Self>) -> Result<(), StorageError> {
        self.usable().await?;
        let mut state = self.storage.lock();
        end_session(&mut state, self.runner_id);
        state.runners.remove(&self.runner_id);
        drop(state);
        self.closed = true;
        self.storage.ended.notify_waiters();
        Ok(())
    }
}

impl Drop for MemoryLockSession {
    fn drop(&mut self) {
        // Dropping a session without closing it is a crash: its locks are freed, its
        // registration stays (dead). A partitioned session keeps its locks until expired.
        if !self.closed {
            let mut state = self.storage.lock();
            let partitioned = state
                .runners
                .get(&self.runner_id)
                .is_some_and(|r| r.session == SessionState::Partitioned);
            if !partitioned {
                end_session(&mut state, self.runner_id);
                drop(state);
                self.storage.ended.notify_waiters();
            }
        }
    }
}
