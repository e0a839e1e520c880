//! The client API: [`ShoalClient::ask`] and [`ShoalClient::send`] reach an entity from any
//! node (runner, gateway, a handler).
//!
//! Routing: the client keeps the live runners (refreshed every `refresh_interval`, and at
//! once when a runner answers `NotOwner` or cannot be reached) and the assignment computed
//! from them. A persisted message is stored first, then its owner is told; on `NotOwner`,
//! a lost connection or a timeout the client checks storage for the reply, refreshes, and
//! tries again with backoff until the request's deadline. The owner also finds stored
//! messages by scanning, so a notification that never arrives only delays the work.
//!
//! [`ClientError::retry_class`] tells the caller what a resend can do: a volatile ask is
//! retried here only on failures where nothing ran, so the errors it returns say whether
//! the handler may have run; a persisted ask's errors (after storing) say the message is
//! stored and a resend with the same key is deduplicated.
//!
//! Typed calls: [`ShoalClient::entity`] gives an [`EntityRef`] that encodes a type's
//! messages and decodes its replies (module `typed`); underneath it builds the same JSON
//! [`Request`] the gateway does.

pub(crate) mod error;
mod lanes;
pub(crate) mod request;
mod typed;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::ids::{EntityAddress, MessageId, RunnerId};
use crate::message_storage::{
    MessageStorage, MessageStorageError, NewMessage, Reply, SaveOutcome, StateCheckpoint,
    StoredMessage,
};
use crate::retry::RetryClass;
use crate::runner_storage::{RunnerInfo, RunnerStorage};
use crate::sharding::{Assignment, Sharding, assign};
use crate::snowflake::Snowflake;
use crate::transport::{
    DeliveryError, ENVELOPE_VERSION, EntityStatus, Envelope, PersistedInfo, Transport,
    TransportError,
};

/// First wait between delivery attempts of one request (doubles up to the max).
const ATTEMPT_BACKOFF_FIRST: Duration = Duration::from_millis(20);
/// Longest wait between delivery attempts of one request.
const ATTEMPT_BACKOFF_MAX: Duration = Duration::from_millis(500);

pub use error::ClientError;
pub use request::Request;
pub use typed::EntityRef;

/// Client timings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Deadline of a request that names none.
    pub default_timeout: Duration,
    /// How often live runners are re-read.
    pub refresh_interval: Duration,
    /// Longest single delivery attempt before storage is checked again.
    pub attempt_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            default_timeout: Duration::from_secs(30),
            refresh_interval: Duration::from_millis(250),
            attempt_timeout: Duration::from_secs(5),
        }
    }
}

/// Who should own what, as this client last saw it.
#[derive(Debug, Default)]
pub struct Routing {
    /// Live runners.
    pub runners: Vec<RunnerInfo>,
    /// The assignment computed from them.
    pub assignment: Assignment,
}

impl Routing {
    fn address_of(&self, runner: RunnerId) -> Option<&str> {
        self.runners
            .iter()
            .find(|r| r.id == runner)
            .map(|r| r.address.as_str())
    }
}

/// Reaches entities. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ShoalClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    sharding: Sharding,
    messages: Arc<dyn MessageStorage>,
    transport: Arc<dyn Transport>,
    ids: Snowflake,
    routing: watch::Receiver<Arc<Routing>>,
    refresh_now: Arc<Notify>,
    config: ClientConfig,
    /// Pushes from one entity to another, in order per pair.
    lanes: lanes::Lanes,
}

/// The parts a client is made of.
#[derive(Debug)]
pub struct ClientParts {
    /// The cluster's sharding.
    pub sharding: Sharding,
    /// Where runners are registered.
    pub runners: Arc<dyn RunnerStorage>,
    /// Where persisted messages go.
    pub messages: Arc<dyn MessageStorage>,
    /// How runners are reached.
    pub transport: Arc<dyn Transport>,
    /// Machine id for this node's message ids.
    pub machine_id: u32,
    /// Timings.
    pub config: ClientConfig,
}

