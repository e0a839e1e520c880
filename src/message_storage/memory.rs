//! In-memory message storage, for tests of the runtime in one process. Shard epochs come
//! from a `MemoryRunnerStorage`-like source: the storage is told the current epoch of
//! each shard through [`MemoryMessageStorage::set_epoch`]. It refuses what PostgreSQL
//! refuses (see [`super::storable`]), so the conformance suite holds for both.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::storable::{check_message, check_state, completion_problem, unstorable_completion};
use super::{
    Completion, CompletionOutcome, MessageStorage, MessageStorageError, NewMessage, Reply,
    SaveOutcome, StateCheckpoint, StorageStats, StoredMessage,
};
use crate::ids::{EntityAddress, Epoch, MessageId, ShardId};

#[derive(Debug, Default)]
struct State {
    messages: BTreeMap<MessageId, (StoredMessage, bool)>,
    keys: HashMap<(EntityAddress, String), MessageId>,
    replies: HashMap<MessageId, Reply>,
    processed_at: HashMap<MessageId, DateTime<Utc>>,
    states: HashMap<EntityAddress, serde_json::Value>,
    epochs: HashMap<ShardId, Epoch>,
}

/// Message storage held in memory. Clones share state.
#[derive(Debug, Clone, Default)]
pub struct MemoryMessageStorage {
    state: Arc<Mutex<State>>,
}

impl MemoryMessageStorage {
    /// Empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the shard's current epoch (the owner's acquisition does this in Postgres).
    pub fn set_epoch(&self, shard: ShardId, epoch: Epoch) {
        self.lock().epochs.insert(shard, epoch);
    }

    /// Delivery attempts counted for a message (0 if unknown).
    pub fn attempts(&self, id: MessageId) -> i32 {
        self.lock().messages.get(&id).map_or(0, |(m, _)| m.attempts)
    }

    /// Whether a message is marked processed.
    pub fn is_processed(&self, id: MessageId) -> bool {
        self.lock().messages.get(&id).is_some_and(|(_, p)| *p)
    }

    /// Every stored message of one entity, processed or not, in id order.
    pub fn messages_of(&self, address: &EntityAddress) -> Vec<StoredMessage> {
        self.lock()
            .messages
            .values()
            .filter(|(m, _)| &m.address == address)
            .map(|(m, _)| m.clone())
            .collect()
    }
}

/// Stores a message unless its id or its idempotency key (for its entity) is taken: what
/// both a save and a completion's outbox do.
fn insert(state: &mut State, message: NewMessage) -> Result<SaveOutcome, MessageStorageError> {
    if let Some((stored, _)) = state.messages.get(&message.id) {
        // The same message saved again is stored; another one under its id is not.
        let same = stored.address == message.address
            && stored.tag == message.tag
            && stored.payload == message.payload
            && stored.idempotency_key == message.idempotency_key;
        return if same {
            Ok(SaveOutcome::Stored(message.id))
        } else {
            Err(MessageStorageError::IdTaken(message.id))
        };
    }
    if let Some(key) = &message.idempotency_key {
        let slot = (message.address.clone(), key.clone());
        if let Some(first) = state.keys.get(&slot).copied() {
            return Ok(SaveOutcome::Duplicate {
                id: first,
                reply: state.replies.get(&first).cloned(),
            });
        }
        state.keys.insert(slot, message.id);
    }
    let id = message.id;
    state.messages.insert(id, (message.into(), false));
    Ok(SaveOutcome::Stored(id))
}

#[async_trait]
impl MessageStorage for MemoryMessageStorage {
    async fn save(&self, message: NewMessage) -> Result<SaveOutcome, MessageStorageError> {
        check_message(&message)?;
        insert(&mut self.lock(), message)
    }

