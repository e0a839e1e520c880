//! Sharding: which shard an entity lives on, and which runner should own each shard.
//!
//! Both are pure functions of their inputs, computed by every node alone: the shard hash is
//! xxh3 over the id's UTF-8 bytes (stable across processes, platforms and compiler
//! versions, unlike std's `DefaultHasher`), and the assignment is rendezvous hashing over
//! the set of live runners, in which a runner's death or arrival moves only that runner's
//! shards (see [`assignment`]).

pub mod assignment;

use std::num::NonZeroU32;

use xxhash_rust::xxh3::xxh3_64;

use crate::ids::{EntityId, ShardId};

pub use assignment::{Assignment, assign};

/// The shard count of one shard group. Fixed per deployment: every runner must agree on it,
/// which registration checks against the value stored for the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sharding {
    shards: NonZeroU32,
}

impl Sharding {
    /// The default number of shards per group.
    pub const DEFAULT_SHARDS: u32 = 1024;

    /// A sharding with `shards` shards.
    pub const fn new(shards: NonZeroU32) -> Self {
        Self { shards }
    }

    /// How many shards there are.
    pub const fn shard_count(self) -> u32 {
        self.shards.get()
    }

    /// Every shard, in order.
    pub fn all(self) -> impl Iterator<Item = ShardId> {
        (0..self.shards.get()).map(ShardId::new)
    }

    /// The shard of an entity id: `xxh3(id) mod shards`.
    pub fn shard_of(self, id: &EntityId) -> ShardId {
        self.shard_of_key(id.as_str())
    }

    /// The shard of any key, e.g. a singleton's name.
    pub fn shard_of_key(self, key: &str) -> ShardId {
        let hash = xxh3_64(key.as_bytes());
        // The remainder is below `shards`, which is a u32.
        ShardId::new((hash % u64::from(self.shards.get())) as u32)
    }
}

impl Default for Sharding {
    fn default() -> Self {
        Self::new(NonZeroU32::new(Self::DEFAULT_SHARDS).unwrap_or(NonZeroU32::MIN))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_hash_is_stable() {
        // Pinned values: a change here would move every entity of every deployment.
        let sharding = Sharding::default();
        let id = EntityId::new("user-42").expect("valid");
        assert_eq!(sharding.shard_of(&id), sharding.shard_of_key("user-42"));
        assert_eq!(
            sharding.shard_of_key("user-42").get() as u64,
            xxh3_64(b"user-42") % 1024
        );
        assert_eq!(xxh3_64(b""), 0x2d06800538d394c2);
    }

    #[test]
    fn shards_are_in_range() {
        let sharding = Sharding::new(NonZeroU32::new(7).expect("non-zero"));
        for i in 0..1000 {
            assert!(sharding.shard_of_key(&i.to_string()).get() < 7);
        }
    }
}
