//! The runner's memory of replies it completed recently, shared by all its shards and
//! bounded in bytes (`runner.recent-replies-bytes`).
//!
//! It only saves work: a push for a message completed moments ago is answered without a
//! storage read, and a scan that read a row just before its completion committed does not
//! run it again. Nothing depends on a reply still being here: a forgotten one is read from
//! storage. One budget for the whole runner (not a count per shard) keeps a runner that owns
//! every shard at the same size as one that owns a few. The oldest replies go first.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use crate::ids::MessageId;
use crate::message_storage::Reply;

/// What one remembered reply costs besides its content: the map slot, the order queue
/// entry and the `Reply` itself (measured layout sizes, rounded up).
const ENTRY_OVERHEAD: usize = 128;

/// Replies remembered by one runner, at most `budget` bytes of them (estimated).
#[derive(Debug)]
pub(crate) struct RecentReplies {
    budget: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    replies: HashMap<MessageId, Reply>,
    /// Oldest first, with each reply's estimated size.
    order: VecDeque<(MessageId, usize)>,
    bytes: usize,
}

impl RecentReplies {
    /// An empty memory of at most `budget` bytes.
    pub(crate) fn new(budget: usize) -> Self {
        Self {
            budget,
            inner: Mutex::new(Inner::default()),
        }
    }

    // The lock is never held across an await; a panic while holding it leaves the maps
    // consistent enough (at worst a size slightly off), so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The reply of `id`, if it is remembered.
    pub(crate) fn get(&self, id: MessageId) -> Option<Reply> {
        self.lock().replies.get(&id).cloned()
    }

    /// Whether `id`'s reply is remembered.
    pub(crate) fn contains(&self, id: MessageId) -> bool {
        self.lock().replies.contains_key(&id)
    }

    /// Remembers `id`'s reply, forgetting the oldest ones while over the budget. A reply
    /// larger than the whole budget is not kept.
    pub(crate) fn remember(&self, id: MessageId, reply: Reply) {
        let size = ENTRY_OVERHEAD + reply_size(&reply);
        if size > self.budget {
            return;
        }
        let mut inner = self.lock();
        if inner.replies.insert(id, reply).is_some() {
            return;
        }
        inner.order.push_back((id, size));
        inner.bytes += size;
        while inner.bytes > self.budget {
            let Some((old, old_size)) = inner.order.pop_front() else {
                break;
            };
            inner.replies.remove(&old);
            inner.bytes -= old_size;
        }
    }

    /// Estimated bytes in use (never above the budget).
    pub(crate) fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Replies remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().replies.len()
    }
}

/// Heap bytes of a reply, estimated without serializing it.
fn reply_size(reply: &Reply) -> usize {
    match reply {
        Reply::Ok { value } => json_size(value),
        Reply::Err { code, message } => code.len() + message.len(),
    }
}

/// A JSON object is a B-tree: every 11 entries (or fewer) take one node allocation of
/// about this many bytes, whatever they hold.
const OBJECT_NODE: usize = 640;
const OBJECT_NODE_ENTRIES: usize = 11;

fn json_size(value: &serde_json::Value) -> usize {
    use serde_json::Value;
    // Each node is a `Value` (32 bytes) wherever it sits.
    32 + match value {
        Value::Null | Value::Bool(_) | Value::Number(_) => 0,
        Value::String(s) => s.len(),
        Value::Array(items) => items.iter().map(json_size).sum(),
        Value::Object(map) => {
            let nodes = map.len().div_ceil(OBJECT_NODE_ENTRIES).max(1);
            let entries: usize = map.iter().map(|(k, v)| k.len() + json_size(v)).sum();
            nodes * OBJECT_NODE + entries
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(n: i64) -> Reply {
        Reply::Ok {
            value: serde_json::json!({ "count": n, "note": "x".repeat(100) }),
        }
    }

    #[test]
    fn stays_within_its_budget_and_forgets_the_oldest_first() {
        let recent = RecentReplies::new(64 * 1024);
        for n in 0..10_000 {
            recent.remember(MessageId::new(n), ok(n));
            assert!(recent.bytes() <= 64 * 1024);
        }
        assert!(recent.len() > 50, "keeps what fits: {}", recent.len());
        assert!(recent.len() < 1_000, "forgets the rest: {}", recent.len());
        assert_eq!(recent.get(MessageId::new(9_999)), Some(ok(9_999)));
        assert!(!recent.contains(MessageId::new(0)));
    }

    #[test]
    fn a_reply_over_the_budget_is_not_kept() {
        let recent = RecentReplies::new(1024);
        let big = Reply::Err {
            code: "big".to_owned(),
            message: "x".repeat(4096),
        };
        recent.remember(MessageId::new(1), big);
        assert_eq!(recent.len(), 0);
        assert_eq!(recent.bytes(), 0);
    }
}
