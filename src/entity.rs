//! Defining entity types.
//!
//! An entity type is a Rust value implementing [`Entity`]: its message enum (serde,
//! externally tagged, so `{"increment": {...}}` is message `increment` with that body), its
//! reply type, its state, its handler and its [`EntityOptions`]. Registering a type on a
//! runner is one call: [`EntityRegistry::register`]. The runtime sees types only through the
//! object-safe [`ErasedEntity`], so it knows nothing of the built-in types.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::ids::{EntityAddress, EntityType, Epoch, MessageId, RunnerId, ShardId};

mod schemas;
pub use schemas::EntitySchemas;

/// Per-type runtime options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityOptions {
    /// Unfinished requests one entity may have; past it, volatile sends get `MailboxFull`
    /// and persisted ones wait in storage. Default 64.
    pub mailbox_capacity: NonZeroUsize,
    /// An entity with nothing to do for this long is passivated. Default 60 s.
    pub max_idle: Duration,
    /// Messages handled at once per entity. Default 1: an [`Entity`]'s handler owns the
    /// state mutably, one message at a time, in order. Above 1 the type must be a
    /// [`ConcurrentEntity`], whose handlers share the state and may finish out of order.
    pub concurrency: NonZeroUsize,
    /// Whether the state is loaded from and written to Postgres (in the transaction that
    /// completes each persisted message). Default false.
    pub persist_state: bool,
}

impl Default for EntityOptions {
    fn default() -> Self {
        Self {
            mailbox_capacity: NonZeroUsize::new(64).unwrap_or(NonZeroUsize::MIN),
            max_idle: Duration::from_secs(60),
            concurrency: NonZeroUsize::MIN,
            persist_state: false,
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

/// What a handler knows about the message it handles (the cluster context that tracing
/// spans carry too).
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
}

/// An entity type.
pub trait Entity: Send + Sync + 'static {
    /// The messages it accepts: an externally tagged serde enum.
    type Message: Serialize + DeserializeOwned + utoipa::ToSchema + Send + 'static;
    /// Its reply.
    type Reply: Serialize + utoipa::ToSchema + Send + 'static;
    /// Its state (kept in memory; in Postgres too when `persist_state`).
    type State: Serialize + DeserializeOwned + Default + Send + 'static;

    /// The type's name.
    fn entity_type(&self) -> EntityType;

    /// Runtime options.
    fn options(&self) -> EntityOptions {
        EntityOptions::default()
    }

    /// Whether a message is persisted before delivery (at-least-once, survives a crash) or
    /// volatile (lost with its owner; the caller gets an error).
    fn is_persisted(&self, message: &Self::Message) -> bool;

    /// The idempotency key of a message, if it has one of its own.
    fn idempotency_key(&self, _message: &Self::Message) -> Option<String> {
        None
    }

    /// Handles one message.
    fn handle(
        &self,
        ctx: &EntityContext,
        state: &mut Self::State,
        message: Self::Message,
    ) -> impl Future<Output = Result<Self::Reply, HandlerError>> + Send;
}

/// An entity type whose handlers run up to `options().concurrency` at once per entity:
/// for work that waits on something slow (a provider call, a download) where one message
/// at a time would leave the entity idle. Handlers see the state shared (`&Self::State`),
/// so what changes lives behind a lock or an atomic; messages of one entity may finish out
/// of order. The state is in memory only: a snapshot written when one message completes
/// would include the half-done effects of the others, so `persist_state` is refused.
pub trait ConcurrentEntity: Send + Sync + 'static {
    /// The messages it accepts: an externally tagged serde enum.
    type Message: Serialize + DeserializeOwned + utoipa::ToSchema + Send + 'static;
    /// Its reply.
    type Reply: Serialize + utoipa::ToSchema + Send + 'static;
    /// Its state, shared by the handlers running at once.
    type State: Default + Send + Sync + 'static;

    /// The type's name.
    fn entity_type(&self) -> EntityType;

    /// Runtime options; `concurrency` is how many messages run at once per entity.
    fn options(&self) -> EntityOptions;

    /// Whether a message is persisted before delivery.
    fn is_persisted(&self, message: &Self::Message) -> bool;

    /// The idempotency key of a message, if it has one of its own.
    fn idempotency_key(&self, _message: &Self::Message) -> Option<String> {
        None
    }

