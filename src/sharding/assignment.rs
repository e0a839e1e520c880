//! Rendezvous assignment of shards to runners: a runner's death moves only its own shards.
//!
//! Each shard ranks every possible runner by a fixed key, and its owner is the live runner
//! it ranks highest. Because a shard's ranking never depends on which other runners are
//! live, removing a runner moves exactly the shards it owned (each to its shard's next
//! choice) and a joining runner takes exactly the shards that now rank it highest: nothing
//! ever moves between the runners that stay. This is the only kind of function with that
//! property (a per-shard ranking), so balance comes from how the rankings are drawn, not
//! from a cap: a cap (the bounded-load variant this replaced) makes a survivor that would
//! overflow hand shards to another survivor, and those wait for a drain after a kill.
//!
//! The rankings come in groups of four consecutive shards. In group `g` every runner gets a
//! point `xxh3(g_le ‖ runner_le)` on a circle of `2^64`; the group's shards go to the
//! runners just before and just after the cut at 0, and just before and just after the cut
//! at `2^63` (keys `p`, `!p`, `p + 2^63`, `!(p + 2^63)`; ties by runner id). Plain
//! rendezvous draws every shard's ranking independently, so loads spread like a
//! multinomial; here the four shards of a group go to four circle neighbours of two cuts,
//! which spreads them more evenly: two runners always split a full group two and two, and
//! at 1,024 shards the most loaded of 3 runners holds ~1.08 × the ideal share, of 10
//! ~1.27 × (p99 over sampled runner sets; plain rendezvous 1.12 and 1.33; measured by
//! `balance_and_movement_are_measured` below).
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

/// Consecutive shards that share one circle of runner points.
const GROUP: u32 = 4;

/// A runner's point on the circle of `group`, over explicit little-endian bytes.
fn point(group: u32, runner: RunnerId) -> u64 {
    let mut bytes = [0u8; 8];
    bytes[..4].copy_from_slice(&group.to_le_bytes());
    bytes[4..].copy_from_slice(&runner.get().to_le_bytes());
    xxh3_64(&bytes)
}

/// How highly `shard` ranks `runner`: the live runner with the largest key owns the shard.
/// Position 0 of a group takes the runner just before the cut at 0, position 1 the one just
/// after it, positions 2 and 3 the same around the cut at `2^63`.
fn rank(shard: ShardId, runner: RunnerId) -> (u64, RunnerId) {
    let position = shard.get() % GROUP;
    let mut key = point(shard.get() / GROUP, runner);
    if position >= 2 {
        key = key.wrapping_add(1 << 63);
    }
    if position % 2 == 1 {
        key = !key;
    }
    (key, runner)
}

