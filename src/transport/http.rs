//! The runner transport over HTTP/2, authenticated by the cluster's shared secret
//! (`x-shoal-secret`). Each peer gets one multiplexed HTTP/2 connection (prior knowledge).
//! A connection that fails mid-request is retired before its callers hear of the failure,
//! so what is sent afterwards opens a new one; a client makes one TCP connection and no
//! other (`one_connection`), so hyper cannot reconnect behind the link's back. Nothing that
//! could run is written into a new connection before the peer has answered a `hello` on it: a dying runner's kernel still
//! accepts connections for a moment after SIGKILL (and a frozen one's for as long as it is
//! frozen), and a delivery written into such a connection could only be called `Lost`. A
//! refused connect, or a `hello` that fails, proves the delivery never reached a runner
//! (`Unreachable`, safe to resend).
//!
//! Deliveries to one peer are batched (`peer`): `POST /_shoal/v1/deliver-batch` carries
//! many envelopes as JSON, and the runner streams the answers back as NDJSON lines in the
//! order they finish. One HTTP/2 request per batch instead of per message is most of what a
//! delivery costs on both sides. `POST /_shoal/v1/deliver` (one envelope, one answer) stays
//! for runners and tools that send one at a time.

mod one_connection;
mod peer;
mod server;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

pub use server::router;
pub(crate) use server::same_secret;

use super::{Envelope, Transport, TransportError};
use crate::ids::EntityAddress;
use crate::message_storage::Reply;
use crate::transport::{DeliveryError, EntityStatus};

/// The header that carries the cluster secret.
pub const SECRET_HEADER: &str = "x-shoal-secret";
/// The header that carries the sender's deadline for a single delivery, in milliseconds.
pub const TIMEOUT_HEADER: &str = "x-shoal-timeout-ms";
/// The route a sender calls first on each new connection (204: a live runner reads it).
pub const HELLO_PATH: &str = "/_shoal/v1/hello";
/// The single-delivery route.
pub const DELIVER_PATH: &str = "/_shoal/v1/deliver";
/// The batch-delivery route.
pub const DELIVER_BATCH_PATH: &str = "/_shoal/v1/deliver-batch";
/// The entity-status route (followed by `/{type}/{id}`).
pub const ENTITY_PATH: &str = "/_shoal/v1/entities";
/// The content type of a batch's answers.
pub const NDJSON: &str = "application/x-ndjson";

/// How much longer than its deadline a sender waits for an answer before calling it lost.
const GRACE: Duration = Duration::from_millis(250);

/// The body of a batch delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryBatch {
    /// The envelopes, each with its deadline.
    pub items: Vec<BatchItem>,
}

/// One envelope of a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchItem {
    /// The sender's deadline for this envelope, in milliseconds.
    pub timeout_ms: u64,
    /// The envelope.
    pub envelope: Envelope,
}

/// One line of a batch's answer: the envelope's index and its reply or error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchAnswer {
    /// The envelope's index in the batch.
    pub index: usize,
    /// Its reply, if it got one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<Reply>,
    /// Why it got none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<DeliveryError>,
}

impl BatchAnswer {
    /// The answer to envelope `index`.
    pub fn new(index: usize, result: Result<Reply, DeliveryError>) -> Self {
        let (reply, error) = match result {
            Ok(reply) => (Some(reply), None),
            Err(error) => (None, Some(error)),
        };
        Self {
            index,
            reply,
            error,
        }
    }

    /// The answer as one NDJSON line.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_else(|error| {
            // A reply is JSON already; this cannot fail, but an answer must still go out.
            serde_json::to_vec(&Self::new(
                self.index,
                Err(DeliveryError::BadMessage(format!(
                    "unencodable reply: {error}"
                ))),
            ))
            .unwrap_or_default()
        });
        line.push(b'\n');
        line
    }

    fn into_result(self) -> Result<Reply, TransportError> {
        match (self.reply, self.error) {
            (Some(reply), _) => Ok(reply),
            (None, Some(error)) => Err(TransportError::Delivery(error)),
            (None, None) => Err(TransportError::Delivery(DeliveryError::BadMessage(
                "the runner answered neither a reply nor an error".to_owned(),
            ))),
        }
    }
}

/// The HTTP/2 transport client.
#[derive(Debug, Clone)]
pub struct HttpTransport {
    client: reqwest::Client,
    secret: Arc<str>,
    /// Each peer's delivery queue, by address.
    peers: Arc<Mutex<HashMap<String, tokio::sync::mpsc::Sender<peer::Pending>>>>,
}

/// An HTTP/2 client of one connection: each peer's deliveries have one at a time (see
/// `peer::Link::retire` and `one_connection`); status lookups share a pooled client.
fn peer_client() -> Result<reqwest::Client, String> {
    client_builder()
        // Kept until the peer's queue ends (`peer::IDLE`) or a failure retires it: an
        // idle close would make the next delivery fail its one connect.
        .pool_idle_timeout(None)
        .connector_layer(one_connection::OneConnection::default())
        .build()
        .map_err(|e| format!("cannot build the transport client: {e}"))
}

/// The HTTP/2 client settings of the transport.
fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .connect_timeout(Duration::from_secs(1))
        .pool_idle_timeout(Duration::from_secs(60))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .http2_keep_alive_timeout(Duration::from_secs(5))
        .http2_keep_alive_while_idle(true)
}

impl HttpTransport {
    /// A client presenting `secret`.
    pub fn new(secret: impl Into<String>) -> Result<Self, String> {
        let client = client_builder()
            .build()
            .map_err(|e| format!("cannot build the transport client: {e}"))?;
        Ok(Self {
            client,
            secret: Arc::from(secret.into()),
            peers: Arc::default(),
        })
    }