    /// Handles one message, possibly while others of the same entity run.
    fn handle(
        &self,
        ctx: &EntityContext,
        state: &Self::State,
        message: Self::Message,
    ) -> impl Future<Output = Result<Self::Reply, HandlerError>> + Send;
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

/// A message decoded for an erased type.
pub type AnyMessage = Box<dyn Any + Send>;
/// An entity's state behind the erased interface.
pub type AnyState = Box<dyn Any + Send>;

/// An entity type as the runtime sees it.
pub trait ErasedEntity: Send + Sync + 'static {
    /// The type's name.
    fn entity_type(&self) -> &EntityType;
    /// Its options.
    fn options(&self) -> &EntityOptions;
    /// Decodes a message name and body.
    fn decode(&self, tag: &str, payload: serde_json::Value) -> Result<AnyMessage, DecodeError>;
    /// Whether the decoded message is persisted.
    fn is_persisted(&self, message: &AnyMessage) -> bool;
    /// The decoded message's own idempotency key.
    fn idempotency_key(&self, message: &AnyMessage) -> Option<String>;
    /// The OpenAPI schemas of its messages and reply (the gateway's document).
    fn schemas(&self) -> EntitySchemas;
    /// Fresh state, or state decoded from storage.
    fn new_state(&self, stored: Option<serde_json::Value>) -> Result<AnyState, DecodeError>;
    /// The state as JSON, for storage.
    fn encode_state(&self, state: &AnyState) -> Result<serde_json::Value, String>;
    /// Runs the handler; the reply comes back as JSON.
    fn handle<'a>(
        &'a self,
        ctx: &'a EntityContext,
        state: &'a mut AnyState,
        message: AnyMessage,
    ) -> BoxFuture<'a, Result<serde_json::Value, HandlerError>>;
    /// Runs the handler as a future of its own, beside others of the same entity (types
    /// with `concurrency` above 1 only: their state is shared, not owned by one handler).
    fn handle_detached(
        self: Arc<Self>,
        ctx: EntityContext,
        state: &AnyState,
        message: AnyMessage,
    ) -> BoxFuture<'static, Result<serde_json::Value, HandlerError>>;
}

impl std::fmt::Debug for dyn ErasedEntity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Entity({})", self.entity_type())
    }
}

/// Decodes a message name and body as `M` (externally tagged), naming the bad field.
fn decode_as<M: DeserializeOwned + Send + 'static>(
    entity_type: &EntityType,
    tag: &str,
    payload: serde_json::Value,
) -> Result<AnyMessage, DecodeError> {
    let tagged = serde_json::json!({ tag: payload.clone() });
    match serde_path_to_error::deserialize::<_, M>(tagged) {
        Ok(message) => Ok(Box::new(message)),
        Err(error) => {
            // The path starts with the message name; the rest names the field.
            let field = error
                .path()
                .iter()
                .skip(1)
                .map(|segment| segment.to_string())
                .collect::<Vec<_>>()
                .join(".");
            let error = error.into_inner();
            // A unit variant is written as its bare name.
            let empty = payload.is_null() || payload.as_object().is_some_and(|o| o.is_empty());
            if empty && let Ok(m) = serde_json::from_value::<M>(tag.into()) {
                return Ok(Box::new(m));
            }
            let problem = if field.is_empty() {
                error.to_string()
            } else {
                format!("field `{field}`: {error}")
            };
            if problem.starts_with("unknown variant") {
                Err(DecodeError::UnknownMessage {
                    entity_type: entity_type.clone(),
                    tag: tag.to_owned(),
                })
            } else {
                Err(DecodeError::InvalidBody {
                    tag: tag.to_owned(),
                    problem,
                })
            }
        }
    }
}

struct Registered<E: Entity> {
    entity: E,
    entity_type: EntityType,
    options: EntityOptions,
}

/// The [`ErasedEntity`] methods both kinds of registered type share: name, options, and
/// decoding and routing a message (`E::Message`, `self.entity`).
macro_rules! erased_routing {
    () => {
        fn entity_type(&self) -> &EntityType {
            &self.entity_type
        }

        fn options(&self) -> &EntityOptions {
            &self.options
        }

        fn decode(&self, tag: &str, payload: serde_json::Value) -> Result<AnyMessage, DecodeError> {
            decode_as::<E::Message>(&self.entity_type, tag, payload)
        }

        fn is_persisted(&self, message: &AnyMessage) -> bool {
            message
                .downcast_ref::<E::Message>()
                .is_some_and(|m| self.entity.is_persisted(m))
        }

        fn idempotency_key(&self, message: &AnyMessage) -> Option<String> {
            message
                .downcast_ref::<E::Message>()
                .and_then(|m| self.entity.idempotency_key(m))
        }

        fn schemas(&self) -> EntitySchemas {
            EntitySchemas::of::<E::Message, E::Reply>()
        }
    };
}

