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

    /// Watches the `limit` live peers that follow `me` in a ring ordered by runner id, and
    /// stops watching the others: every live runner is watched by `min(limit, N − 1)` of
    /// its peers, and a runner holds that many watch connections, not one per peer.
    pub(crate) fn sync(&mut self, me: RunnerId, live: &[RunnerId]) {
        let wanted = ring_after(me, live, self.limit);
        self.watched.retain(|id, task| {
            let keep = wanted.contains(id);
            if !keep {
                task.abort();
            }
            keep
        });
        for &peer in &wanted {
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

/// The first `limit` of `live` after `me` in ascending id order, wrapping around (never
/// `me`).
fn ring_after(me: RunnerId, live: &[RunnerId], limit: usize) -> Vec<RunnerId> {
    let mut peers: Vec<RunnerId> = live.iter().copied().filter(|id| *id != me).collect();
    peers.sort_unstable();
    peers.dedup();
    let split = peers.partition_point(|id| *id < me);
    peers.rotate_left(split);
    peers.truncate(limit);
    peers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(raw: &[i32]) -> Vec<RunnerId> {
        raw.iter()
            .map(|&n| RunnerId::new(n).expect("a valid runner id"))
            .collect()
    }

    #[test]
    fn each_runner_watches_the_peers_after_it_in_the_ring() {
        let live = ids(&[4, 1, 3, 2]);
        let me = |n| RunnerId::new(n).expect("a valid runner id");
        assert_eq!(ring_after(me(1), &live, 1), ids(&[2]));
        assert_eq!(ring_after(me(3), &live, 2), ids(&[4, 1]));
        assert_eq!(ring_after(me(4), &live, 1), ids(&[1]));
        assert_eq!(ring_after(me(2), &live, 16), ids(&[3, 4, 1]));
        // A runner not (yet) in the live set still gets the next ones.
        assert_eq!(ring_after(me(5), &ids(&[1, 7]), 1), ids(&[7]));
    }

    #[test]
    fn with_one_watcher_each_every_runner_is_watched_once() {
        let live = ids(&[2, 5, 9, 11, 12]);
        let mut watched: Vec<RunnerId> = live
            .iter()
            .flat_map(|&me| ring_after(me, &live, 1))
            .collect();
        watched.sort_unstable();
        assert_eq!(watched, live);
    }
}
