//! Defining entity types.
//!
//! An entity type is a Rust type implementing [`EntityProtocol`] (what every caller needs
//! to know: its name, its message enum, its reply, which messages are persisted, their
//! idempotency keys, and the options every kind shares) and one of the two kinds:
//!
//! - [`Entity`]: one message at a time, the handler owns the state (`&mut State`), which
//!   may be kept in Postgres ([`Entity::PERSIST_STATE`]).
//! - [`ConcurrentEntity`]: up to [`ConcurrentEntity::CONCURRENCY`] messages at once per
//!   entity, sharing the state (`&State`), in memory only.
//!
//! Messages are serde enums, externally tagged, so `{"increment": {...}}` is message
//! `increment` with that body ([`encode_message`] splits one into name and body: the wire
//! format is JSON, so the gateway and other languages reach the same types). Both kinds may
//! build or load their state when an entity activates (`on_activate`, with the address in
//! hand) and see it once more when it passivates (`on_passivate`); both hooks are bounded
//! by [`EntityOptions`] timeouts.
//!
//! Registering a type on a node is one call ([`EntityRegistry::register`] or
//! [`EntityRegistry::register_concurrent`]), which validates [`EntityProtocol::NAME`] and the
//! options once. The runtime sees types only through a crate-private erased interface, so it
//! knows nothing of the types in `entities/`. A handler reaches other entities (ask, send,
//! schedule) through its [`EntityContext`] (see `context.rs`).

mod access;
pub(crate) mod context;
mod erased;
mod registry;

pub use access::{AccessDenied, Caller, GatewayAccess, TenantScope};
pub use context::MAX_CALLS_PER_MESSAGE;

use std::future::Future;
use std::num::NonZeroUsize;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::client::error::ClientError;
use crate::ids::{EntityAddress, EntityType, Epoch, MessageId, RunnerId, ShardId};

mod schemas;

pub(crate) use context::Outbound;
pub(crate) use erased::{AnyMessage, AnyState, ErasedEntity};
pub use registry::{EntityRegistry, RegistryError};
pub use schemas::EntitySchemas;

/// Runtime options every kind of entity type has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityOptions {
    /// Unfinished requests one entity may have; past it, volatile sends get `MailboxFull`
    /// and persisted ones wait in storage. Default 64.
    pub mailbox_capacity: NonZeroUsize,
    /// An entity with nothing to do for this long is passivated. Default 60 s.
    pub max_idle: Duration,
    /// Longest the activation hook may take. Past it (or when the hook fails) the delivery
    /// fails as a retryable handler failure does: the entity restarts with backoff and its
    /// persisted messages are replayed; a volatile caller gets `HandlerFailed`. Default 5 s.
    pub activation_timeout: Duration,
    /// Longest the passivation hook may take; past it the entity stops anyway. Default 5 s.
    pub passivation_timeout: Duration,
}

impl Default for EntityOptions {
    fn default() -> Self {
        Self {
            mailbox_capacity: NonZeroUsize::new(64).unwrap_or(NonZeroUsize::MIN),
            max_idle: Duration::from_secs(60),
            activation_timeout: Duration::from_secs(5),
            passivation_timeout: Duration::from_secs(5),
        }
    }
}

/// A handler's failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct HandlerError {
    /// Machine-readable code.
    pub code: String,
    /// What happened.
    pub message: String,
    /// If true the message is retried (the entity restarts with backoff); if false the
    /// error is the message's final reply.
    pub retryable: bool,
}

impl HandlerError {
    /// A final error: stored as the reply, never retried.
    pub fn permanent(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            retryable: false,
        }
    }

    /// A transient error: the message is delivered again after a backoff.
    pub fn retryable(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            retryable: true,
        }
    }
}

impl From<ClientError> for HandlerError {
    /// A failed call fails the handler: retryably when a resend may succeed (the message
    /// is delivered again, and its calls, keyed by message id and ordinal, are deduplicated).
    fn from(error: ClientError) -> Self {
        let code = match &error {
            ClientError::SelfAsk(_) => "self_ask",
            ClientError::Timeout { .. } => "call_timeout",
            _ => "call_failed",
        };
        Self {
            code: code.to_owned(),
            message: error.to_string(),
            retryable: error.is_retryable(),
        }
    }
}

