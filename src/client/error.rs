//! Why a request got no reply ([`ClientError`]), and what sending it again can do
//! ([`ClientError::retry_class`]): a volatile ask is retried by the client only on failures
//! where nothing ran, so the errors it returns say whether the handler may have run; a
//! persisted ask's errors (after storing) say the message is stored and a resend with the
//! same key is deduplicated.

use std::time::Duration;

use crate::ids::{EntityAddress, EntityType, MessageId};
use crate::message_storage::MessageStorageError;
use crate::retry::RetryClass;
use crate::transport::DeliveryError;

/// Why a request got no reply.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClientError {
    /// The owner refused the message for good (unknown type, bad message) or for now
    /// (mailbox full).
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    /// No runner is alive.
    #[error("no live runners")]
    NoRunners,
    /// A volatile message's owner was lost mid-request: it may or may not have run.
    #[error("the owner was lost while handling a volatile message: {0}")]
    OwnerLost(String),
    /// The deadline passed. A persisted message stays stored and will run; its reply can be
    /// read later by id.
    #[error("no reply within {timeout:?}")]
    Timeout {
        /// The deadline that passed.
        timeout: Duration,
        /// The stored message, if persisted.
        message_id: Option<MessageId>,
    },
    /// Message storage failed.
    #[error(transparent)]
    Storage(#[from] MessageStorageError),
    /// A runner refused this node's cluster secret.
    #[error("a runner refused this node's cluster secret")]
    Unauthorized,
    /// A handler asked its own entity: its mailbox is held by the asking handler, so the
    /// ask could only wait out its deadline. Refused at once; nothing was sent.
    #[error("{0} asked itself; a handler cannot wait on its own mailbox (send instead)")]
    SelfAsk(EntityAddress),
    /// The entity runtime running this handler was built without a client
    /// ([`crate::entity_runtime::EntityRuntime::connect`]); nothing was sent.
    #[error("this entity runtime has no client to reach other entities with")]
    NotConnected,
    /// A handler made more calls through its context than one message may
    /// ([`crate::entity::MAX_CALLS_PER_MESSAGE`]); nothing more was sent.
    #[error("a handler may make at most {0} calls per message")]
    TooManyCalls(u32),
    /// The handler answered with an error reply (final; for a persisted message it is the
    /// stored reply, which a resend with the same key reads again).
    #[error("the handler replied with error `{code}`: {message}")]
    ErrorReply {
        /// The handler's machine-readable code.
        code: String,
        /// What happened.
        message: String,
    },
    /// The reply does not decode as the type's reply: the caller and the entity's runner
    /// disagree on the type (different versions). The message was handled.
    #[error("the reply of `{entity_type}` does not decode: {problem}")]
    BadReply {
        /// The entity type.
        entity_type: EntityType,
        /// serde's description.
        problem: String,
    },
    /// A typed request could not be built (a bad entity id, a volatile message with a
    /// delivery time or key, `send` of a volatile message): nothing was sent.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl ClientError {
    /// Whether the same request may succeed if sent again ([`Self::retry_class`] says
    /// whether it may also run twice).
    pub fn is_retryable(&self) -> bool {
        self.retry_class().is_retryable()
    }

    /// What sending the same request again can do.
    pub fn retry_class(&self) -> RetryClass {
        match self {
            // Volatile: any class. Persisted: only `Never` ones surface (`await_persisted`).
            Self::Delivery(error) => error.retry_class(),
            // Volatile only (a persisted ask waits for an owner): nothing was sent.
            Self::NoRunners => RetryClass::Safe,
            Self::OwnerLost(_) => RetryClass::MayRunTwice,
            // The message is stored and runs; its key (or id) finds it again.
            Self::Timeout {
                message_id: Some(_),
                ..
            } => RetryClass::SafeWithSameKey,
            // A volatile ask only runs out of time between attempts that reached no handler
            // (an attempt that reached one answers `Delivery(Timeout)` or `OwnerLost`).
            Self::Timeout {
                message_id: None, ..
            } => RetryClass::Safe,
            // Storage is only on the persisted path. A failed save may have committed (the
            // answer was lost), and a failed reply read follows a save that did.
            Self::Storage(MessageStorageError::Unavailable(_) | MessageStorageError::Shutdown) => {
                RetryClass::SafeWithSameKey
            }
            // Refused after eight fresh ids: nothing was stored.
            Self::Storage(MessageStorageError::IdTaken(_)) => RetryClass::Safe,
            // The statement failed on what it was given: a resend fails the same way.
            Self::Storage(MessageStorageError::Other(_)) => RetryClass::Never,
            // Storage cannot hold what was sent (a NUL, a refused value): nothing was
            // stored, and the same request is refused again.
            Self::Storage(MessageStorageError::Unstorable { .. }) => RetryClass::Never,
            Self::Unauthorized => RetryClass::Never,
            // Refused before anything was sent, and refused the same way again.
            Self::SelfAsk(_) | Self::NotConnected | Self::TooManyCalls(_) => RetryClass::Never,
            // The reply is final: a resend with the same key reads it again.
            Self::ErrorReply { .. } => RetryClass::Never,
            // The handler ran; a resend gets a reply that does not decode either.
            Self::BadReply { .. } => RetryClass::Never,
            // Nothing was sent, and the same request is refused again.
            Self::InvalidRequest(_) => RetryClass::Never,
        }
    }
}
