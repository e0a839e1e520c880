//! One peer's delivery queue on the sending side: envelopes bound for the same runner are
//! gathered into batches, like group commit gathers writes.
//!
//! A batch is sent as soon as one of [`MAX_SENDING`] slots is free, with everything queued
//! behind it (up to [`MAX_BATCH`]): under light load every envelope goes alone at once, under
//! load one request carries many. A batch holds its slot until all its answers are in or
//! [`LINGER`] has passed, whichever comes first, so a slow handler never holds a slot for long.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::{BatchAnswer, BatchItem, BatchRef, GRACE, SECRET_HEADER, deliver_one, send_error};
use crate::entity_runtime::DeliveryError;
use crate::message_storage::Reply;
use crate::transport::{Envelope, TransportError};

/// Batch requests to one peer being sent at once.
pub(super) const MAX_SENDING: usize = 2;
/// Envelopes in one batch request.
pub(super) const MAX_BATCH: usize = 256;
/// Longest a batch holds its sending slot while answers are outstanding.
pub(super) const LINGER: Duration = Duration::from_millis(2);
/// Envelopes waiting for a slot, per peer (senders wait beyond that).
const QUEUE: usize = 1024;
/// A peer's queue task ends after this long without traffic.
const IDLE: Duration = Duration::from_secs(60);

type Answer = Result<Reply, TransportError>;

/// An envelope waiting to be sent, with where its answer goes.
pub(super) struct Pending {
    pub(super) item: BatchItem,
    pub(super) respond: oneshot::Sender<Answer>,
}

/// How to reach one peer.
#[derive(Debug)]
pub(super) struct Link {
    pub(super) client: reqwest::Client,
    pub(super) secret: Arc<str>,
    pub(super) address: String,
    pub(super) batch_url: reqwest::Url,
    pub(super) single_url: reqwest::Url,
}

/// Starts the queue task of one peer; it ends when idle for a while or when the sender is
/// dropped.
pub(super) fn start(link: Link) -> mpsc::Sender<Pending> {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(run_queue(Arc::new(link), rx));
    tx
}

async fn run_queue(link: Arc<Link>, mut rx: mpsc::Receiver<Pending>) {
    let slots = Arc::new(Semaphore::new(MAX_SENDING));
    loop {
        let first = match tokio::time::timeout(IDLE, rx.recv()).await {
            Ok(Some(first)) => first,
            Ok(None) | Err(_) => return,
        };
        // Waiting for a slot first lets the queue fill while earlier batches are out.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        tokio::spawn(send_batch(link.clone(), batch, slot));
    }
}

