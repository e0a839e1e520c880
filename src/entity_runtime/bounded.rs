//! A map that holds at most a fixed number of entries, forgetting the one inserted first
//! when full. For a shard's per-entity bookkeeping that is only advice (last errors,
//! restart backoff), so that a flood of distinct failing entities cannot grow it.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// At most `capacity` entries; inserting a new key into a full map evicts the oldest key.
#[derive(Debug)]
pub(crate) struct BoundedMap<K, V> {
    capacity: usize,
    map: HashMap<K, V>,
    /// Keys, oldest first.
    order: VecDeque<K>,
}

impl<K: Hash + Eq + Clone, V> BoundedMap<K, V> {
    /// An empty map of at most `capacity` (≥ 1) entries.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    pub(crate) fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key)
    }

    /// Inserts or replaces; a replaced key keeps its place in the order.
    pub(crate) fn insert(&mut self, key: K, value: V) {
        if let Some(slot) = self.map.get_mut(&key) {
            *slot = value;
            return;
        }
        self.make_room();
        self.order.push_back(key.clone());
        self.map.insert(key, value);
    }

    /// Evicts the oldest entries until one more fits.
    fn make_room(&mut self) {
        while self.map.len() >= self.capacity {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.map.remove(&oldest);
        }
    }

    /// The value of `key`, inserted with `make` if absent.
    pub(crate) fn get_or_insert_with(&mut self, key: K, make: impl FnOnce() -> V) -> &mut V {
        if !self.map.contains_key(&key) {
            self.make_room();
            self.order.push_back(key.clone());
        }
        self.map.entry(key).or_insert_with(make)
    }

    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        self.map.retain(|k, v| keep(k, v));
        let map = &self.map;
        self.order.retain(|k| map.contains_key(k));
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_at_most_its_capacity_and_evicts_the_oldest() {
        let mut map = BoundedMap::new(3);
        for n in 0..10 {
            map.insert(n, n * 10);
            assert!(map.len() <= 3);
        }
        assert_eq!(map.get(&0), None);
        assert_eq!(map.get(&9), Some(&90));
        map.insert(7, 1);
        assert_eq!(map.get(&7), Some(&1), "replaced in place");
        map.retain(|k, _| *k != 8);
        map.insert(20, 0);
        map.insert(21, 0);
        assert_eq!(map.len(), 3);
        assert_eq!(*map.get_or_insert_with(21, || 5), 0);
    }
}
