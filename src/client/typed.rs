//! Typed calls to an entity: [`ShoalClient::entity`] returns an [`EntityRef`] whose
//! [`ask`](EntityRef::ask) takes the type's message and returns its reply.
//!
//! Underneath, a typed call is the untyped [`Request`] the gateway builds: the message is
//! split into its tag and JSON body ([`encode_message`]), persisted or volatile as the type's
//! [`EntityProtocol::is_persisted`] says, keyed by the caller's key or the type's own
//! [`EntityProtocol::idempotency_key`]. The reply comes back as JSON and is decoded into the
//! type's `Reply`; an error reply becomes [`ClientError::ErrorReply`], a reply that does not
//! decode [`ClientError::BadReply`]. The wire format stays JSON, so callers in other
//! languages and the gateway reach the same entities.
//!
//! Bad input never panics: an entity id that does not validate, a delivery time or key on
//! a volatile message, or `send` of a volatile message is [`ClientError::InvalidRequest`]
//! when the call is made (the handle carries the error until then, as a request builder
//! does), and nothing is sent.

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{ClientError, Request, ShoalClient};
use crate::entity::{EntityContext, EntityProtocol, encode_message};
use crate::ids::{EntityAddress, EntityId, EntityType, MessageId};
use crate::message_storage::Reply;

impl ShoalClient {
    /// A typed handle on entity `id` of type `E`. The id is anything that converts into
    /// an [`EntityId`] (`&str`, `String`, an `EntityId`); one that does not validate makes
    /// every call on the handle fail with [`ClientError::InvalidRequest`].
    pub fn entity<E: EntityProtocol>(
        &self,
        id: impl TryInto<EntityId, Error: fmt::Display>,
    ) -> EntityRef<E> {
        let address = address_of::<E>(id);
        EntityRef {
            route: Route::Client(self.clone()),
            address,
            key: None,
            timeout: None,
            schedule: None,
            entity: PhantomData,
        }
    }
}

fn address_of<E: EntityProtocol>(
    id: impl TryInto<EntityId, Error: fmt::Display>,
) -> Result<EntityAddress, String> {
    let entity_type =
        EntityType::new(E::NAME).map_err(|e| format!("entity type name `{}`: {e}", E::NAME))?;
    let entity_id = id
        .try_into()
        .map_err(|e| format!("entity id for `{entity_type}`: {e}"))?;
    Ok(EntityAddress {
        entity_type,
        entity_id,
    })
}

impl EntityContext {
    /// A typed handle on entity `id` of type `E`, from inside a handler: its calls go
    /// through this context, so they take the handling's ordinals (keys derived from the
    /// message id, a replayed handler calls once), its persisted sends and schedules ride
    /// on the completion under `PERSIST_STATE` (the outbox), and asking the handler's own
    /// entity is refused (see `entity/context.rs`).
    pub fn entity<E: EntityProtocol>(
        &self,
        id: impl TryInto<EntityId, Error: fmt::Display>,
    ) -> EntityRef<E> {
        EntityRef {
            route: Route::Handler(self.clone()),
            address: address_of::<E>(id),
            key: None,
            timeout: None,
            schedule: None,
            entity: PhantomData,
        }
    }
}

/// How a handle's calls leave: through a client (any node), or through a handler's
/// context (its call scope and outbox).
#[derive(Debug, Clone)]
enum Route {
    Client(ShoalClient),
    Handler(EntityContext),
}

/// When a persisted message is to be delivered.
#[derive(Debug, Clone, Copy)]
enum Schedule {
    At(DateTime<Utc>),
    /// Counted from the moment the request is built (each call).
    After(Duration),
}

/// A typed handle on one entity of type `E`: cheap to clone, and reusable. The builders
/// (`with_key`, `with_timeout`, `deliver_at`, `after`) return a new handle whose calls all
/// carry the setting, so a key set on a handle deduplicates every message sent through it
/// to the first: set keys per message, as in
/// `client.entity::<Counter>("c1").with_key(k).ask(message)`.
pub struct EntityRef<E: EntityProtocol> {
    route: Route,
    address: Result<EntityAddress, String>,
    key: Option<String>,
    timeout: Option<Duration>,
    schedule: Option<Schedule>,
    /// `fn() -> E`: the handle holds no `E`, so it is `Send`, `Sync` and `Clone` whatever
    /// `E` is.
    entity: PhantomData<fn() -> E>,
}

impl<E: EntityProtocol> Clone for EntityRef<E> {
    fn clone(&self) -> Self {
        Self {
            route: self.route.clone(),
            address: self.address.clone(),
            key: self.key.clone(),
            timeout: self.timeout,
            schedule: self.schedule,
            entity: PhantomData,
        }
    }
}

impl<E: EntityProtocol> fmt::Debug for EntityRef<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntityRef")
            .field("entity_type", &E::NAME)
            .field("address", &self.address)
            .field("key", &self.key)
            .field("timeout", &self.timeout)
            .field("schedule", &self.schedule)
            .finish()
    }
}