impl ShoalClient {
    /// Starts a client; its routing refresher runs until `shutdown`.
    pub fn start(parts: ClientParts, shutdown: CancellationToken) -> Self {
        let (routing_tx, routing) = watch::channel(Arc::new(Routing::default()));
        let refresh_now = Arc::new(Notify::new());
        tokio::spawn(refresh_routing(
            parts.runners,
            parts.sharding,
            parts.config.refresh_interval,
            routing_tx,
            refresh_now.clone(),
            shutdown,
        ));
        Self {
            inner: Arc::new(Inner {
                sharding: parts.sharding,
                messages: parts.messages,
                transport: parts.transport,
                ids: Snowflake::new(parts.machine_id),
                routing,
                refresh_now,
                config: parts.config,
                lanes: lanes::Lanes::default(),
            }),
        }
    }

    /// Makes this node's message ids carry `machine` from now on (a runner's registered id).
    pub fn set_machine_id(&self, machine: u32) {
        self.inner.ids.set_machine(machine);
    }

    /// The sharding this client routes by.
    pub fn sharding(&self) -> Sharding {
        self.inner.sharding
    }

    /// The routing as last refreshed.
    pub fn routing(&self) -> Arc<Routing> {
        self.inner.routing.borrow().clone()
    }

    /// Waits until the first routing refresh saw at least one runner, or `timeout`.
    pub async fn wait_for_runners(&self, timeout: Duration) -> bool {
        let mut rx = self.inner.routing.clone();
        tokio::time::timeout(timeout, rx.wait_for(|r| !r.runners.is_empty()))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Sends a request and waits for its reply.
    pub async fn ask(&self, request: Request) -> Result<Reply, ClientError> {
        let timeout = request.timeout.unwrap_or(self.inner.config.default_timeout);
        let deadline = Instant::now() + timeout;
        if request.persisted {
            let (id, saved) = self.store(&request).await?;
            if let SaveOutcome::Duplicate {
                reply: Some(reply), ..
            } = &saved
            {
                return Ok(reply.clone());
            }
            let duplicate = matches!(saved, SaveOutcome::Duplicate { .. });
            self.await_persisted(&request, id, duplicate, deadline, timeout)
                .await
        } else {
            self.ask_volatile(&request, deadline, timeout).await
        }
    }

    /// Stores a persisted request and tells its owner, without waiting for the reply.
    /// Returns the id under which the reply will be stored.
    pub async fn send(&self, request: Request) -> Result<MessageId, ClientError> {
        let (id, envelope) = self.store_for_push(&request).await?;
        self.push(envelope);
        Ok(id)
    }

    /// [`Self::send`], then waits up to `wait` for the owner to have handled the message:
    /// a sender that sends faster than the owners handle slows to their pace instead of
    /// piling pushes up (a burst of sends activating thousands of entities at once), and
    /// a message handled within `wait` has a stored reply when this returns. Past `wait`
    /// the push goes on without the caller.
    pub async fn send_paced(
        &self,
        request: Request,
        wait: Duration,
    ) -> Result<MessageId, ClientError> {
        let (id, envelope) = self.store_for_push(&request).await?;
        let client = self.clone();
        let push = tokio::spawn(async move { client.deliver_pushed(envelope).await });
        // Dropping the handle at the deadline leaves the push running.
        let _ = tokio::time::timeout(wait, push).await;
        Ok(id)
    }

    /// Stores a persisted request; its id and the envelope that tells its owner.
    async fn store_for_push(
        &self,
        request: &Request,
    ) -> Result<(MessageId, Envelope), ClientError> {
        let (id, saved) = self.store(request).await?;
        let duplicate = matches!(saved, SaveOutcome::Duplicate { .. });
        Ok((id, self.envelope(request, Some((id, duplicate)))))
    }

    /// A persisted request as the message storage holds it, under a fresh id: for a
    /// handler's outbox, which the completion of its message writes.
    pub(crate) fn new_message(&self, request: &Request) -> NewMessage {
        NewMessage {
            id: self.inner.ids.next_id(),
            shard: self.inner.sharding.shard_of(&request.address.entity_id),
            address: request.address.clone(),
            tag: request.tag.clone(),
            payload: request.payload.clone(),
            idempotency_key: request.idempotency_key.clone(),
            deliver_at: request.deliver_at,
        }
    }

    /// Stores a persisted request `sender` (an entity's handler) sends, and tells its owner
    /// behind what `sender` sent the same entity before (module `lanes`).
    pub(crate) async fn send_from(
        &self,
        sender: &EntityAddress,
        request: Request,
    ) -> Result<MessageId, ClientError> {
        let (id, envelope) = self.store_for_push(&request).await?;
        self.inner.lanes.push(self, sender, envelope);
        Ok(id)
    }

    /// Tells the owner of a message `sender` stored as given (an outbox that committed),
    /// behind what `sender` sent the same entity before.
    pub(crate) fn notify_stored_from(&self, sender: &EntityAddress, message: NewMessage) {
        let envelope = Envelope {
            version: ENVELOPE_VERSION,
            entity_type: message.address.entity_type,
            entity_id: message.address.entity_id,
            tag: message.tag,
            payload: message.payload,
            request_id: None,
            persisted: Some(PersistedInfo {
                message_id: message.id,
                shard: message.shard,
                idempotency_key: message.idempotency_key,
                deliver_at: message.deliver_at,
                duplicate: false,
            }),
        };
        self.inner.lanes.push(self, sender, envelope);
    }

    /// Hands a stored message's envelope to its owner without waiting. Best effort: a lost
    /// notification only delays delivery until the owner scans.
    fn push(&self, envelope: Envelope) {
        let client = self.clone();
        tokio::spawn(async move { client.deliver_pushed(envelope).await });
    }

    /// Hands a stored message's envelope to its owner and waits for the answer, which is
    /// ignored (the reply is stored; a failed push leaves the message to the scan).
    async fn deliver_pushed(&self, envelope: Envelope) {
        if let Ok(address) = self.owner_address(&envelope.address()) {
            let timeout = self.inner.config.attempt_timeout;
            let _ = self
                .inner
                .transport
                .deliver(&address, envelope, timeout)
                .await;
        }
    }

    /// Asks the owner of `address` what it knows about the entity.
    pub async fn entity_status(
        &self,
        address: &EntityAddress,
    ) -> Result<EntityStatus, ClientError> {
        let owner = self.owner_address(address)?;
        self.inner
            .transport
            .entity_status(&owner, address)
            .await
            .map_err(|e| ClientError::OwnerLost(e.to_string()))
    }

    /// The runner that should own `address`'s shard, with its address.
    pub fn owner_of(&self, address: &EntityAddress) -> Option<(RunnerId, String)> {
        let shard = self.inner.sharding.shard_of(&address.entity_id);
        let routing = self.inner.routing.borrow();
        let runner = routing.assignment.owner(shard)?;
        Some((runner, routing.address_of(runner)?.to_owned()))
    }

    /// The unprocessed message of `address` stored under idempotency key `key`, if any
    /// (a message [`ShoalClient::send`] stored that its entity has not run yet).
    pub async fn pending_with_key(
        &self,
        address: &EntityAddress,
        key: &str,
    ) -> Result<Option<StoredMessage>, ClientError> {
        Ok(self.inner.messages.pending_with_key(address, key).await?)
    }

    /// The stored reply of a persisted message, if it was processed.
    pub async fn reply_of(&self, id: MessageId) -> Result<Option<Reply>, ClientError> {
        Ok(self.inner.messages.reply(id).await?)
    }

    async fn store(&self, request: &Request) -> Result<(MessageId, SaveOutcome), ClientError> {
        let shard = self.inner.sharding.shard_of(&request.address.entity_id);
        let mut taken = 0;
        loop {
            let saved = self
                .inner
                .messages
                .save(NewMessage {
                    id: self.inner.ids.next_id(),
                    shard,
                    address: request.address.clone(),
                    tag: request.tag.clone(),
                    payload: request.payload.clone(),
                    idempotency_key: request.idempotency_key.clone(),
                    deliver_at: request.deliver_at,
                })
                .await;
            match saved {
                // Another node generated the same id (they share a machine id): nothing
                // was stored, so a fresh id is safe.
                Err(MessageStorageError::IdTaken(id)) if taken < 8 => {
                    taken += 1;
                    tracing::warn!(message_id = %id, "message id taken by another node's message; saving under a new id");
                }
                saved => {
                    let saved = saved?;
                    return Ok((saved.id(), saved));
                }
            }
        }
    }

    fn envelope(&self, request: &Request, persisted: Option<(MessageId, bool)>) -> Envelope {
        Envelope {
            version: ENVELOPE_VERSION,
            entity_type: request.address.entity_type.clone(),
            entity_id: request.address.entity_id.clone(),
            tag: request.tag.clone(),
            payload: request.payload.clone(),
            request_id: request.request_id.clone(),
            persisted: persisted.map(|(message_id, duplicate)| PersistedInfo {
                message_id,
                shard: self.inner.sharding.shard_of(&request.address.entity_id),
                idempotency_key: request.idempotency_key.clone(),
                deliver_at: request.deliver_at,
                duplicate,
            }),
        }
    }

    fn owner_address(&self, address: &EntityAddress) -> Result<String, ClientError> {
        let shard = self.inner.sharding.shard_of(&address.entity_id);
        let routing = self.inner.routing.borrow();
        routing
            .assignment
            .owner(shard)
            .and_then(|runner| routing.address_of(runner))
            .map(str::to_owned)
            .ok_or(ClientError::NoRunners)
    }

    /// Resolves once the routing names another owner address for `entity` than `address`.
    async fn owner_moves_from(&self, entity: &EntityAddress, address: &str) {
        let shard = self.inner.sharding.shard_of(&entity.entity_id);
        let mut routing = self.inner.routing.clone();
        let moved = routing
            .wait_for(|r| {
                r.assignment
                    .owner(shard)
                    .and_then(|runner| r.address_of(runner))
                    != Some(address)
            })
            .await
            .is_ok();
        if !moved {
            // The refresher stopped (shutdown): the routing never changes again.
            std::future::pending::<()>().await;
        }
    }

    async fn await_persisted(
        &self,
        request: &Request,
        id: MessageId,
        duplicate: bool,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Reply, ClientError> {
        let envelope = self.envelope(request, Some((id, duplicate)));
        let mut backoff = Backoff::new(ATTEMPT_BACKOFF_FIRST, ATTEMPT_BACKOFF_MAX);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(ClientError::Timeout {
                    timeout,
                    message_id: Some(id),
                });
            }
            let attempt = remaining.min(self.inner.config.attempt_timeout);
            match self.owner_address(&request.address) {
                Ok(address) => {
                    let delivered = tokio::select! {
                        delivered = self
                            .inner
                            .transport
                            .deliver(&address, envelope.clone(), attempt) => delivered,
                        // The message is stored: an attempt at a runner that is no longer
                        // the owner (hung, taken over) is abandoned, not waited out.
                        () = self.owner_moves_from(&request.address, &address) => {
                            Err(TransportError::Lost {
                                address: address.clone(),
                                reason: "the owner changed during the attempt".to_owned(),
                            })
                        }
                    };
                    match delivered {
                        Ok(reply) => return Ok(reply),
                        // Only a final refusal ends the wait: anything else leaves the
                        // stored message to run, and the caller its key (see `retry`).
                        Err(TransportError::Delivery(error))
                            if error.retry_class() == RetryClass::Never =>
                        {
                            return Err(error.into());
                        }
                        // Stored, and waiting on its owner for the type: retrying before
                        // the owner's backoff ends cannot help; the caller is told now.
                        Err(TransportError::Delivery(
                            error @ DeliveryError::TypeNotDeployed(_),
                        )) => {
                            return Err(error.into());
                        }
                        Err(TransportError::Unauthorized(_)) => {
                            return Err(ClientError::Unauthorized);
                        }
                        Err(error) => {
                            tracing::debug!(%error, message_id = %id, "persisted delivery attempt failed");
                            self.inner.refresh_now.notify_one();
                        }
                    }
                }
                Err(_) => self.inner.refresh_now.notify_one(),
            }
            // Whoever owns it now may already have answered.
            if let Some(reply) = self.inner.messages.reply(id).await? {
                return Ok(reply);
            }
            backoff.wait_until(deadline).await;
        }
    }

