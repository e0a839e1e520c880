//! How a handler reaches the cluster: [`EntityContext::ask`], [`EntityContext::send`] and
//! [`EntityContext::schedule`] (timers), at the [`Request`] level.
//!
//! - **Keys.** Every call a handler makes through its context takes the next *ordinal*
//!   (0, 1, 2, … within one handling of one message). A persisted call without a key of its
//!   own gets the key `"{message_id}/{ordinal}"`, so a handler that is replayed (its runner
//!   died, it failed retryably, it panicked) and makes the same calls again makes each one
//!   once: storage deduplicates the key per target entity. A handler of a **volatile**
//!   message has no message id, so its calls get no derived key: if its caller resends the
//!   volatile message, the calls are made again, unless the handler gives keys itself.
//! - **Transactional outbox.** For a type whose state is kept in Postgres
//!   (`persist_state`), the sends and schedules a handler of a persisted message makes are
//!   not written when called: they are collected and written by the transaction that
//!   completes the message (with its reply and its new state), so the state change and the
//!   messages it causes commit together or not at all. After the commit the runtime tells
//!   the targets' owners (best effort; their scans find the messages anyway). A message
//!   under a key the caller gave is left to those scans (up to the scan grace plus one scan
//!   interval later): its key may have met an earlier message, which must not be pushed
//!   again under the new id. A handler that returns a final error commits its state and its
//!   outbox with the error reply; one that fails retryably or panics commits neither.
//!   Other types (and handlers of volatile messages) send at once, with the derived key.
//! - **Order.** What an entity sends another (through its outbox or at once) is pushed to
//!   the target one message after another, so the target handles it in the order sent,
//!   across handlings too (the client's push lanes, `client/lanes.rs`, say where that
//!   bound ends).
//! - **`ask` is never in the outbox**: it needs the reply now. A handler waiting on another
//!   entity's reply holds its own mailbox for that long (an `Entity` handles one message at
//!   a time): its other messages wait, and a cycle (A asks B while B asks A) deadlocks until
//!   the asks' deadlines. An entity asking **itself** is refused at once with
//!   [`ClientError::SelfAsk`]; prefer `send` (or `schedule`) and a reply message for
//!   anything that may loop back.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::EntityContext;
use crate::client::error::ClientError;
use crate::client::request::Request;
use crate::ids::{EntityAddress, Epoch, MessageId, ShardId};
use crate::message_storage::storable::check_message;
use crate::message_storage::{NewMessage, Reply, StateCheckpoint};

/// Calls one handling of one message may make through its context (bounds the outbox).
pub const MAX_CALLS_PER_MESSAGE: u32 = 1024;

/// A message a handler sent into its outbox.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) message: NewMessage,
    /// Its key was derived here (`"{message_id}/{ordinal}"`), so it cannot have met an
    /// earlier message: the committed completion inserted it as it is.
    pub(crate) derived_key: bool,
}

/// What a handler's calls go out through. The runtime's client implements it
/// (`client.rs`); the context knows the client only through this trait, so `entity` does
/// not depend on the client that depends on it.
#[async_trait::async_trait]
pub(crate) trait Outbound: Send + Sync + 'static {
    /// Sends `request` and waits for its reply.
    async fn ask(&self, request: Request) -> Result<Reply, ClientError>;
    /// `request` as the message storage holds it, under a fresh id (for the outbox).
    fn new_message(&self, request: &Request) -> NewMessage;
    /// Writes a state checkpoint (`false`: the shard moved).
    async fn checkpoint_state(&self, checkpoint: StateCheckpoint) -> Result<bool, ClientError>;
    /// Stores `request` and tells its owner, behind what `sender` sent it before.
    async fn send_from(
        &self,
        sender: &EntityAddress,
        request: Request,
    ) -> Result<MessageId, ClientError>;
}

/// What one handling of one message calls out with. Shared by the clones of its context.
#[derive(Clone, Default)]
pub(crate) struct Calls(Arc<Scope>);

#[derive(Default)]
struct Scope {
    client: Option<Arc<dyn Outbound>>,
    next: AtomicU32,
    /// `Some` while persisted sends wait for the completion; `None` inside once taken (or
    /// never opened: such sends go out at once).
    outbox: Option<Mutex<Option<Vec<Outgoing>>>>,
}

impl Calls {
    /// Calls through `client`; with `outbox`, persisted sends wait for the completion.
    pub(crate) fn new(client: Option<Arc<dyn Outbound>>, outbox: bool) -> Self {
        Self(Arc::new(Scope {
            client,
            next: AtomicU32::new(0),
            outbox: outbox.then(|| Mutex::new(Some(Vec::new()))),
        }))
    }

    /// Closes the outbox and returns what it holds (later sends go out at once).
    pub(crate) fn take_outbox(&self) -> Vec<Outgoing> {
        match &self.0.outbox {
            Some(outbox) => lock(outbox).take().unwrap_or_default(),
            None => Vec::new(),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Never held across an await; a panic while held leaves a usable Vec.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl std::fmt::Debug for Calls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let outbox = self
            .0
            .outbox
            .as_ref()
            .and_then(|o| lock(o).as_ref().map(Vec::len));
        f.debug_struct("Calls")
            .field("connected", &self.0.client.is_some())
            .field("made", &self.0.next.load(Ordering::Relaxed))
            .field("outbox", &outbox)
            .finish()
    }
}

impl EntityContext {
    /// A context for `address` that reaches no cluster (its calls answer
    /// [`ClientError::NotConnected`]): for calling a handler directly, in a test.
    pub fn new(address: EntityAddress, shard: ShardId, epoch: Epoch) -> Self {
        Self {
            address,
            shard,
            epoch,
            runner_id: None,
            message_id: None,
            attempts: 0,
            calls: Calls::default(),
        }
    }