impl<E: EntityProtocol> EntityRef<E> {
    /// The entity's address (an error if the id or the type's name does not validate).
    pub fn address(&self) -> Result<&EntityAddress, ClientError> {
        self.address
            .as_ref()
            .map_err(|e| ClientError::InvalidRequest(e.clone()))
    }

    /// With an idempotency key (persisted messages only; it replaces the type's own key).
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// With a deadline for the reply (the client's default otherwise).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Delivered no earlier than `at` (persisted messages only).
    pub fn deliver_at(mut self, at: DateTime<Utc>) -> Self {
        self.schedule = Some(Schedule::At(at));
        self
    }

    /// Delivered no earlier than `delay` after each call (persisted messages only).
    pub fn after(mut self, delay: Duration) -> Self {
        self.schedule = Some(Schedule::After(delay));
        self
    }

    /// Sends `message` and waits for the entity's reply.
    pub async fn ask(&self, message: E::Message) -> Result<E::Reply, ClientError> {
        let request = self.request(&message)?;
        let entity_type = request.address.entity_type.clone();
        let reply = match &self.route {
            Route::Client(client) => client.ask(request).await?,
            Route::Handler(ctx) => ctx.ask(request).await?,
        };
        decode_reply::<E::Reply>(&entity_type, reply)
    }

    /// Stores a persisted `message` and tells its owner, without waiting: returns the id
    /// under which its reply will be stored ([`ShoalClient::reply_of`]). A volatile message
    /// has no id to return and is refused; [`Self::ask`] it instead.
    pub async fn send(&self, message: E::Message) -> Result<MessageId, ClientError> {
        let request = self.request(&message)?;
        if !request.persisted {
            return Err(ClientError::InvalidRequest(format!(
                "message `{}` of `{}` is volatile: `send` needs a persisted message (ask it)",
                request.tag,
                E::NAME
            )));
        }
        match &self.route {
            Route::Client(client) => client.send(request).await,
            Route::Handler(ctx) => ctx.send(request).await,
        }
    }

    /// [`Self::send`], then waits up to `wait` for the owner to have handled the message
    /// ([`ShoalClient::send_paced`]); from a handler, the same as `send`.
    pub async fn send_paced(
        &self,
        message: E::Message,
        wait: Duration,
    ) -> Result<MessageId, ClientError> {
        match &self.route {
            Route::Client(client) => {
                let request = self.request(&message)?;
                if !request.persisted {
                    return self.send(message).await;
                }
                client.send_paced(request, wait).await
            }
            Route::Handler(_) => self.send(message).await,
        }
    }

    /// The untyped request for `message`, as the gateway would build it: the one encoding
    /// every typed caller shares.
    pub(crate) fn request(&self, message: &E::Message) -> Result<Request, ClientError> {
        let address = self.address()?.clone();
        let (tag, payload) = encode_message(message).map_err(|e| {
            ClientError::InvalidRequest(format!("a `{}` message does not encode: {e}", E::NAME))
        })?;
        let persisted = E::is_persisted(message);
        let key = self.key.clone().or_else(|| E::idempotency_key(message));
        let deliver_at = self.schedule.map(|schedule| match schedule {
            Schedule::At(at) => at,
            Schedule::After(delay) => {
                Utc::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX)
            }
        });
        if !persisted {
            let refused = match (&key, deliver_at) {
                (_, Some(_)) => Some("a delivery time (`deliver_at`, `after`)"),
                (Some(_), None) => Some("an idempotency key"),
                (None, None) => None,
            };
            if let Some(what) = refused {
                return Err(ClientError::InvalidRequest(format!(
                    "message `{tag}` of `{}` is volatile; {what} applies to persisted messages",
                    E::NAME
                )));
            }
        }
        let mut request = if persisted {
            Request::persisted(address, tag, payload)
        } else {
            Request::volatile(address, tag, payload)
        };
        request.idempotency_key = key;
        request.deliver_at = deliver_at;
        request.timeout = self.timeout;
        Ok(request)
    }
}

/// The typed reply, the handler's error reply as [`ClientError::ErrorReply`], or
/// [`ClientError::BadReply`] naming what does not decode.
fn decode_reply<R: serde::de::DeserializeOwned>(
    entity_type: &EntityType,
    reply: Reply,
) -> Result<R, ClientError> {
    match reply {
        Reply::Ok { value } => serde_path_to_error::deserialize(value).map_err(|error| {
            let path = error.path().to_string();
            let problem = if path == "." {
                error.into_inner().to_string()
            } else {
                format!("at `{path}`: {}", error.into_inner())
            };
            ClientError::BadReply {
                entity_type: entity_type.clone(),
                problem,
            }
        }),
        Reply::Err { code, message } => Err(ClientError::ErrorReply { code, message }),
    }
}

#[cfg(test)]
mod tests;
