//! What crosses the runner transport besides the envelope: the delivery a runner's runtime
//! is handed ([`Delivery`]), why it was refused ([`DeliveryError`], which says whether a
//! sender may retry), and what a runner reports about one entity ([`EntityStatus`]).
//! Senders (client, gateway) and the receiving runtime both import them from here, so no
//! sender imports the receiver.

use serde::{Deserialize, Serialize};

use crate::ids::{EntityAddress, ShardId};
use crate::message_storage::StoredMessage;

/// Why a delivery was not handled. Each variant says whether the sender may retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "code", content = "detail")]
pub enum DeliveryError {
    /// This runner does not own the entity's shard (any more): find the owner and retry.
    #[error("this runner does not own shard {0}")]
    NotOwner(ShardId),
    /// The entity has too many unfinished requests; retry after a short wait.
    #[error("mailbox of {0} is full")]
    MailboxFull(String),
    /// The runner hosts as many entities as it may; retry later.
    #[error("runner at its resident-entity limit")]
    Overloaded,
    /// No such entity type.
    #[error("unknown entity type `{0}`")]
    UnknownEntityType(String),
    /// The owner does not have this entity type (yet: a rolling upgrade). The persisted
    /// message is stored and waits for it with backoff; after the owner's
    /// `max-delivery-attempts` it is completed with the error reply `unknown_entity_type`.
    /// Retrying (with the same idempotency key) later reads what became of it.
    #[error(
        "entity type `{0}` is not deployed on its owner; the message is stored and runs once it is (or is answered `unknown_entity_type` after the owner's attempts)"
    )]
    TypeNotDeployed(String),
    /// The message does not decode for the type.
    #[error("{0}")]
    BadMessage(String),
    /// The handler panicked or failed retryably while handling this volatile message.
    #[error("the handler failed: {0}")]
    HandlerFailed(String),
    /// The shard is being drained or was fenced: retry with the next owner.
    #[error("shard {0} is moving to another runner")]
    ShardMoving(ShardId),
    /// Waiting for the reply took too long (the message may still be processed).
    #[error("timed out waiting for the reply")]
    Timeout,
}

impl DeliveryError {
    /// Whether retrying the same request may succeed (see [`DeliveryError::retry_class`]
    /// in `retry.rs` for whether it may run twice).
    pub fn is_retryable(&self) -> bool {
        self.retry_class().is_retryable()
    }
}

/// A message handed to the runtime.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// A message already in storage.
    Persisted {
        /// The stored message.
        message: StoredMessage,
        /// The sender met an earlier message with the same key: only wait for its reply
        /// (the stored one is what runs).
        duplicate: bool,
    },
    /// A message that lives only in this request.
    Volatile {
        /// The entity.
        address: EntityAddress,
        /// Message name.
        tag: String,
        /// Message body.
        payload: serde_json::Value,
    },
}

impl Delivery {
    pub(crate) fn address(&self) -> &EntityAddress {
        match self {
            Self::Persisted { message, .. } => &message.address,
            Self::Volatile { address, .. } => address,
        }
    }
}

/// What the runtime reports about one entity (for the explain endpoint).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntityStatus {
    /// Whether an actor is live for it.
    pub resident: bool,
    /// Unfinished requests.
    pub mailbox_depth: usize,
    /// The last handler error or panic, if any.
    pub last_error: Option<String>,
}
