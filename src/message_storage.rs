//! Message storage: persisted messages, their single final reply, and entity state.
//!
//! Guarantees every backend gives (checked by one conformance suite,
//! `tests/message_storage.rs`):
//! - [`MessageStorage::save`] stores a message once per idempotency key and entity: a
//!   duplicate gets the first message's id and its reply if there is one. Saving the same
//!   message again under its id is a no-op; a *different* message under a taken id is
//!   refused with [`MessageStorageError::IdTaken`], never merged into the first.
//! - [`MessageStorage::unprocessed`] lists a shard's backlog in id (insertion) order, only
//!   rows whose `deliver_at` has come; [`MessageStorage::unprocessed_after`] pages through
//!   it by id.
//! - [`MessageStorage::complete`] marks a message processed, stores its one reply and
//!   writes the entity's new state **in one transaction that commits only if the shard's
//!   epoch is still the completing owner's** and the message was not already processed.
//!   Otherwise nothing at all is written. The same transaction inserts the completion's
//!   **outbox** ([`Completion::outbox`]: messages its handler sent or scheduled), with the
//!   deduplication [`MessageStorage::save`] applies (a message whose idempotency key the
//!   target entity already holds, or whose id is taken, is not inserted), so a state
//!   change and the messages it causes commit together or not at all.
//! - One caller's bad data stays its own: a message storage cannot hold is refused alone
//!   with [`MessageStorageError::Unstorable`] (never retryable), and a completion whose
//!   reply or state cannot be stored completes its message once with the error reply
//!   [`storable::UNSTORABLE_REPLY`] instead ([`CompletionOutcome::Unstorable`]). Neither
//!   fails the requests batched with it.
//! - [`MessageStorage::purge`] removes processed messages (and their replies) processed
//!   before a cutoff, in bounded batches; unprocessed messages are never removed.
//!
//! Backends: [`postgres`] (group commit: concurrent saves and completions are batched into
//! multi-row statements) and [`memory`].

pub mod memory;
pub mod postgres;
pub mod storable;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{EntityAddress, Epoch, MessageId, ShardId};

/// Errors of message storage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageStorageError {
    /// The database could not be reached; retrying is safe (saves are idempotent by id).
    #[error("message storage unavailable: {0}")]
    Unavailable(String),
    /// The storage is shutting down.
    #[error("message storage is shutting down")]
    Shutdown,
    /// Another message already holds this id (two nodes generated the same snowflake:
    /// they share a machine id). Nothing was stored; save the message under a new id.
    #[error("message id {0} is taken by another message; save it under a new id")]
    IdTaken(MessageId),
    /// Storage cannot hold this message's data (a NUL character in a string, or a value
    /// the database refused as data: SQLSTATE class 22, 23 or 54). Nothing was stored;
    /// the same request will be refused again, so it is not retryable.
    #[error("`{field}` cannot be stored: {problem}")]
    Unstorable {
        /// What holds the problem: a column (`idempotency_key`) or a JSON pointer under
        /// `payload`, `reply` or `state` (`payload/items/3`).
        field: String,
        /// What is wrong with it.
        problem: String,
    },
    /// Anything else.
    #[error("message storage error: {0}")]
    Other(String),
}

impl MessageStorageError {
    /// Whether the same call may succeed later (for `IdTaken`: under a new id).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::IdTaken(_))
    }
}

/// A message to persist.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    /// Its id (snowflake, from the sender).
    pub id: MessageId,
    /// The shard of its entity.
    pub shard: ShardId,
    /// Its entity.
    pub address: EntityAddress,
    /// The message's name (`increment`).
    pub tag: String,
    /// The message's body.
    pub payload: serde_json::Value,
    /// Deduplication key, unique per entity.
    pub idempotency_key: Option<String>,
    /// Not delivered before this instant.
    pub deliver_at: Option<DateTime<Utc>>,
}

