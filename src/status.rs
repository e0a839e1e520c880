//! The cluster's status as operators read it (`shoal status`, `GET /cluster`).

use serde::Serialize;

use crate::ids::{ClusterName, RunnerId};
use crate::runner_storage::ClusterSnapshot;
use crate::sharding::Sharding;

/// One runner's line in the status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunnerLine {
    /// Runner id.
    pub id: RunnerId,
    /// Its address.
    pub address: String,
    /// Whether its liveness lock is held.
    pub alive: bool,
    /// Shard locks its session holds right now.
    pub shards: usize,
}

/// The status summary printed by `shoal status --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterStatus {
    /// The cluster's name.
    pub cluster: ClusterName,
    /// Shards in the cluster.
    pub shards_total: u32,
    /// Shards whose lock nobody holds.
    pub unowned: u32,
    /// Registered runners, live first, then by id.
    pub runners: Vec<RunnerLine>,
}

impl ClusterStatus {
    /// Summarizes a snapshot.
    pub fn from_snapshot(
        cluster: ClusterName,
        sharding: Sharding,
        snapshot: &ClusterSnapshot,
    ) -> Self {
        let owned = snapshot
            .owners
            .keys()
            .filter(|s| s.get() < sharding.shard_count())
            .count() as u32;
        let mut runners: Vec<RunnerLine> = snapshot
            .runners
            .iter()
            .map(|r| RunnerLine {
                id: r.id,
                address: r.address.clone(),
                alive: r.alive,
                shards: r.shards,
            })
            .collect();
        runners.sort_by_key(|r| (!r.alive, r.id));
        Self {
            cluster,
            shards_total: sharding.shard_count(),
            unowned: sharding.shard_count() - owned,
            runners,
        }
    }

    /// A short human-readable rendering.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "cluster {}: {} shards, {} unowned\n",
            self.cluster, self.shards_total, self.unowned
        );
        for r in &self.runners {
            out.push_str(&format!(
                "  runner {:>5}  {:<22} {:<5} {:>5} shards\n",
                r.id,
                r.address,
                if r.alive { "alive" } else { "dead" },
                r.shards
            ));
        }
        out
    }
}