fn wrong_type() -> HandlerError {
    HandlerError::permanent("internal", "message or state of another entity type")
}

impl<E: Entity> ErasedEntity for Registered<E> {
    erased_routing!();

    fn new_state(&self, stored: Option<serde_json::Value>) -> Result<AnyState, DecodeError> {
        let state: E::State = match stored {
            Some(value) => {
                serde_json::from_value(value).map_err(|e| DecodeError::State(e.to_string()))?
            }
            None => E::State::default(),
        };
        Ok(Box::new(state))
    }

    fn encode_state(&self, state: &AnyState) -> Result<serde_json::Value, String> {
        let state = state
            .downcast_ref::<E::State>()
            .ok_or("state of another entity type")?;
        serde_json::to_value(state).map_err(|e| e.to_string())
    }

    fn handle<'a>(
        &'a self,
        ctx: &'a EntityContext,
        state: &'a mut AnyState,
        message: AnyMessage,
    ) -> BoxFuture<'a, Result<serde_json::Value, HandlerError>> {
        Box::pin(async move {
            let message = message.downcast::<E::Message>().map_err(|_| wrong_type())?;
            let state = state.downcast_mut::<E::State>().ok_or_else(wrong_type)?;
            let reply = self.entity.handle(ctx, state, *message).await?;
            reply_json(reply)
        })
    }

    fn handle_detached(
        self: Arc<Self>,
        _ctx: EntityContext,
        _state: &AnyState,
        _message: AnyMessage,
    ) -> BoxFuture<'static, Result<serde_json::Value, HandlerError>> {
        // Registration keeps `concurrency` at 1 for these types, so the runtime never asks.
        Box::pin(async {
            Err(HandlerError::permanent(
                "internal",
                "a one-at-a-time entity type was asked to run handlers side by side",
            ))
        })
    }
}

fn reply_json<R: Serialize>(reply: R) -> Result<serde_json::Value, HandlerError> {
    serde_json::to_value(reply)
        .map_err(|e| HandlerError::permanent("reply_not_serializable", e.to_string()))
}

struct RegisteredConcurrent<E: ConcurrentEntity> {
    entity: E,
    entity_type: EntityType,
    options: EntityOptions,
}

impl<E: ConcurrentEntity> ErasedEntity for RegisteredConcurrent<E> {
    erased_routing!();

    /// Fresh shared state (never stored: registration refuses `persist_state`).
    fn new_state(&self, _stored: Option<serde_json::Value>) -> Result<AnyState, DecodeError> {
        Ok(Box::new(Arc::new(E::State::default())))
    }

    fn encode_state(&self, _state: &AnyState) -> Result<serde_json::Value, String> {
        Err("the state of a concurrent entity type is not stored".to_owned())
    }

    fn handle<'a>(
        &'a self,
        ctx: &'a EntityContext,
        state: &'a mut AnyState,
        message: AnyMessage,
    ) -> BoxFuture<'a, Result<serde_json::Value, HandlerError>> {
        Box::pin(async move {
            let message = message.downcast::<E::Message>().map_err(|_| wrong_type())?;
            let state = state
                .downcast_ref::<Arc<E::State>>()
                .ok_or_else(wrong_type)?;
            reply_json(self.entity.handle(ctx, state, *message).await?)
        })
    }

    fn handle_detached(
        self: Arc<Self>,
        ctx: EntityContext,
        state: &AnyState,
        message: AnyMessage,
    ) -> BoxFuture<'static, Result<serde_json::Value, HandlerError>> {
        let state = state.downcast_ref::<Arc<E::State>>().cloned();
        Box::pin(async move {
            let message = message.downcast::<E::Message>().map_err(|_| wrong_type())?;
            let state = state.ok_or_else(wrong_type)?;
            reply_json(self.entity.handle(&ctx, &state, *message).await?)
        })
    }
}

/// Why a type could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The name is taken.
    #[error("entity type `{0}` is registered twice")]
    Duplicate(EntityType),
    /// An option is out of range.
    #[error("entity type `{entity_type}`: {problem}")]
    BadOptions {
        /// The type.
        entity_type: EntityType,
        /// What is wrong.
        problem: String,
    },
}

/// The entity types a node knows.
#[derive(Debug, Clone, Default)]
pub struct EntityRegistry {
    types: HashMap<EntityType, Arc<dyn ErasedEntity>>,
}

