//! One request to an entity ([`Request`]): what the client sends and a handler's context
//! passes on. Below both, so neither depends on the other through it.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::ids::EntityAddress;

/// One request to an entity.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The entity.
    pub address: EntityAddress,
    /// Message name.
    pub tag: String,
    /// Message body.
    pub payload: serde_json::Value,
    /// Store before delivery (at-least-once) or deliver directly (volatile).
    pub persisted: bool,
    /// Deduplication key (persisted only).
    pub idempotency_key: Option<String>,
    /// Deliver no earlier than this (persisted only).
    pub deliver_at: Option<DateTime<Utc>>,
    /// Deadline for the reply; the client's default when None.
    pub timeout: Option<Duration>,
    /// The id of the outside request this one serves (logged by the runner).
    pub request_id: Option<String>,
}

impl Request {
    /// A volatile request.
    pub fn volatile(
        address: EntityAddress,
        tag: impl Into<String>,
        payload: serde_json::Value,
    ) -> Self {
        Self {
            address,
            tag: tag.into(),
            payload,
            persisted: false,
            idempotency_key: None,
            deliver_at: None,
            timeout: None,
            request_id: None,
        }
    }

    /// A persisted request.
    pub fn persisted(
        address: EntityAddress,
        tag: impl Into<String>,
        payload: serde_json::Value,
    ) -> Self {
        Self {
            persisted: true,
            ..Self::volatile(address, tag, payload)
        }
    }

    /// With an idempotency key.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// With a deadline.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}