/// A stored, unprocessed message.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    /// Its id.
    pub id: MessageId,
    /// Its shard.
    pub shard: ShardId,
    /// Its entity.
    pub address: EntityAddress,
    /// The message's name.
    pub tag: String,
    /// The body as stored (decoding may still fail: that is the entity's to report).
    pub payload: serde_json::Value,
    /// Its deduplication key.
    pub idempotency_key: Option<String>,
    /// When it becomes due.
    pub deliver_at: Option<DateTime<Utc>>,
    /// How many times delivery was started before.
    pub attempts: i32,
}

impl From<NewMessage> for StoredMessage {
    fn from(m: NewMessage) -> Self {
        Self {
            id: m.id,
            shard: m.shard,
            address: m.address,
            tag: m.tag,
            payload: m.payload,
            idempotency_key: m.idempotency_key,
            deliver_at: m.deliver_at,
            attempts: 0,
        }
    }
}

/// A final reply: the handler's value, or its error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Reply {
    /// The handler succeeded.
    Ok {
        /// The reply value.
        value: serde_json::Value,
    },
    /// The handler failed for good (or the message could not be decoded).
    Err {
        /// A machine-readable code.
        code: String,
        /// What happened.
        message: String,
    },
}

/// What [`MessageStorage::save`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum SaveOutcome {
    /// Stored as a new message.
    Stored(MessageId),
    /// A message with the same idempotency key exists: its id, and its reply if done.
    Duplicate {
        /// The first message's id.
        id: MessageId,
        /// Its reply, if it was processed.
        reply: Option<Reply>,
    },
}

impl SaveOutcome {
    /// The id of the message the caller should wait for.
    pub fn id(&self) -> MessageId {
        match self {
            Self::Stored(id) | Self::Duplicate { id, .. } => *id,
        }
    }
}

/// Completing one message.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The message.
    pub message_id: MessageId,
    /// Its shard.
    pub shard: ShardId,
    /// The epoch the completing owner holds the shard under.
    pub epoch: Epoch,
    /// The final reply.
    pub reply: Reply,
    /// The entity's new state, written in the same transaction.
    pub state: Option<(EntityAddress, serde_json::Value)>,
    /// Messages the handler sent or scheduled (a transactional outbox): inserted in the
    /// same transaction, only if it commits, deduplicated as [`MessageStorage::save`] does
    /// (no `Duplicate` answer: a message meeting an earlier one is simply not inserted).
    pub outbox: Vec<NewMessage>,
}

/// What [`MessageStorage::complete`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletionOutcome {
    /// Reply, processed flag, state and outbox committed together.
    Committed,
    /// The message was already processed (a redelivery): nothing written.
    AlreadyProcessed,
    /// The shard's epoch moved on (the owner was fenced): nothing written.
    Fenced,
    /// The reply, the state or an outbox message could not be stored: the message was
    /// completed with the error reply [`storable::UNSTORABLE_REPLY`] instead (read it with
    /// [`MessageStorage::reply`]); neither the state nor the outbox was written.
    Unstorable,
}

/// How big storage is, for the storage metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StorageStats {
    /// Rows in the messages table (Postgres: the planner's estimate, `pg_class.reltuples`,
    /// for every cluster in the database; memory: exact).
    pub messages: u64,
    /// Rows in the replies table (same sources).
    pub replies: u64,
    /// When the oldest message this cluster still keeps (processed or not) was created.
    pub oldest_kept: Option<DateTime<Utc>>,
}

/// An entity's state written before its message completes
/// ([`MessageStorage::checkpoint_state`]).
#[derive(Debug, Clone, PartialEq)]
pub struct StateCheckpoint {
    /// The entity.
    pub address: EntityAddress,
    /// Its shard, whose epoch fences the write.
    pub shard: ShardId,
    /// The epoch the writer owns the shard under.
    pub epoch: Epoch,
    /// The message being handled.
    pub message_id: MessageId,
    /// The state to show until the completion.
    pub state: serde_json::Value,
}

