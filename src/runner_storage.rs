//! Runner storage: registration, liveness and shard locks.
//!
//! A runner registers and receives a [`LockSession`]: one dedicated session (in Postgres, a
//! connection outside the pool) that holds the runner's **liveness lock** and the locks of
//! the shards it owns. A runner is alive exactly while its session holds its liveness lock,
//! so a killed runner disappears as soon as its session ends. Every acquisition bumps the
//! shard's **epoch**. Lock keys are namespaced by cluster name, so clusters can share a
//! database.
//!
//! Backends: [`postgres`] (advisory locks, `pg_locks`) and [`memory`] (for in-process tests
//! of the layers above). One conformance suite (`tests/runner_storage.rs`) runs against both.

pub mod memory;
pub mod postgres;

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::ids::{ClusterName, Epoch, RunnerId, ShardId};

/// Errors of runner storage.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The database could not be reached or the session broke. Retrying later is safe.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The schema is missing or older than this binary.
    #[error("database schema missing or outdated ({0}); run `shoal migrate --database-url URL`")]
    SchemaMissing(String),
    /// This runner's shard count differs from the one stored for the cluster.
    #[error(
        "cluster `{cluster}` was created with shards-per-group = {stored}, but this runner is \
         configured with {configured}; every node of a cluster must use the same value"
    )]
    ShardCountMismatch {
        /// The cluster.
        cluster: ClusterName,
        /// The stored value.
        stored: u32,
        /// This runner's value.
        configured: u32,
    },
    /// The runner's liveness lock could not be taken (another session holds it).
    #[error("runner {0} is already registered by another session")]
    AlreadyRegistered(RunnerId),
    /// Anything else the backend reported.
    #[error("storage error: {0}")]
    Other(String),
}

impl StorageError {
    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// What a runner tells the cluster about itself when it registers.
#[derive(Debug, Clone)]
pub struct RunnerRegistration {
    /// Address (`host:port`) at which other nodes reach the runner.
    pub address: String,
    /// The runner's software version.
    pub version: String,
}

/// A live runner, as others see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunnerInfo {
    /// Its id.
    pub id: RunnerId,
    /// Where to reach it.
    pub address: String,
    /// When it registered.
    pub started_at: DateTime<Utc>,
}

/// A registered runner and whether its session is alive, with the number of shard locks
/// that session holds right now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunnerStatus {
    /// Its id.
    pub id: RunnerId,
    /// Where to reach it.
    pub address: String,
    /// Whether its liveness lock is held.
    pub alive: bool,
    /// Shard locks its session holds.
    pub shards: usize,
    /// When it registered.
    pub started_at: DateTime<Utc>,
}

/// A sign of a runner's progress: it changes whenever the runner's lock session runs a
/// statement (in Postgres, the session's `state_change` in `pg_stat_activity`). Only
/// equality means anything: a mark that stays the same while time passes is a runner that
/// makes no progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct ProgressMark(pub i64);

/// A live runner's latest progress mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RunnerProgress {
    /// The runner.
    pub id: RunnerId,
    /// Its mark as read now.
    pub mark: ProgressMark,
}

/// The cluster as the database sees it at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClusterSnapshot {
    /// Registered runners, live and dead, by id.
    pub runners: Vec<RunnerStatus>,
    /// Shard → the runner whose session holds its lock.
    pub owners: BTreeMap<ShardId, RunnerId>,
    /// Shard → its current epoch (shards never acquired are absent).
    pub epochs: BTreeMap<ShardId, Epoch>,
}

/// Cluster-wide runner storage (shared, cloneable behind `Arc`).
#[async_trait]
pub trait RunnerStorage: Send + Sync + std::fmt::Debug + 'static {
    /// Records the cluster's shard count on first use and refuses a different one after.
    async fn ensure_cluster(&self, shards_per_group: u32) -> Result<(), StorageError>;

    /// Registers a new runner incarnation: opens its dedicated session and takes its
    /// liveness lock there.
    async fn register(
        &self,
        registration: &RunnerRegistration,
    ) -> Result<Box<dyn LockSession>, StorageError>;

    /// The runners whose liveness lock is held, ordered by id.
    async fn live_runners(&self) -> Result<Vec<RunnerInfo>, StorageError>;

    /// Who holds what right now.
    async fn snapshot(&self) -> Result<ClusterSnapshot, StorageError>;

    /// Deletes registrations of dead runners that started before `older_than`.
    async fn prune_dead(&self, older_than: DateTime<Utc>) -> Result<u64, StorageError>;

    /// The progress mark of every live runner.
    async fn progress(&self) -> Result<Vec<RunnerProgress>, StorageError>;

    /// Ends the lock session (and every other session of the same process) of `runner` if
    /// its progress mark is still `mark`, which frees its locks as a kill would. Returns
    /// whether a session was ended. The runner, if it ever wakes, finds its session gone
    /// and fences itself; the epochs bumped by the new owners refuse its completions.
    async fn end_hung(&self, runner: RunnerId, mark: ProgressMark) -> Result<bool, StorageError>;

    /// Returns once `runner`'s liveness lock is free: the moment its session ends (killed,
    /// ended, unregistered). In Postgres this waits in `pg_advisory_lock_shared` on a
    /// connection of its own, so the server wakes it as it frees the lock.
    async fn await_gone(&self, runner: RunnerId) -> Result<(), StorageError>;
}

/// A runner's dedicated session. Dropping it ends the session, which frees every lock it
/// holds (the crash path); [`LockSession::close`] releases and unregisters first.
#[async_trait]
pub trait LockSession: Send + std::fmt::Debug {
    /// The runner this session belongs to.
    fn runner_id(&self) -> RunnerId;

    /// Tries to lock each shard without waiting; bumps the epoch of each one locked and
    /// returns those with their new epochs. Shards held by others are skipped.
    async fn try_acquire(
        &mut self,
        shards: &[ShardId],
    ) -> Result<Vec<(ShardId, Epoch)>, StorageError>;

    /// Releases the locks of `shards` (held by this session).
    async fn release(&mut self, shards: &[ShardId]) -> Result<(), StorageError>;

    /// Confirms the session is alive and still holds its liveness lock and `held` shard
    /// locks. `Ok(false)` means a lock is gone; an error means the session cannot be trusted.
    async fn confirm(&mut self, held: usize) -> Result<bool, StorageError>;

    /// Releases every lock, deletes the registration and ends the session.
    async fn close(self: Box<Self>) -> Result<(), StorageError>;
}