/// What a handler knows about the message it handles (the cluster context that tracing
/// spans carry too), and its way to other entities: [`EntityContext::ask`],
/// [`EntityContext::send`], [`EntityContext::schedule`].
#[derive(Debug, Clone)]
pub struct EntityContext {
    /// The entity.
    pub address: EntityAddress,
    /// Its shard.
    pub shard: ShardId,
    /// The epoch this runner owns the shard under.
    pub epoch: Epoch,
    /// This runner.
    pub runner_id: Option<RunnerId>,
    /// The persisted message's id (None for volatile messages).
    pub message_id: Option<MessageId>,
    /// Earlier delivery attempts of this message.
    pub attempts: i32,
    /// The calls this handling makes (ordinals, outbox).
    pub(crate) calls: context::Calls,
}

/// What the activation and passivation hooks know: the entity and where it lives.
#[derive(Debug, Clone)]
pub struct ActivationContext {
    /// The entity.
    pub address: EntityAddress,
    /// Its shard.
    pub shard: ShardId,
    /// The epoch this runner owns the shard under.
    pub epoch: Epoch,
    /// This runner.
    pub runner_id: Option<RunnerId>,
}

/// What every entity type declares, whichever its kind: what a caller needs to reach it.
///
/// The typed client ([`crate::client::ShoalClient::entity`]) works from this trait alone, on
/// nodes where the type is not registered (a gateway, another service) and without an
/// instance of it: so the name is a constant and [`Self::is_persisted`] and
/// [`Self::idempotency_key`] are associated functions of the message, not methods of an
/// instance. Whether a message is persisted is part of the type's protocol, the same on
/// every node.
pub trait EntityProtocol: Send + Sync + 'static {
    /// The type's name (letters, digits, `-`, `_`; validated when the type is registered,
    /// and when a client first uses it).
    const NAME: &'static str;
    /// The messages it accepts: an externally tagged serde enum.
    type Message: Serialize + DeserializeOwned + utoipa::ToSchema + Send + 'static;
    /// Its reply (decoded by typed clients; its schema is in the gateway's document).
    type Reply: Serialize + DeserializeOwned + utoipa::ToSchema + Send + 'static;

    /// Whether a message is persisted before delivery (at-least-once, survives a crash) or
    /// volatile (lost with its owner; the caller gets an error).
    fn is_persisted(message: &Self::Message) -> bool;

    /// Whether the gateway's generic routes reach the type, and for which tenant (see
    /// [`GatewayAccess`]). Default [`GatewayAccess::Internal`]: a type is public only when
    /// it says so.
    const ACCESS: GatewayAccess = GatewayAccess::Internal;

    /// Messages the generic routes never deliver and the OpenAPI document does not list
    /// (a timer the type sends itself, a message only its application routes send).
    const INTERNAL_MESSAGES: &'static [&'static str] = &[];

    /// The idempotency key of a message, if it has one of its own.
    fn idempotency_key(_message: &Self::Message) -> Option<String> {
        None
    }

    /// Runtime options shared by both kinds.
    fn options(&self) -> EntityOptions {
        EntityOptions::default()
    }
}

/// An entity type whose handler runs one message at a time, in order, owning the state.
pub trait Entity: EntityProtocol {
    /// Its state (kept in memory; in Postgres too when [`Self::PERSIST_STATE`]).
    type State: Serialize + DeserializeOwned + Default + Send + 'static;

    /// Whether the state is loaded from and written to Postgres, in the transaction that
    /// completes each persisted message (a state change and its completion commit together
    /// or not at all). Default false.
    const PERSIST_STATE: bool = false;