    async fn ask_volatile(
        &self,
        request: &Request,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Reply, ClientError> {
        let envelope = self.envelope(request, None);
        let mut backoff = Backoff::new(ATTEMPT_BACKOFF_FIRST, ATTEMPT_BACKOFF_MAX);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(ClientError::Timeout {
                    timeout,
                    message_id: None,
                });
            }
            let address = match self.owner_address(&request.address) {
                Ok(address) => address,
                Err(error) => {
                    self.inner.refresh_now.notify_one();
                    if Instant::now() + backoff.current() >= deadline {
                        return Err(error);
                    }
                    backoff.wait_until(deadline).await;
                    continue;
                }
            };
            match self
                .inner
                .transport
                .deliver(&address, envelope.clone(), remaining)
                .await
            {
                Ok(reply) => return Ok(reply),
                Err(TransportError::Delivery(
                    DeliveryError::NotOwner(_) | DeliveryError::ShardMoving(_),
                ))
                | Err(TransportError::Unreachable { .. }) => {
                    // Nothing ran: safe to try the next owner.
                    self.inner.refresh_now.notify_one();
                }
                Err(TransportError::Delivery(error)) => return Err(error.into()),
                Err(TransportError::Unauthorized(_)) => return Err(ClientError::Unauthorized),
                Err(error @ (TransportError::Lost { .. } | TransportError::Protocol { .. })) => {
                    return Err(ClientError::OwnerLost(error.to_string()));
                }
            }
            backoff.wait_until(deadline).await;
        }
    }
}

