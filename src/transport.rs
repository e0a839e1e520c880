//! The runner transport: how a node hands a message to the runner that owns its entity.
//!
//! [`Transport`] is the sending side. [`http`] implements it over HTTP/2 (a pooled,
//! multiplexed reqwest client; the runner serves the route with axum) with a versioned JSON
//! envelope and the cluster's shared secret; [`local`] implements it in process for tests.
//! Why not ractor_cluster: see `docs/ARCHITECTURE.md` (no reconnect, no keepalive, panics on
//! undecodable payloads, unbounded writer queue).
//!
//! [`TransportError::retry_class`] tells a sender whether the envelope can have run: only
//! `Unreachable` (nothing left this node) is safe to resend to the next owner as it is.

pub mod http;
pub mod local;
pub mod wire;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{EntityAddress, EntityId, EntityType, MessageId, ShardId};
use crate::message_storage::{Reply, StoredMessage};
use crate::retry::RetryClass;
pub use wire::{Delivery, DeliveryError, EntityStatus};

/// The envelope version this build speaks.
pub const ENVELOPE_VERSION: u16 = 1;

/// A message on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Format version; a runner refuses versions it does not know.
    pub version: u16,
    /// Entity type.
    pub entity_type: EntityType,
    /// Entity id.
    pub entity_id: EntityId,
    /// Message name.
    pub tag: String,
    /// Message body.
    pub payload: serde_json::Value,
    /// Set for persisted messages (already stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persisted: Option<PersistedInfo>,
    /// The request id of the request that caused this message, for logs and spans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// What a persisted message carries besides its content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersistedInfo {
    /// The stored message's id.
    pub message_id: MessageId,
    /// Its shard.
    pub shard: ShardId,
    /// Its idempotency key.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// When it is due.
    #[serde(default)]
    pub deliver_at: Option<DateTime<Utc>>,
    /// The sender met an earlier message with the same key: only wait for its reply.
    #[serde(default)]
    pub duplicate: bool,
}

impl Envelope {
    /// The entity address.
    pub fn address(&self) -> EntityAddress {
        EntityAddress {
            entity_type: self.entity_type.clone(),
            entity_id: self.entity_id.clone(),
        }
    }

    /// The delivery the runtime executes.
    pub fn into_delivery(self) -> Delivery {
        let address = self.address();
        match self.persisted {
            Some(info) => Delivery::Persisted {
                message: StoredMessage {
                    id: info.message_id,
                    shard: info.shard,
                    address,
                    tag: self.tag,
                    payload: self.payload,
                    idempotency_key: info.idempotency_key,
                    deliver_at: info.deliver_at,
                    attempts: 0,
                },
                duplicate: info.duplicate,
            },
            None => Delivery::Volatile {
                address,
                tag: self.tag,
                payload: self.payload,
            },
        }
    }
}

/// Why a delivery over the transport failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The runner answered with a delivery error.
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    /// The runner could not be reached; nothing was sent.
    #[error("runner {address} unreachable: {reason}")]
    Unreachable {
        /// The runner.
        address: String,
        /// Why.
        reason: String,
    },
    /// The request was sent but no answer came (the runner may have processed it).
    #[error("runner {address} did not answer: {reason}")]
    Lost {
        /// The runner.
        address: String,
        /// Why.
        reason: String,
    },
    /// The runner refused our credentials.
    #[error("runner {0} refused the cluster secret")]
    Unauthorized(String),
    /// The runner answered something unintelligible.
    #[error("protocol error from {address}: {reason}")]
    Protocol {
        /// The runner.
        address: String,
        /// What was wrong.
        reason: String,
    },
}

impl TransportError {
    /// What resending the delivery can do.
    pub fn retry_class(&self) -> RetryClass {
        match self {
            Self::Delivery(error) => error.retry_class(),
            // Never queued, or not connected: nothing went out.
            Self::Unreachable { .. } => RetryClass::Safe,
            // It went out and the answer did not come back (or made no sense): it may have
            // run.
            Self::Lost { .. } | Self::Protocol { .. } => RetryClass::MayRunTwice,
            // A configuration mismatch: every resend is refused the same way.
            Self::Unauthorized(_) => RetryClass::Never,
        }
    }
}

/// Sends envelopes to runners.
#[async_trait]
pub trait Transport: Send + Sync + std::fmt::Debug + 'static {
    /// Delivers `envelope` to the runner at `address` and waits for the reply.
    async fn deliver(
        &self,
        address: &str,
        envelope: Envelope,
        timeout: Duration,
    ) -> Result<Reply, TransportError>;

    /// What the runner at `address` knows about `entity` (resident, mailbox, last error).
    async fn entity_status(
        &self,
        address: &str,
        entity: &EntityAddress,
    ) -> Result<EntityStatus, TransportError>;
}

impl DeliveryError {
    /// What resending this (volatile) delivery can do. See the module docs for persisted.
    pub fn retry_class(&self) -> RetryClass {
        match self {
            // Refused before the shard admitted it: nothing ran.
            Self::NotOwner(_) | Self::ShardMoving(_) => RetryClass::Safe,
            // Refused at admission (mailbox counted full, resident cap): nothing ran.
            Self::MailboxFull(_) | Self::Overloaded => RetryClass::Safe,
            Self::UnknownEntityType(_) | Self::BadMessage(_) => RetryClass::Never,
            // Mostly a handler that panicked or a shard stopped with the message in the
            // entity's mailbox; "restarting after a failure" (nothing ran) shares the
            // variant, so the class is the cautious one.
            Self::HandlerFailed(_) => RetryClass::MayRunTwice,
            // The runner gave up waiting; the admitted message may still run.
            Self::Timeout => RetryClass::MayRunTwice,
            // Only persisted messages wait for their type: the message is stored and runs
            // once the type is deployed (or ends with `unknown_entity_type`).
            Self::TypeNotDeployed(_) => RetryClass::SafeWithSameKey,
        }
    }
}