    /// Builds the state when the entity activates, with its address in hand. `stored` is
    /// the state kept in Postgres (with [`Self::PERSIST_STATE`]; `None` before the first
    /// write or without it). The runtime also calls it when it reloads the state because
    /// storage may be ahead of memory (after a retryable failure, a redelivery). The default
    /// returns `stored`, or `State::default()`. Bounded by
    /// [`EntityOptions::activation_timeout`]; an error or a timeout fails the delivery as a
    /// retryable handler failure does (restart with backoff, persisted messages replayed).
    fn on_activate(
        &self,
        _ctx: &ActivationContext,
        stored: Option<Self::State>,
    ) -> impl Future<Output = Result<Self::State, HandlerError>> + Send {
        let state = stored.unwrap_or_default();
        async move { Ok(state) }
    }

    /// Handles one message.
    fn handle(
        &self,
        ctx: &EntityContext,
        state: &mut Self::State,
        message: Self::Message,
    ) -> impl Future<Output = Result<Self::Reply, HandlerError>> + Send;

    /// Called when the entity passivates: idle for [`EntityOptions::max_idle`], or its shard
    /// drained (graceful shutdown, a shard moving away). Not called when the shard is fenced
    /// or the process dies: it is a courtesy, not a guarantee; anything that must survive
    /// belongs in the state written with a completion. Bounded by
    /// [`EntityOptions::passivation_timeout`]. It gets the state for the last time; the
    /// entity's next activation may start before the hook returns. The default does
    /// nothing.
    fn on_passivate(
        &self,
        _ctx: &ActivationContext,
        _state: Self::State,
    ) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// An entity type whose handlers run up to [`Self::CONCURRENCY`] at once per entity: for
/// work that waits on something slow (a provider call, a download) where one message at a
/// time would leave the entity idle. Handlers see the state shared (`&Self::State`), so what
/// changes lives behind a lock or an atomic; messages of one entity may finish out of
/// order. The state is in memory only: a snapshot written when one message completes would
/// include the half-done effects of the others.
pub trait ConcurrentEntity: EntityProtocol {
    /// Its state, shared by the handlers running at once.
    type State: Default + Send + Sync + 'static;

    /// Messages handled at once per entity (at least 1; checked at registration).
    const CONCURRENCY: usize;

    /// Builds the state when the entity activates (see [`Entity::on_activate`]). The
    /// default is `State::default()`.
    fn on_activate(
        &self,
        _ctx: &ActivationContext,
    ) -> impl Future<Output = Result<Self::State, HandlerError>> + Send {
        async { Ok(Self::State::default()) }
    }

    /// Handles one message, possibly while others of the same entity run.
    fn handle(
        &self,
        ctx: &EntityContext,
        state: &Self::State,
        message: Self::Message,
    ) -> impl Future<Output = Result<Self::Reply, HandlerError>> + Send;

    /// Called when the entity passivates (see [`Entity::on_passivate`]).
    fn on_passivate(
        &self,
        _ctx: &ActivationContext,
        _state: &Self::State,
    ) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Why a message or state could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// No such message in the type.
    #[error("entity type `{entity_type}` has no message `{tag}`")]
    UnknownMessage {
        /// The type.
        entity_type: EntityType,
        /// The message name.
        tag: String,
    },
    /// The body does not match the message.
    #[error("invalid body for `{tag}`: {problem}")]
    InvalidBody {
        /// The message name.
        tag: String,
        /// serde's description (names the field).
        problem: String,
    },
    /// Stored state does not match the type.
    #[error("stored state does not decode: {0}")]
    State(String),
}

/// Splits an externally tagged message into its name and body.
pub fn encode_message<M: Serialize>(message: &M) -> Result<(String, serde_json::Value), String> {
    match serde_json::to_value(message).map_err(|e| e.to_string())? {
        serde_json::Value::String(tag) => Ok((tag, serde_json::Value::Null)),
        serde_json::Value::Object(map) if map.len() == 1 => {
            let (tag, body) = map.into_iter().next().ok_or("empty message")?;
            Ok((tag, body))
        }
        other => Err(format!(
            "messages must be externally tagged enums, got {other}"
        )),
    }
}