    async fn unprocessed_after(
        &self,
        shard: ShardId,
        now: DateTime<Utc>,
        after: Option<MessageId>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, MessageStorageError> {
        use std::ops::Bound;
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(self
            .lock()
            .messages
            .range((from, Bound::Unbounded))
            .map(|(_, row)| row)
            .filter(|(m, processed)| {
                !processed && m.shard == shard && m.deliver_at.is_none_or(|at| at <= now)
            })
            .take(limit)
            .map(|(m, _)| m.clone())
            .collect())
    }

    async fn next_due(
        &self,
        shard: ShardId,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, MessageStorageError> {
        Ok(self
            .lock()
            .messages
            .values()
            .filter(|(m, processed)| !processed && m.shard == shard)
            .filter_map(|(m, _)| m.deliver_at)
            .filter(|at| *at > now)
            .min())
    }

    async fn complete(
        &self,
        completion: Completion,
    ) -> Result<CompletionOutcome, MessageStorageError> {
        let (completion, unstorable) = match completion_problem(&completion) {
            Some(problem) => (unstorable_completion(&completion, &problem), true),
            None => (completion, false),
        };
        let mut state = self.lock();
        if state.epochs.get(&completion.shard) != Some(&completion.epoch) {
            return Ok(CompletionOutcome::Fenced);
        }
        match state.messages.get_mut(&completion.message_id) {
            Some((_, processed)) if !*processed => *processed = true,
            _ => return Ok(CompletionOutcome::AlreadyProcessed),
        }
        state.processed_at.insert(completion.message_id, Utc::now());
        state
            .replies
            .insert(completion.message_id, completion.reply);
        if let Some((address, value)) = completion.state {
            state.states.insert(address, value);
        }
        for message in completion.outbox {
            // As Postgres' `ON CONFLICT DO NOTHING`: a taken id or key inserts nothing.
            let _ = insert(&mut state, message);
        }
        Ok(if unstorable {
            CompletionOutcome::Unstorable
        } else {
            CompletionOutcome::Committed
        })
    }

    async fn shards_with_backlog(
        &self,
        shards: &[ShardId],
        created_before: MessageId,
        now: DateTime<Utc>,
    ) -> Result<Vec<ShardId>, MessageStorageError> {
        let mut found: Vec<ShardId> = self
            .lock()
            .messages
            .values()
            .filter(|(m, processed)| {
                !processed
                    && shards.contains(&m.shard)
                    && m.id < created_before
                    && m.deliver_at.is_none_or(|at| at <= now)
            })
            .map(|(m, _)| m.shard)
            .collect();
        found.sort();
        found.dedup();
        Ok(found)
    }

    async fn entity_backlog(
        &self,
        address: &EntityAddress,
    ) -> Result<(u64, Option<DateTime<Utc>>), MessageStorageError> {
        let state = self.lock();
        let backlog: Vec<MessageId> = state
            .messages
            .values()
            .filter(|(m, processed)| !processed && &m.address == address)
            .map(|(m, _)| m.id)
            .collect();
        let oldest = backlog.iter().min().and_then(|id| {
            let ms = crate::snowflake::created_ms(*id) as i64 + crate::snowflake::EPOCH_MS as i64;
            DateTime::from_timestamp_millis(ms)
        });
        Ok((backlog.len() as u64, oldest))
    }

    async fn checkpoint_state(
        &self,
        checkpoint: StateCheckpoint,
    ) -> Result<bool, MessageStorageError> {
        check_state(&checkpoint.state)?;
        let mut state = self.lock();
        if state.epochs.get(&checkpoint.shard) != Some(&checkpoint.epoch) {
            return Ok(false);
        }
        state.states.insert(checkpoint.address, checkpoint.state);
        Ok(true)
    }

    async fn pending_with_key(
        &self,
        address: &EntityAddress,
        key: &str,
    ) -> Result<Option<StoredMessage>, MessageStorageError> {
        let state = self.lock();
        Ok(state
            .messages
            .values()
            .find(|(m, processed)| {
                !processed && &m.address == address && m.idempotency_key.as_deref() == Some(key)
            })
            .map(|(m, _)| m.clone()))
    }

    async fn record_attempts(&self, ids: &[MessageId]) -> Result<(), MessageStorageError> {
        let mut state = self.lock();
        for id in ids {
            if let Some((m, _)) = state.messages.get_mut(id) {
                m.attempts += 1;
            }
        }
        Ok(())
    }

    async fn postpone(
        &self,
        id: MessageId,
        until: DateTime<Utc>,
    ) -> Result<(), MessageStorageError> {
        if let Some((m, false)) = self.lock().messages.get_mut(&id) {
            m.attempts += 1;
            m.deliver_at = Some(until);
        }
        Ok(())
    }

    async fn reply(&self, id: MessageId) -> Result<Option<Reply>, MessageStorageError> {
        Ok(self.lock().replies.get(&id).cloned())
    }

    async fn load_state(
        &self,
        address: &EntityAddress,
    ) -> Result<Option<serde_json::Value>, MessageStorageError> {
        Ok(self.lock().states.get(address).cloned())
    }

    async fn purge(
        &self,
        processed_before: DateTime<Utc>,
        limit: usize,
    ) -> Result<u64, MessageStorageError> {
        let mut state = self.lock();
        let cutoff = crate::snowflake::first_id_at(processed_before);
        let gone: Vec<MessageId> = state
            .messages
            .range(..cutoff)
            .filter(|(id, (_, processed))| {
                *processed
                    && state
                        .processed_at
                        .get(id)
                        .is_some_and(|at| *at < processed_before)
            })
            .map(|(id, _)| *id)
            .take(limit)
            .collect();
        for id in &gone {
            if let Some((message, _)) = state.messages.remove(id)
                && let Some(key) = message.idempotency_key
            {
                state.keys.remove(&(message.address, key));
            }
            state.replies.remove(id);
            state.processed_at.remove(id);
        }
        Ok(gone.len() as u64)
    }

    async fn stats(&self) -> Result<StorageStats, MessageStorageError> {
        let state = self.lock();
        Ok(StorageStats {
            messages: state.messages.len() as u64,
            replies: state.replies.len() as u64,
            oldest_kept: state
                .messages
                .keys()
                .next()
                .and_then(|id| crate::snowflake::created_at(*id)),
        })
    }
}