async fn refresh_routing(
    runners: Arc<dyn RunnerStorage>,
    sharding: Sharding,
    interval: Duration,
    routing_tx: watch::Sender<Arc<Routing>>,
    refresh_now: Arc<Notify>,
    shutdown: CancellationToken,
) {
    loop {
        match runners.live_runners().await {
            Ok(live) => {
                let changed = {
                    let current = routing_tx.borrow();
                    current
                        .runners
                        .iter()
                        .map(|r| (r.id, &r.address))
                        .ne(live.iter().map(|r| (r.id, &r.address)))
                };
                if changed {
                    let ids: Vec<RunnerId> = live.iter().map(|r| r.id).collect();
                    let assignment = assign(sharding, &ids);
                    let _ = routing_tx.send(Arc::new(Routing {
                        runners: live,
                        assignment,
                    }));
                }
            }
            Err(error) => tracing::warn!(%error, "could not refresh live runners"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
            _ = refresh_now.notified() => {}
        }
    }
}

#[async_trait::async_trait]
impl crate::entity::Outbound for ShoalClient {
    async fn ask(&self, request: Request) -> Result<Reply, ClientError> {
        ShoalClient::ask(self, request).await
    }

    fn new_message(&self, request: &Request) -> NewMessage {
        ShoalClient::new_message(self, request)
    }

    async fn checkpoint_state(&self, checkpoint: StateCheckpoint) -> Result<bool, ClientError> {
        Ok(self.inner.messages.checkpoint_state(checkpoint).await?)
    }

    async fn send_from(
        &self,
        sender: &EntityAddress,
        request: Request,
    ) -> Result<MessageId, ClientError> {
        ShoalClient::send_from(self, sender, request).await
    }
}
