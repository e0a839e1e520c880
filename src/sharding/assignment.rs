//! Bounded-load rendezvous assignment of shards to runners.
//!
//! Every (shard, runner) pair gets a weight `xxh3(shard_le ‖ runner_le)`. Pairs are taken
//! in descending weight order; a pair is granted when its shard is still free and its runner
//! holds fewer than ⌈shards / runners⌉ shards. Without the cap this is plain rendezvous
//! (highest-random-weight) hashing: each shard goes to its top runner, and adding or removing
//! a runner only moves the shards that runner gains or had. The cap bounds the load of the
//! luckiest runner; because pairs are granted in one global weight order, a runner that
//! joins takes mostly the shards for which it is the top choice, and the movement stays close
//! to the ideal `shards / runners` (property-tested below).
//!
//! The result depends only on the set of runners and the shard count, never on the order in
//! which runners are listed, so every node computes the same answer alone.

use std::collections::BTreeMap;

use xxhash_rust::xxh3::xxh3_64;

use crate::ids::{RunnerId, ShardId};

use super::Sharding;

/// Which runner should own each shard.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Assignment {
    owners: BTreeMap<ShardId, RunnerId>,
}

impl Assignment {
    /// The runner that should own `shard`, if any runner is live.
    pub fn owner(&self, shard: ShardId) -> Option<RunnerId> {
        self.owners.get(&shard).copied()
    }

    /// The shards assigned to `runner`, in order.
    pub fn shards_of(&self, runner: RunnerId) -> impl Iterator<Item = ShardId> + '_ {
        self.owners
            .iter()
            .filter(move |(_, owner)| **owner == runner)
            .map(|(shard, _)| *shard)
    }

    /// Every (shard, runner) pair.
    pub fn iter(&self) -> impl Iterator<Item = (ShardId, RunnerId)> + '_ {
        self.owners.iter().map(|(s, r)| (*s, *r))
    }

    /// How many shards are assigned.
    pub fn len(&self) -> usize {
        self.owners.len()
    }

    /// Whether nothing is assigned (no live runners).
    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }
}

/// The rendezvous weight of a (shard, runner) pair, over explicit little-endian bytes.
fn weight(shard: ShardId, runner: RunnerId) -> u64 {
    let mut bytes = [0u8; 8];
    bytes[..4].copy_from_slice(&shard.get().to_le_bytes());
    bytes[4..].copy_from_slice(&runner.get().to_le_bytes());
    xxh3_64(&bytes)
}

/// Assigns every shard of `sharding` to one of `runners`, at most ⌈shards / runners⌉ each.
pub fn assign(sharding: Sharding, runners: &[RunnerId]) -> Assignment {
    let mut runners = runners.to_vec();
    runners.sort_unstable();
    runners.dedup();
    if runners.is_empty() {
        return Assignment::default();
    }
    let shards = sharding.shard_count() as usize;
    let cap = shards.div_ceil(runners.len());

    let mut pairs: Vec<(u64, ShardId, usize)> = Vec::with_capacity(shards * runners.len());
    for shard in sharding.all() {
        for (index, runner) in runners.iter().enumerate() {
            pairs.push((weight(shard, *runner), shard, index));
        }
    }
    // Descending weight; ties (vanishingly rare) broken by shard then runner, so the order
    // is total and the result deterministic.
    pairs.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));

    let mut load = vec![0usize; runners.len()];
    let mut owners = BTreeMap::new();
    for (_, shard, index) in pairs {
        if owners.len() == shards {
            break;
        }
        if load[index] < cap && !owners.contains_key(&shard) {
            owners.insert(shard, runners[index]);
            load[index] += 1;
        }
    }
    Assignment { owners }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use proptest::prelude::*;

    use super::*;

    fn runners(ids: &[i32]) -> Vec<RunnerId> {
        ids.iter()
            .map(|id| RunnerId::new(*id).expect("positive"))
            .collect()
    }

    fn moved(a: &Assignment, b: &Assignment) -> usize {
        a.iter().filter(|(s, r)| b.owner(*s) != Some(*r)).count()
    }

    fn runner_set() -> impl Strategy<Value = Vec<i32>> {
        proptest::collection::btree_set(1..10_000i32, 1..12).prop_map(|s| s.into_iter().collect())
    }

    proptest! {
        #[test]
        fn every_shard_assigned_once_within_cap(ids in runner_set(), shards in 1u32..2048) {
            let sharding = Sharding::new(NonZeroU32::new(shards).expect("non-zero"));
            let live = runners(&ids);
            let a = assign(sharding, &live);
            prop_assert_eq!(a.len(), shards as usize);
            let cap = (shards as usize).div_ceil(live.len());
            for runner in &live {
                prop_assert!(a.shards_of(*runner).count() <= cap);
            }
            for (_, owner) in a.iter() {
                prop_assert!(live.contains(&owner));
            }
        }

        #[test]
        fn order_of_runners_does_not_matter(ids in runner_set()) {
            let sharding = Sharding::default();
            let live = runners(&ids);
            let mut reversed = live.clone();
            reversed.reverse();
            prop_assert_eq!(assign(sharding, &live), assign(sharding, &reversed));
        }

        #[test]
        fn adding_or_removing_a_runner_moves_few_shards(ids in runner_set(), extra in 10_000..20_000i32) {
            let sharding = Sharding::default();
            let before = runners(&ids);
            let mut after = before.clone();
            after.push(RunnerId::new(extra).expect("positive"));
            let a = assign(sharding, &before);
            let b = assign(sharding, &after);
            // Ideal movement: the newcomer's fair share.
            let ideal = sharding.shard_count() as f64 / after.len() as f64;
            let added = moved(&a, &b) as f64;
            let removed = moved(&b, &a) as f64;
            prop_assert!(added <= 1.5 * ideal + 1.0, "join moved {added}, ideal {ideal}");
            prop_assert!(removed <= 1.5 * ideal + 1.0, "leave moved {removed}, ideal {ideal}");
        }
    }

    #[test]
    fn no_runners_no_assignment() {
        assert!(assign(Sharding::default(), &[]).is_empty());
    }

    #[test]
    fn three_runners_split_evenly() {
        let a = assign(Sharding::default(), &runners(&[1, 2, 3]));
        for r in runners(&[1, 2, 3]) {
            let n = a.shards_of(r).count();
            assert!((300..=342).contains(&n), "runner {r} got {n}");
        }
    }
}