impl EntityRegistry {
    /// No types.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers an entity type.
    pub fn register<E: Entity>(&mut self, entity: E) -> Result<&mut Self, RegistryError> {
        let entity_type = entity.entity_type();
        let options = entity.options();
        if options.concurrency.get() != 1 {
            return Err(RegistryError::BadOptions {
                entity_type,
                problem: "concurrency must be 1 for an `Entity` (its handler owns the state \
                          while it runs); implement `ConcurrentEntity` to run messages side \
                          by side"
                    .to_owned(),
            });
        }
        self.insert(Arc::new(Registered {
            entity,
            entity_type,
            options,
        }))
    }

    /// Registers an entity type whose handlers run side by side.
    pub fn register_concurrent<E: ConcurrentEntity>(
        &mut self,
        entity: E,
    ) -> Result<&mut Self, RegistryError> {
        let entity_type = entity.entity_type();
        let options = entity.options();
        if options.persist_state {
            return Err(RegistryError::BadOptions {
                entity_type,
                problem: "persist_state needs concurrency 1: with handlers side by side, the \
                          state when one message completes holds the others' unfinished work"
                    .to_owned(),
            });
        }
        self.insert(Arc::new(RegisteredConcurrent {
            entity,
            entity_type,
            options,
        }))
    }

    fn insert(&mut self, entity: Arc<dyn ErasedEntity>) -> Result<&mut Self, RegistryError> {
        let entity_type = entity.entity_type().clone();
        if self.types.contains_key(&entity_type) {
            return Err(RegistryError::Duplicate(entity_type));
        }
        self.types.insert(entity_type, entity);
        Ok(self)
    }

    /// A registered type.
    pub fn get(&self, entity_type: &EntityType) -> Option<&Arc<dyn ErasedEntity>> {
        self.types.get(entity_type)
    }

    /// Removes a type; returns whether it was registered.
    pub fn remove(&mut self, entity_type: &EntityType) -> bool {
        self.types.remove(entity_type).is_some()
    }

    /// Every registered type name.
    pub fn names(&self) -> impl Iterator<Item = &EntityType> {
        self.types.keys()
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
    #[serde(rename_all = "snake_case")]
    enum Msg {
        Add { amount: i64 },
        Get,
    }

    struct Adder;

    impl Entity for Adder {
        type Message = Msg;
        type Reply = i64;
        type State = i64;
        fn entity_type(&self) -> EntityType {
            EntityType::new("adder").expect("valid")
        }
        fn is_persisted(&self, message: &Msg) -> bool {
            matches!(message, Msg::Add { .. })
        }
        async fn handle(
            &self,
            _: &EntityContext,
            state: &mut i64,
            message: Msg,
        ) -> Result<i64, HandlerError> {
            if let Msg::Add { amount } = message {
                *state += amount;
            }
            Ok(*state)
        }
    }

    #[test]
    fn messages_split_into_tag_and_body() {
        assert_eq!(
            encode_message(&Msg::Add { amount: 2 }).expect("encodes"),
            ("add".to_owned(), serde_json::json!({"amount": 2}))
        );
        assert_eq!(
            encode_message(&Msg::Get).expect("encodes"),
            ("get".to_owned(), serde_json::Value::Null)
        );
    }

    #[tokio::test]
    async fn erased_entities_decode_and_handle() {
        let mut registry = EntityRegistry::new();
        registry.register(Adder).expect("registers");
        let adder = registry
            .get(&EntityType::new("adder").expect("valid"))
            .expect("registered")
            .clone();
        let ctx = EntityContext {
            address: EntityAddress {
                entity_type: adder.entity_type().clone(),
                entity_id: crate::ids::EntityId::new("a").expect("valid"),
            },
            shard: ShardId::new(0),
            epoch: Epoch::new(1),
            runner_id: None,
            message_id: None,
            attempts: 0,
        };
        let mut state = adder.new_state(Some(serde_json::json!(40))).expect("state");
        let add = adder
            .decode("add", serde_json::json!({"amount": 2}))
            .expect("decodes");
        assert!(adder.is_persisted(&add));
        let reply = adder.handle(&ctx, &mut state, add).await.expect("handled");
        assert_eq!(reply, serde_json::json!(42));
        let get = adder
            .decode("get", serde_json::json!({}))
            .expect("unit variant");
        assert!(!adder.is_persisted(&get));

        assert!(matches!(
            adder.decode("nope", serde_json::json!({})),
            Err(DecodeError::UnknownMessage { .. })
        ));
        let Err(DecodeError::InvalidBody { problem, .. }) =
            adder.decode("add", serde_json::json!({"amount": "two"}))
        else {
            panic!("a string amount must be refused");
        };
        assert!(problem.contains("field `amount`"), "{problem}");
        assert!(problem.contains("invalid type"), "{problem}");
        assert!(matches!(
            registry.register(Adder),
            Err(RegistryError::Duplicate(_))
        ));
    }
}