/// Persisted message storage of one cluster.
#[async_trait]
pub trait MessageStorage: Send + Sync + std::fmt::Debug + 'static {
    /// Stores a message unless its idempotency key was seen for the entity.
    async fn save(&self, message: NewMessage) -> Result<SaveOutcome, MessageStorageError>;

    /// Unprocessed messages of `shard` due by `now`, in id order, at most `limit`.
    async fn unprocessed(
        &self,
        shard: ShardId,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, MessageStorageError> {
        self.unprocessed_after(shard, now, None, limit).await
    }

    /// One page of [`MessageStorage::unprocessed`]: only ids above `after` (a scan's
    /// cursor; `None` starts at the beginning).
    async fn unprocessed_after(
        &self,
        shard: ShardId,
        now: DateTime<Utc>,
        after: Option<MessageId>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, MessageStorageError>;

    /// Counts one more delivery attempt of an unprocessed message and makes it due no
    /// earlier than `until` (a message its owner cannot run yet waits there, out of the
    /// way of scans).
    async fn postpone(
        &self,
        id: MessageId,
        until: DateTime<Utc>,
    ) -> Result<(), MessageStorageError>;

    /// The earliest `deliver_at` after `now` among `shard`'s unprocessed messages.
    async fn next_due(
        &self,
        shard: ShardId,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, MessageStorageError>;

    /// Completes a message (see the module doc for the guarantee).
    async fn complete(
        &self,
        completion: Completion,
    ) -> Result<CompletionOutcome, MessageStorageError>;

    /// Which of `shards` have unprocessed, due messages created before `created_before`
    /// (one cheap query for a runner's periodic backlog sweep).
    async fn shards_with_backlog(
        &self,
        shards: &[ShardId],
        created_before: MessageId,
        now: DateTime<Utc>,
    ) -> Result<Vec<ShardId>, MessageStorageError>;

    /// Unprocessed messages of one entity: how many, and when the oldest was created.
    async fn entity_backlog(
        &self,
        address: &EntityAddress,
    ) -> Result<(u64, Option<DateTime<Utc>>), MessageStorageError>;

    /// Writes an entity's state while its message `checkpoint.message_id` is still being
    /// handled, under the shard's epoch: what the entity shows readers (and reloads on a
    /// redelivery) until the message's completion writes the state after it. `false` when
    /// the shard moved (nothing written).
    async fn checkpoint_state(
        &self,
        checkpoint: StateCheckpoint,
    ) -> Result<bool, MessageStorageError>;

    /// The unprocessed message of one entity stored under idempotency key `key`, if any:
    /// what a reader asks of a message whose sender returned once it was stored, before its
    /// entity has run it.
    async fn pending_with_key(
        &self,
        address: &EntityAddress,
        key: &str,
    ) -> Result<Option<StoredMessage>, MessageStorageError>;

    /// Counts one more delivery attempt of `ids`.
    async fn record_attempts(&self, ids: &[MessageId]) -> Result<(), MessageStorageError>;

    /// The stored reply of a message, if it was processed.
    async fn reply(&self, id: MessageId) -> Result<Option<Reply>, MessageStorageError>;

    /// The state last committed for an entity.
    async fn load_state(
        &self,
        address: &EntityAddress,
    ) -> Result<Option<serde_json::Value>, MessageStorageError>;

    /// Removes at most `limit` processed messages of this cluster, oldest first, that were
    /// created and processed before `processed_before`, with their replies; returns how
    /// many. Unprocessed messages are never removed. Their idempotency keys are forgotten
    /// with them: a later send with the same key is a new message.
    async fn purge(
        &self,
        processed_before: DateTime<Utc>,
        limit: usize,
    ) -> Result<u64, MessageStorageError>;

    /// Row counts and the oldest kept message.
    async fn stats(&self) -> Result<StorageStats, MessageStorageError>;
}