/// Sends one batch and hands each answer to its caller.
async fn send_batch(link: Arc<Link>, batch: Vec<Pending>, slot: OwnedSemaphorePermit) {
    let linger_until = Instant::now() + LINGER;
    // A caller that gave up needs no delivery.
    let (items, mut respond): (Vec<BatchItem>, Vec<Option<oneshot::Sender<Answer>>>) = batch
        .into_iter()
        .filter(|p| !p.respond.is_closed())
        .map(|p| (p.item, Some(p.respond)))
        .unzip();
    if items.is_empty() {
        return;
    }
    crate::metrics::transport_batch(items.len());
    let timeout = items
        .iter()
        .map(|i| Duration::from_millis(i.timeout_ms))
        .max()
        .unwrap_or_default();
    let body = match serde_json::to_vec(&BatchRef { items: &items }) {
        Ok(body) => body,
        Err(error) => {
            let reason = format!("cannot encode the batch: {error}");
            return fail_all(
                &mut respond,
                TransportError::Unreachable {
                    address: link.address.clone(),
                    reason,
                },
            );
        }
    };
    let sent = link
        .client
        .post(link.batch_url.clone())
        .header(SECRET_HEADER, &*link.secret)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .timeout(timeout + GRACE)
        .body(body)
        .send()
        .await;
    let mut response = match sent {
        Ok(response) => response,
        Err(error) => {
            let error = send_error(&link.address, error);
            return fail_all(&mut respond, error);
        }
    };
    match response.status() {
        StatusCode::OK => {}
        StatusCode::UNAUTHORIZED => {
            let error = TransportError::Unauthorized(link.address.clone());
            return fail_all(&mut respond, error);
        }
        // A runner of an older version: one request per envelope, as it understands.
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => {
            drop(slot);
            return deliver_singly(&link, items, respond).await;
        }
        status => {
            let body = response.bytes().await.unwrap_or_default();
            let error = match serde_json::from_slice::<DeliveryError>(&body) {
                Ok(error) => TransportError::Delivery(error),
                Err(_) => TransportError::Protocol {
                    address: link.address.clone(),
                    reason: format!("status {status}: {}", String::from_utf8_lossy(&body)),
                },
            };
            return fail_all(&mut respond, error);
        }
    }
    let mut slot = Some(slot);
    let mut pending = Vec::new();
    loop {
        let chunk = if slot.is_some() {
            match tokio::time::timeout_at(linger_until, response.chunk()).await {
                Ok(chunk) => chunk,
                Err(_) => {
                    slot = None;
                    continue;
                }
            }
        } else {
            response.chunk().await
        };
        match chunk {
            Ok(Some(bytes)) => {
                pending.extend_from_slice(&bytes);
                let complete = pending
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(0, |i| i + 1);
                for line in pending[..complete].split(|b| *b == b'\n') {
                    if line.is_empty() {
                        continue;
                    }
                    match serde_json::from_slice::<BatchAnswer>(line) {
                        Ok(answer) => {
                            if let Some(respond) =
                                respond.get_mut(answer.index).and_then(Option::take)
                            {
                                let _ = respond.send(answer.into_result());
                            }
                        }
                        Err(error) => {
                            let error = TransportError::Protocol {
                                address: link.address.clone(),
                                reason: format!("undecodable batch answer: {error}"),
                            };
                            return fail_all(&mut respond, error);
                        }
                    }
                }
                pending.drain(..complete);
                if respond.iter().all(Option::is_none) {
                    return;
                }
            }
            Ok(None) => {
                let error = TransportError::Protocol {
                    address: link.address.clone(),
                    reason: "the batch ended before every envelope was answered".to_owned(),
                };
                return fail_all(&mut respond, error);
            }
            Err(error) => {
                // Sent, and the answer broke off: those without one may have run.
                let error = TransportError::Lost {
                    address: link.address.clone(),
                    reason: error.to_string(),
                };
                return fail_all(&mut respond, error);
            }
        }
    }
}

/// Fails every caller still waiting.
fn fail_all(respond: &mut [Option<oneshot::Sender<Answer>>], error: TransportError) {
    for respond in respond.iter_mut().filter_map(Option::take) {
        let _ = respond.send(Err(error.clone()));
    }
}

/// Falls back to one request per envelope (a peer without the batch route).
async fn deliver_singly(
    link: &Link,
    items: Vec<BatchItem>,
    respond: Vec<Option<oneshot::Sender<Answer>>>,
) {
    let sends = items
        .into_iter()
        .zip(respond)
        .filter_map(|(item, respond)| Some((item, respond?)))
        .map(|(item, respond)| async move {
            let _ = respond.send(deliver_one(link, item).await);
        });
    futures::future::join_all(sends).await;
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("envelope", &self.item.envelope)
            .finish_non_exhaustive()
    }
}

/// An envelope with its deadline, ready to queue.
pub(super) fn pending(
    envelope: Envelope,
    timeout: Duration,
) -> (Pending, oneshot::Receiver<Answer>) {
    let (respond, answer) = oneshot::channel();
    let item = BatchItem {
        timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        envelope,
    };
    (Pending { item, respond }, answer)
}