/// Assigns every shard of `sharding` to the live runner among `runners` it ranks highest.
pub fn assign(sharding: Sharding, runners: &[RunnerId]) -> Assignment {
    let owners = sharding
        .all()
        .filter_map(|shard| {
            let owner = runners.iter().copied().max_by_key(|r| rank(shard, *r))?;
            Some((shard, owner))
        })
        .collect();
    Assignment { owners }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::num::NonZeroU32;

    use proptest::prelude::*;

    use super::*;

    fn runners(ids: &[i32]) -> Vec<RunnerId> {
        ids.iter()
            .map(|id| RunnerId::new(*id).expect("positive"))
            .collect()
    }

    fn sharding(shards: u32) -> Sharding {
        Sharding::new(NonZeroU32::new(shards).expect("non-zero"))
    }

    fn runner_set() -> impl Strategy<Value = Vec<i32>> {
        proptest::collection::btree_set(1..10_000i32, 1..12).prop_map(|s| s.into_iter().collect())
    }

    fn loads(a: &Assignment, live: &[RunnerId]) -> Vec<usize> {
        live.iter().map(|r| a.shards_of(*r).count()).collect()
    }

    proptest! {
        #[test]
        fn every_shard_assigned_once_to_a_live_runner(ids in runner_set(), shards in 1u32..2048) {
            let live = runners(&ids);
            let a = assign(sharding(shards), &live);
            prop_assert_eq!(a.len(), shards as usize);
            for (_, owner) in a.iter() {
                prop_assert!(live.contains(&owner));
            }
        }

        #[test]
        fn order_and_repetition_of_runners_do_not_matter(ids in runner_set()) {
            let live = runners(&ids);
            let mut shuffled = live.clone();
            shuffled.reverse();
            shuffled.extend(live.iter().take(2));
            prop_assert_eq!(assign(Sharding::default(), &live), assign(Sharding::default(), &shuffled));
        }

        #[test]
        fn a_removed_runner_moves_exactly_its_own_shards(ids in runner_set(), pick in any::<prop::sample::Index>(), shards in 1u32..2048) {
            let before = runners(&ids);
            let gone = before[pick.index(before.len())];
            let after: Vec<RunnerId> = before.iter().copied().filter(|r| *r != gone).collect();
            let (a, b) = (assign(sharding(shards), &before), assign(sharding(shards), &after));
            for (shard, owner) in a.iter() {
                if owner == gone {
                    prop_assert!(b.owner(shard) != Some(gone));
                } else {
                    prop_assert_eq!(b.owner(shard), Some(owner), "shard {} moved between survivors", shard);
                }
            }
        }

        #[test]
        fn a_joining_runner_takes_shards_only_for_itself(ids in runner_set(), extra in 10_000..20_000i32, shards in 1u32..2048) {
            let before = runners(&ids);
            let newcomer = RunnerId::new(extra).expect("positive");
            let mut after = before.clone();
            after.push(newcomer);
            let (a, b) = (assign(sharding(shards), &before), assign(sharding(shards), &after));
            for (shard, owner) in b.iter() {
                if owner != newcomer {
                    prop_assert_eq!(a.owner(shard), Some(owner), "shard {} moved between the others", shard);
                }
            }
        }

        #[test]
        fn two_runners_split_every_group_two_and_two(a in 1..10_000i32, b in 10_000..20_000i32, groups in 1u32..512) {
            let live = runners(&[a, b]);
            let assignment = assign(sharding(groups * GROUP), &live);
            prop_assert_eq!(loads(&assignment, &live), vec![(groups * 2) as usize; 2]);
        }

        #[test]
        fn no_runner_holds_half_again_its_share(ids in runner_set()) {
            // A guard far above the measured spread (see the measurement below): per runner,
            // 1.5 × the ideal share is more than six standard deviations out.
            let live = runners(&ids);
            let a = assign(Sharding::default(), &live);
            let ideal = f64::from(Sharding::DEFAULT_SHARDS) / live.len() as f64;
            for load in loads(&a, &live) {
                prop_assert!(load as f64 <= 1.5 * ideal, "{} against an ideal of {}", load, ideal);
            }
        }
    }

    #[test]
    fn no_runners_no_assignment() {
        assert!(assign(Sharding::default(), &[]).is_empty());
    }

    #[test]
    fn three_runners_split_evenly() {
        let live = runners(&[1, 2, 3]);
        let a = assign(Sharding::default(), &live);
        for (runner, n) in live.iter().zip(loads(&a, &live)) {
            assert!((310..=372).contains(&n), "runner {runner} got {n}");
        }
    }

    /// Plain rendezvous (every shard's ranking drawn on its own), for comparison.
    fn plain(sharding: Sharding, live: &[RunnerId]) -> Assignment {
        let owners = sharding
            .all()
            .filter_map(|shard| {
                let rank = |r: &RunnerId| (point(shard.get(), *r), *r);
                Some((shard, *live.iter().max_by_key(|r| rank(r))?))
            })
            .collect();
        Assignment { owners }
    }

    /// Runner sets of `n`: even draws sparse random ids, odd ones a window of consecutive ids
    /// (ids are a sequence, so a cluster's live set is often nearly consecutive).
    fn sample_sets(n: usize, count: usize) -> Vec<Vec<RunnerId>> {
        let mut state = 0x9E37_79B9_7F4A_7C15_u64 ^ n as u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        (0..count)
            .map(|i| {
                let mut ids = BTreeSet::new();
                let base = (next() % 10_000) as i32 + 1;
                while ids.len() < n {
                    let id = if i % 2 == 0 {
                        (next() % 100_000) as i32 + 1
                    } else {
                        base + ids.len() as i32
                    };
                    ids.insert(id);
                }
                runners(&ids.into_iter().collect::<Vec<_>>())
            })
            .collect()
    }

    fn percentile(values: &mut [f64], p: f64) -> f64 {
        values.sort_by(f64::total_cmp);
        values[((values.len() - 1) as f64 * p).round() as usize]
    }

    /// The balance and join movement at the default shard count, over sampled runner sets:
    /// printed (`cargo test -p shoal balance_and_movement -- --nocapture`) and held to the
    /// measured bounds, so a change of the ranking that spreads worse fails here.
    #[test]
    fn balance_and_movement_are_measured() {
        let sharding = Sharding::default();
        let newcomer = RunnerId::new(1_000_000).expect("positive");
        // p99 of max load / ideal, for n = 2..=10 runners, as measured (with a little room).
        let bound = [1.0, 1.09, 1.12, 1.15, 1.18, 1.19, 1.23, 1.26, 1.28];
        for (n, bound) in (2..=10).zip(bound) {
            let ideal = f64::from(sharding.shard_count()) / n as f64;
            let (mut max, mut min, mut plain_max, mut join) = (vec![], vec![], vec![], vec![]);
            for live in sample_sets(n, 200) {
                let a = assign(sharding, &live);
                let load = loads(&a, &live);
                max.push(*load.iter().max().expect("runners") as f64 / ideal);
                min.push(*load.iter().min().expect("runners") as f64 / ideal);
                let p = plain(sharding, &live);
                plain_max.push(*loads(&p, &live).iter().max().expect("runners") as f64 / ideal);
                let mut joined = live.clone();
                joined.push(newcomer);
                let moved = assign(sharding, &joined).shards_of(newcomer).count();
                join.push(moved as f64 * (n + 1) as f64 / f64::from(sharding.shard_count()));
            }
            let p99 = percentile(&mut max, 0.99);
            println!(
                "{n:2} runners: max/ideal p50 {:.3} p99 {p99:.3} worst {:.3}; min/ideal p1 {:.3}; \
                 plain rendezvous max/ideal p50 {:.3} p99 {:.3}; join moved/ideal p50 {:.2} p99 {:.2} worst {:.2}",
                percentile(&mut max, 0.5),
                percentile(&mut max, 1.0),
                percentile(&mut min, 0.01),
                percentile(&mut plain_max, 0.5),
                percentile(&mut plain_max, 0.99),
                percentile(&mut join, 0.5),
                percentile(&mut join, 0.99),
                percentile(&mut join, 1.0),
            );
            assert!(
                p99 <= bound,
                "{n} runners: p99 max/ideal {p99:.3} above {bound}"
            );
        }
    }
}
