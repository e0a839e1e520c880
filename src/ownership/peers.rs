//! Peer watchers: one task per live peer, each blocked on a connection of its own until the
//! peer's liveness lock is freed. The server wakes it as the peer's session ends, so a
//! killed runner's shards are taken over the moment Postgres frees its locks, not at the
//! next poll (which stays as the fallback, and covers peers beyond the watch limit).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::task::{AbortHandle, JoinSet};

use crate::ids::RunnerId;
use crate::runner_storage::{RunnerStorage, StorageError};

/// The watchers of one runner incarnation; dropping it stops them all.
#[derive(Debug)]
pub(crate) struct PeerWatchers {
    storage: Arc<dyn RunnerStorage>,
    limit: usize,
    tasks: JoinSet<(RunnerId, Result<(), StorageError>)>,
    watched: HashMap<RunnerId, AbortHandle>,
}

impl PeerWatchers {
    pub(crate) fn new(storage: Arc<dyn RunnerStorage>, limit: usize) -> Self {
        Self {
            storage,
            limit,
            tasks: JoinSet::new(),
            watched: HashMap::new(),
        }
    }

    /// Watches every live peer but `me` (up to the limit) and stops watching the others.
    pub(crate) fn sync(&mut self, me: RunnerId, live: &[RunnerId]) {
        self.watched.retain(|id, task| {
            let keep = live.contains(id);
            if !keep {
                task.abort();
            }
            keep
        });
        for &peer in live.iter().filter(|id| **id != me) {
            if self.watched.len() >= self.limit {
                break;
            }
            if self.watched.contains_key(&peer) {
                continue;
            }
            let storage = self.storage.clone();
            let task = self
                .tasks
                .spawn(async move { (peer, storage.await_gone(peer).await) });
            self.watched.insert(peer, task);
        }
    }

    /// The next peer seen gone. Cancel-safe; pends forever while nothing is watched.
    pub(crate) async fn next_gone(&mut self) -> RunnerId {
        loop {
            let Some(joined) = self.tasks.join_next().await else {
                return std::future::pending().await;
            };
            // An aborted watcher is a peer no longer live: nothing to report.
            let Ok((peer, result)) = joined else { continue };
            self.watched.remove(&peer);
            match result {
                Ok(()) => return peer,
                // Watched again at the next poll, on a fresh connection.
                Err(error) => tracing::debug!(%peer, %error, "peer watcher failed"),
            }
        }
    }
}