    fn link(&self, address: &str) -> Result<peer::Link, TransportError> {
        let url = |path: &str| {
            reqwest::Url::parse(&format!("http://{address}{path}")).map_err(|e| {
                TransportError::Unreachable {
                    address: address.to_owned(),
                    reason: format!("bad runner address: {e}"),
                }
            })
        };
        peer::Link::new(
            self.secret.clone(),
            address,
            peer::Urls {
                hello: url(HELLO_PATH)?,
                batch: url(DELIVER_BATCH_PATH)?,
                single: url(DELIVER_PATH)?,
            },
        )
        .map_err(|reason| TransportError::Unreachable {
            address: address.to_owned(),
            reason,
        })
    }

    /// Queues `pending` for the peer at `address`, starting its queue if needed. Waits for
    /// room until `deadline`; a delivery never queued was never sent.
    async fn enqueue(
        &self,
        address: &str,
        mut pending: peer::Pending,
        deadline: tokio::time::Instant,
    ) -> Result<(), TransportError> {
        let unreachable = |reason: &str| TransportError::Unreachable {
            address: address.to_owned(),
            reason: reason.to_owned(),
        };
        // Twice at most: a queue found closed (it ended when idle) is replaced once.
        for _ in 0..2 {
            let queue = {
                let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
                match peers.get(address) {
                    Some(queue) if !queue.is_closed() => queue.clone(),
                    _ => {
                        peers.retain(|_, queue| !queue.is_closed());
                        let queue = peer::start(self.link(address)?);
                        peers.insert(address.to_owned(), queue.clone());
                        queue
                    }
                }
            };
            match tokio::time::timeout_at(deadline, queue.send(pending)).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(returned)) => pending = returned.0,
                Err(_) => return Err(unreachable("the queue to this runner stayed full")),
            }
        }
        Err(unreachable("the delivery queue closed"))
    }
}

/// `listener` with Nagle's algorithm off on every connection it accepts. A batch's answers
/// stream out as small writes; with Nagle on, each waits for the peer's delayed ACK (40 ms on
/// Linux) before it leaves.
pub fn without_nagle(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|stream| {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot turn Nagle's algorithm off");
        }
    })
}

/// What a failed send means: nothing went out (cannot connect) or it may have run.
fn send_error(address: &str, error: reqwest::Error) -> TransportError {
    let reason = error.to_string();
    if error.is_connect() {
        TransportError::Unreachable {
            address: address.to_owned(),
            reason,
        }
    } else {
        TransportError::Lost {
            address: address.to_owned(),
            reason,
        }
    }
}

/// The answer of the single-delivery route.
fn single_answer(address: &str, status: StatusCode, body: &[u8]) -> Result<Reply, TransportError> {
    let protocol = |reason: String| TransportError::Protocol {
        address: address.to_owned(),
        reason,
    };
    match status {
        StatusCode::OK => serde_json::from_slice(body).map_err(|e| protocol(e.to_string())),
        StatusCode::UNAUTHORIZED => Err(TransportError::Unauthorized(address.to_owned())),
        _ => match serde_json::from_slice::<DeliveryError>(body) {
            Ok(error) => Err(TransportError::Delivery(error)),
            Err(_) => Err(protocol(format!(
                "status {status}: {}",
                String::from_utf8_lossy(body)
            ))),
        },
    }
}

#[async_trait]
impl Transport for HttpTransport {
    async fn entity_status(
        &self,
        address: &str,
        entity: &EntityAddress,
    ) -> Result<EntityStatus, TransportError> {
        let url = format!(
            "http://{address}{ENTITY_PATH}/{}/{}",
            entity.entity_type,
            urlencode(entity.entity_id.as_str())
        );
        let response = self
            .client
            .get(url)
            .header(SECRET_HEADER, &*self.secret)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .map_err(|e| TransportError::Unreachable {
                address: address.to_owned(),
                reason: e.to_string(),
            })?;
        if response.status() == StatusCode::UNAUTHORIZED {
            return Err(TransportError::Unauthorized(address.to_owned()));
        }
        response.json().await.map_err(|e| TransportError::Protocol {
            address: address.to_owned(),
            reason: e.to_string(),
        })
    }

    async fn deliver(
        &self,
        address: &str,
        envelope: Envelope,
        timeout: Duration,
    ) -> Result<Reply, TransportError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let (pending, answer) =
            peer::Pending::new(&envelope, deadline).map_err(|e| TransportError::Unreachable {
                address: address.to_owned(),
                reason: format!("cannot encode the envelope: {e}"),
            })?;
        self.enqueue(address, pending, deadline).await?;
        // The peer queue answers by `deadline + GRACE` at the latest (an answer not in by
        // then fails the connection, which is retired before it is reported); this later
        // timer only guards a queue that never answers at all, so it never overtakes that
        // retirement.
        match tokio::time::timeout_at(deadline + 2 * GRACE, answer).await {
            Ok(Ok(answer)) => answer,
            // Queued, so it may have gone out: the caller cannot know whether it ran.
            Ok(Err(_)) => Err(TransportError::Lost {
                address: address.to_owned(),
                reason: "the delivery was dropped".to_owned(),
            }),
            Err(_) => Err(TransportError::Lost {
                address: address.to_owned(),
                reason: format!("no answer within {:?}", timeout + 2 * GRACE),
            }),
        }
    }
}

/// Percent-encodes an entity id for a path segment.
fn urlencode(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for byte in id.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests;
