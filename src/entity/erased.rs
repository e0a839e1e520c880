//! Entity types as the runtime sees them: one object-safe trait over both kinds, with
//! messages and state as `Box<dyn Any>`. Crate-private: authors implement [`Entity`] or
//! [`ConcurrentEntity`], and only the runtime, the gateway and the runner call this.

use std::any::Any;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{
    ActivationContext, ConcurrentEntity, DecodeError, Entity, EntityContext, EntityOptions,
    EntitySchemas, GatewayAccess, HandlerError,
};
use crate::ids::EntityType;

/// A message decoded for an erased type.
pub(crate) type AnyMessage = Box<dyn Any + Send>;
/// An entity's state behind the erased interface.
pub(crate) type AnyState = Box<dyn Any + Send>;

/// An entity type as the runtime sees it.
pub(crate) trait ErasedEntity: Send + Sync + 'static {
    /// The type's name.
    fn entity_type(&self) -> &EntityType;
    /// Its shared options.
    fn options(&self) -> &EntityOptions;
    /// Messages handled at once per entity (1 for an [`Entity`]).
    fn concurrency(&self) -> usize;
    /// Whether the state is kept in Postgres (never for a [`ConcurrentEntity`]).
    fn persist_state(&self) -> bool;
    /// Decodes a message name and body.
    fn decode(&self, tag: &str, payload: serde_json::Value) -> Result<AnyMessage, DecodeError>;
    /// Whether the decoded message is persisted.
    fn is_persisted(&self, message: &AnyMessage) -> bool;
    /// The decoded message's own idempotency key.
    fn idempotency_key(&self, message: &AnyMessage) -> Option<String>;
    /// The OpenAPI schemas of its messages and reply (the gateway's document).
    fn schemas(&self) -> EntitySchemas;
    /// Whether the gateway's generic routes reach it.
    fn access(&self) -> GatewayAccess;
    /// Whether message `tag` is internal (never from the generic routes).
    fn is_internal_message(&self, tag: &str) -> bool;
    /// Runs the activation hook on the stored state (decoded here), if any.
    fn activate<'a>(
        &'a self,
        ctx: &'a ActivationContext,
        stored: Option<serde_json::Value>,
    ) -> BoxFuture<'a, Result<AnyState, HandlerError>>;
    /// Runs the passivation hook, handing it the state for the last time.
    fn passivate<'a>(&'a self, ctx: &'a ActivationContext, state: AnyState) -> BoxFuture<'a, ()>;
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

/// A registered [`Entity`], with its name validated and its options read once.
pub(super) struct Registered<E> {
    pub(super) entity: E,
    pub(super) entity_type: EntityType,
    pub(super) options: EntityOptions,
}

/// The [`ErasedEntity`] methods both kinds of registered type share: name, options, and
/// decoding and routing a message (`E::Message`).
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
                .is_some_and(|m| E::is_persisted(m))
        }

        fn idempotency_key(&self, message: &AnyMessage) -> Option<String> {
            message
                .downcast_ref::<E::Message>()
                .and_then(|m| E::idempotency_key(m))
        }

        fn schemas(&self) -> EntitySchemas {
            EntitySchemas::of::<E::Message, E::Reply>()
        }

        fn access(&self) -> GatewayAccess {
            E::ACCESS
        }

        fn is_internal_message(&self, tag: &str) -> bool {
            E::INTERNAL_MESSAGES.contains(&tag)
        }
    };
}

fn wrong_type() -> HandlerError {
    HandlerError::permanent("internal", "message or state of another entity type")
}

impl<E: Entity> ErasedEntity for Registered<E> {
    erased_routing!();

    fn concurrency(&self) -> usize {
        1
    }

    fn persist_state(&self) -> bool {
        E::PERSIST_STATE
    }

    fn activate<'a>(
        &'a self,
        ctx: &'a ActivationContext,
        stored: Option<serde_json::Value>,
    ) -> BoxFuture<'a, Result<AnyState, HandlerError>> {
        Box::pin(async move {
            let stored: Option<E::State> = match stored {
                Some(value) => Some(serde_json::from_value(value).map_err(|e| {
                    HandlerError::retryable(
                        "bad_state",
                        DecodeError::State(e.to_string()).to_string(),
                    )
                })?),
                None => None,
            };
            let state: AnyState = Box::new(self.entity.on_activate(ctx, stored).await?);
            Ok(state)
        })
    }

    fn passivate<'a>(&'a self, ctx: &'a ActivationContext, state: AnyState) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Ok(state) = state.downcast::<E::State>() {
                self.entity.on_passivate(ctx, *state).await;
            }
        })
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
        // `concurrency()` is 1 for these types, so the runtime never asks.
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

/// A registered [`ConcurrentEntity`]; its state lives in an `Arc` the handlers share.
pub(super) struct RegisteredConcurrent<E> {
    pub(super) entity: E,
    pub(super) entity_type: EntityType,
    pub(super) options: EntityOptions,
}

impl<E: ConcurrentEntity> ErasedEntity for RegisteredConcurrent<E> {
    erased_routing!();

    fn concurrency(&self) -> usize {
        E::CONCURRENCY
    }

    fn persist_state(&self) -> bool {
        false
    }

    /// Fresh shared state (never stored).
    fn activate<'a>(
        &'a self,
        ctx: &'a ActivationContext,
        _stored: Option<serde_json::Value>,
    ) -> BoxFuture<'a, Result<AnyState, HandlerError>> {
        Box::pin(async move {
            let state: AnyState = Box::new(Arc::new(self.entity.on_activate(ctx).await?));
            Ok(state)
        })
    }

    fn passivate<'a>(&'a self, ctx: &'a ActivationContext, state: AnyState) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Ok(state) = state.downcast::<Arc<E::State>>() {
                self.entity.on_passivate(ctx, &state).await;
            }
        })
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