    /// Sends `request` to its entity and waits for the reply (see the module docs for what
    /// waiting costs). Asking the handler's own entity is refused at once.
    pub async fn ask(&self, request: Request) -> Result<Reply, ClientError> {
        if request.address == self.address {
            return Err(ClientError::SelfAsk(self.address.clone()));
        }
        let (client, request, _) = self.prepare(request)?;
        client.ask(request).await
    }

    /// Sends `request` persisted (whatever its `persisted` says) without waiting for the
    /// reply; returns the message's id. Under `persist_state` it is written with this
    /// message's completion (the module docs say when it is then pushed); if its key met an
    /// earlier message, that one stands and the returned id names nothing.
    pub async fn send(&self, mut request: Request) -> Result<MessageId, ClientError> {
        request.persisted = true;
        let (client, request, derived_key) = self.prepare(request)?;
        if let Some(outbox) = &self.calls.0.outbox {
            let message = client.new_message(&request);
            check_message(&message)?;
            let id = message.id;
            if let Some(pending) = lock(outbox).as_mut() {
                pending.push(Outgoing {
                    message,
                    derived_key,
                });
                return Ok(id);
            }
            // The completion was decided already (a call from a task the handler left
            // running): nothing can ride on it any more.
        }
        client.send_from(&self.address, request).await
    }

    /// Schedules `request` (persisted) for `at`: it is not delivered before then, and is
    /// delivered within about one scan interval of it, also across a failover.
    pub async fn schedule(
        &self,
        mut request: Request,
        at: DateTime<Utc>,
    ) -> Result<MessageId, ClientError> {
        request.deliver_at = Some(at);
        self.send(request).await
    }

    /// Schedules `request` (persisted) for `after` from now.
    pub async fn schedule_after(
        &self,
        request: Request,
        after: Duration,
    ) -> Result<MessageId, ClientError> {
        let after = chrono::Duration::from_std(after).unwrap_or(chrono::Duration::MAX);
        let at = Utc::now()
            .checked_add_signed(after)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        self.schedule(request, at).await
    }

    /// Writes `state` as the entity's stored state now, before this message completes:
    /// for a handler of a `PERSIST_STATE` type that works long on a persisted message, so
    /// readers of the stored state (listings, a reload after a crash) see where it is. The
    /// completion still writes the state the handler ends with; a redelivery of this
    /// message starts from the checkpoint, so a handler that checkpoints must take its
    /// message again from there. `DeliveryError::ShardMoving` when the shard moved (nothing
    /// was written); [`ClientError::InvalidRequest`] outside such a handling.
    pub async fn checkpoint(&self, state: &impl serde::Serialize) -> Result<(), ClientError> {
        let (Some(message_id), Some(_)) = (self.message_id, &self.calls.0.outbox) else {
            return Err(ClientError::InvalidRequest(
                "a checkpoint is written only while a PERSIST_STATE type handles a persisted \
                 message"
                    .to_owned(),
            ));
        };
        let client = self
            .calls
            .0
            .client
            .as_deref()
            .ok_or(ClientError::NotConnected)?;
        let state = serde_json::to_value(state)
            .map_err(|e| ClientError::InvalidRequest(format!("state does not encode: {e}")))?;
        let checkpoint = StateCheckpoint {
            address: self.address.clone(),
            shard: self.shard,
            epoch: self.epoch,
            message_id,
            state,
        };
        if client.checkpoint_state(checkpoint).await? {
            Ok(())
        } else {
            Err(ClientError::Delivery(
                crate::transport::DeliveryError::ShardMoving(self.shard),
            ))
        }
    }

    /// A key for one call this handling makes in more than one message (enqueuing a
    /// unique job claims a key, then enqueues): `"{message_id}/{ordinal}"` with the next
    /// ordinal, as a context call's derived key, so a replayed handler derives the same key
    /// for the same call. `None` in a volatile message's handler (nothing to derive from).
    pub fn derive_key(&self) -> Option<String> {
        let ordinal = self.calls.0.next.fetch_add(1, Ordering::Relaxed);
        self.message_id.map(|id| format!("{id}/{ordinal}"))
    }

    /// Takes the call's ordinal and derives its key; says whether the key was derived.
    fn prepare(&self, mut request: Request) -> Result<(&dyn Outbound, Request, bool), ClientError> {
        let scope = &self.calls.0;
        let client = scope.client.as_deref().ok_or(ClientError::NotConnected)?;
        let ordinal = scope.next.fetch_add(1, Ordering::Relaxed);
        if ordinal >= MAX_CALLS_PER_MESSAGE {
            return Err(ClientError::TooManyCalls(MAX_CALLS_PER_MESSAGE));
        }
        let derive = request.persisted && request.idempotency_key.is_none();
        let derived_key = match self.message_id {
            Some(id) if derive => {
                request.idempotency_key = Some(format!("{id}/{ordinal}"));
                true
            }
            _ => false,
        };
        Ok((client, request, derived_key))
    }
}
