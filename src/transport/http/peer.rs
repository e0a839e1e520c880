//! One peer's delivery queue on the sending side: envelopes bound for the same runner are
//! gathered into batches, like group commit gathers writes.
//!
//! A batch is sent as soon as one of [`MAX_SENDING`] slots is free, with everything queued
//! behind it (up to [`MAX_BATCH`] envelopes and about [`MAX_BATCH_BYTES`]): under light load
//! every envelope goes alone at once, under load one request carries many. A batch holds its
//! slot until all its answers are in or [`LINGER`] has passed, whichever comes first, so a
//! slow handler never holds a slot for long.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use tokio::sync::{OnceCell, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::{BatchAnswer, GRACE, SECRET_HEADER, TIMEOUT_HEADER, single_answer};
use crate::message_storage::Reply;
use crate::transport::DeliveryError;
use crate::transport::{Envelope, TransportError};

/// Batch requests to one peer being sent at once.
const MAX_SENDING: usize = 2;
/// Envelopes in one batch request.
const MAX_BATCH: usize = 256;
/// A batch stops growing past this many bytes of envelopes (well under the runner's body
/// limit); a larger envelope goes alone.
const MAX_BATCH_BYTES: usize = 1 << 20;
/// Longest a new connection waits for the peer's answer to its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest a batch holds its sending slot while answers are outstanding.
const LINGER: Duration = Duration::from_millis(2);
/// Envelopes waiting for a slot, per peer (senders wait beyond that).
const QUEUE: usize = 1024;
/// A peer's queue task ends after this long without traffic.
const IDLE: Duration = Duration::from_secs(60);
/// How long a peer that lacks the batch route is sent one request per envelope before the
/// batch route is tried again (it may have been upgraded).
const SINGLES_FOR: Duration = Duration::from_secs(60);
/// The longest answer line accepted.
const MAX_LINE: usize = 64 << 20;

pub(super) type Answer = Result<Reply, TransportError>;

/// An envelope waiting to be sent, with where its answer goes.
pub(super) struct Pending {
    /// The envelope, already encoded (by its caller, so encoding runs in parallel).
    encoded: Vec<u8>,
    /// The caller's deadline; the runner gets what is left of it when the batch goes out.
    deadline: Instant,
    respond: oneshot::Sender<Answer>,
}

impl Pending {
    /// An envelope with its deadline, and where its answer will arrive.
    pub(super) fn new(
        envelope: &Envelope,
        deadline: Instant,
    ) -> Result<(Self, oneshot::Receiver<Answer>), serde_json::Error> {
        let encoded = serde_json::to_vec(envelope)?;
        let (respond, answer) = oneshot::channel();
        Ok((
            Self {
                encoded,
                deadline,
                respond,
            },
            answer,
        ))
    }
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("bytes", &self.encoded.len())
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

/// One peer's HTTP/2 connection (a client with its own pool), numbered so that a failure
/// retires the connection it happened on and no later one.
#[derive(Debug, Clone)]
pub(super) struct Connection {
    generation: u64,
    client: reqwest::Client,
    /// Set once the peer has answered a `hello` on this connection.
    answered: Arc<OnceCell<()>>,
}

impl Connection {
    fn new(generation: u64) -> Result<Self, String> {
        Ok(Self {
            generation,
            client: super::peer_client()?,
            answered: Arc::default(),
        })
    }
}

/// The peer's routes.
#[derive(Debug)]
pub(super) struct Urls {
    pub(super) hello: reqwest::Url,
    pub(super) batch: reqwest::Url,
    pub(super) single: reqwest::Url,
}

/// How to reach one peer.
#[derive(Debug)]
pub(super) struct Link {
    connection: Mutex<Connection>,
    secret: Arc<str>,
    address: String,
    urls: Urls,
    /// Until when the peer is sent one request per envelope (it answered the batch route
    /// with 404).
    singles_until: Mutex<Option<Instant>>,
}

impl Link {
    /// A link to `address` whose first connection is made on first use.
    pub(super) fn new(secret: Arc<str>, address: &str, urls: Urls) -> Result<Self, String> {
        Ok(Self {
            connection: Mutex::new(Connection::new(0)?),
            secret,
            address: address.to_owned(),
            urls,
            singles_until: Mutex::new(None),
        })
    }

    /// The connection to send on now, once the peer has answered on it (at most `wait`
    /// for that). Until a live runner answers, nothing that could run is written into a
    /// connection: a dying runner's kernel still completes connects for a moment after
    /// SIGKILL, a frozen one's for as long as it is frozen, and a delivery written there
    /// could only be called lost. A peer that does not answer reached no handler.
    async fn establish(&self, wait: Duration) -> Result<Connection, TransportError> {
        let connection = self.connection();
        if connection.answered.initialized() {
            return Ok(connection);
        }
        let unreachable = |reason: String| TransportError::Unreachable {
            address: self.address.clone(),
            reason,
        };
        // A live runner answers at once; the cap keeps a frozen one from holding callers
        // (and the sending slots) past their own deadlines.
        let wait = wait.min(HELLO_TIMEOUT);
        if wait.is_zero() {
            return Err(unreachable(
                "the deadline passed before the delivery was sent".into(),
            ));
        }
        let hello = connection.answered.get_or_try_init(|| async {
            connection
                .client
                .get(self.urls.hello.clone())
                .header(SECRET_HEADER, &*self.secret)
                .timeout(wait)
                .send()
                .await
                .map(drop) // Any answer, even a 401 or a 404, is a live peer's.
                .map_err(|e| e.to_string())
        });
        // Callers queued behind a failed hello try their own; none waits past `wait`.
        match tokio::time::timeout(wait, hello).await {
            Ok(Ok(())) => Ok(connection),
            Ok(Err(error)) => {
                self.retire(&connection);
                Err(unreachable(format!(
                    "the runner did not answer on a new connection: {error}"
                )))
            }
            Err(_) => {
                self.retire(&connection);
                Err(unreachable(format!(
                    "the runner did not answer on a new connection within {wait:?}"
                )))
            }
        }
    }

    /// The connection to send on now.
    fn connection(&self) -> Connection {
        self.connection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Retires `used` after a failure on it: whatever is sent from now on opens a new
    /// connection, so a request sent after the peer was seen gone cannot be written into
    /// the dead one, and "connection refused" proves it never reached a runner.
    fn retire(&self, used: &Connection) {
        let mut current = self.connection.lock().unwrap_or_else(|e| e.into_inner());
        if current.generation != used.generation {
            return; // Already replaced by another failure.
        }
        match Connection::new(used.generation + 1) {
            Ok(connection) => *current = connection,
            Err(error) => tracing::warn!(%error, address = %self.address, "cannot reconnect"),
        }
    }

    fn singles(&self) -> bool {
        let until = self.singles_until.lock().unwrap_or_else(|e| e.into_inner());
        until.is_some_and(|until| Instant::now() < until)
    }

    fn lost(&self, reason: impl Into<String>) -> TransportError {
        TransportError::Lost {
            address: self.address.clone(),
            reason: reason.into(),
        }
    }

    fn protocol(&self, reason: impl Into<String>) -> TransportError {
        TransportError::Protocol {
            address: self.address.clone(),
            reason: reason.into(),
        }
    }
}

/// Starts the queue task of one peer. It ends after [`IDLE`] without traffic (closing the
/// queue first and sending what slipped in) or when every sender is gone.
pub(super) fn start(link: Link) -> mpsc::Sender<Pending> {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(run_queue(Arc::new(link), rx));
    tx
}

async fn run_queue(link: Arc<Link>, mut rx: mpsc::Receiver<Pending>) {
    let slots = Arc::new(Semaphore::new(MAX_SENDING));
    let mut carried: Option<Pending> = None;
    let mut closing = false;
    loop {
        let first = match carried.take() {
            Some(first) => first,
            None if closing => match rx.recv().await {
                Some(first) => first,
                None => return,
            },
            None => match tokio::time::timeout(IDLE, rx.recv()).await {
                Ok(Some(first)) => first,
                Ok(None) => return,
                Err(_) => {
                    // Senders now find the queue closed and start a new one; what they
                    // queued before is still sent.
                    rx.close();
                    closing = true;
                    continue;
                }
            },
        };
        // Waiting for a slot first lets the queue fill while earlier batches are out.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = first.encoded.len();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            let Ok(next) = rx.try_recv() else { break };
            if bytes + next.encoded.len() > MAX_BATCH_BYTES {
                carried = Some(next);
                break;
            }
            bytes += next.encoded.len();
            batch.push(next);
        }
        tokio::spawn(send_batch(link.clone(), batch, slot));
    }
}

/// Encodes a batch body from pre-encoded envelopes:
/// `{"items":[{"timeout_ms":…,"envelope":…},…]}`.
fn batch_body(items: &[(u64, &[u8])]) -> Vec<u8> {
    let size = items.iter().map(|(_, e)| e.len() + 40).sum::<usize>() + 16;
    let mut body = Vec::with_capacity(size);
    body.extend_from_slice(b"{\"items\":[");
    for (i, (timeout_ms, envelope)) in items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(b"{\"timeout_ms\":");
        body.extend_from_slice(timeout_ms.to_string().as_bytes());
        body.extend_from_slice(b",\"envelope\":");
        body.extend_from_slice(envelope);
        body.push(b'}');
    }
    body.extend_from_slice(b"]}");
    body
}

/// Sends one batch and hands each answer to its caller.
async fn send_batch(link: Arc<Link>, batch: Vec<Pending>, slot: OwnedSemaphorePermit) {
    // The caller gave up: nothing to deliver.
    let batch: Vec<Pending> = batch
        .into_iter()
        .filter(|p| !p.respond.is_closed())
        .collect();
    let Some(first) = batch.iter().map(|p| p.deadline).min() else {
        return;
    };
    // Usually at once: only a new connection waits for the peer's first answer, and no
    // longer than the earliest deadline here, so nobody's timer overtakes it.
    let connection = match link
        .establish(first.saturating_duration_since(Instant::now()))
        .await
    {
        Ok(connection) => connection,
        Err(error) => return fail_all(batch.into_iter().map(|p| p.respond), error),
    };
    let now = Instant::now();
    let linger_until = now + LINGER;
    let mut live = Vec::with_capacity(batch.len());
    for pending in batch {
        match pending.deadline.checked_duration_since(now) {
            Some(left) if !left.is_zero() => live.push((pending, left)),
            _ => {
                let _ = pending.respond.send(Err(TransportError::Unreachable {
                    address: link.address.clone(),
                    reason: "the deadline passed before the delivery was sent".to_owned(),
                }));
            }
        }
    }
    if live.is_empty() {
        return;
    }
    if link.singles() {
        drop(slot);
        return deliver_singly(&link, live).await;
    }
    crate::metrics::transport_batch(live.len());
    let millis = |left: Duration| u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1);
    let longest = live.iter().map(|(_, left)| *left).max().unwrap_or_default();
    let body = batch_body(
        &live
            .iter()
            .map(|(p, left)| (millis(*left), p.encoded.as_slice()))
            .collect::<Vec<_>>(),
    );
    let sent = connection
        .client
        .post(link.urls.batch.clone())
        .header(SECRET_HEADER, &*link.secret)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .timeout(longest + GRACE)
        .body(body)
        .send()
        .await;
    let mut response = match sent {
        Ok(response) => response,
        Err(error) => {
            let error = super::send_error(&link.address, error);
            // Retired before anyone hears of the failure, so their next request cannot
            // take the same connection.
            link.retire(&connection);
            return fail_all(live.into_iter().map(|(p, _)| p.respond), error);
        }
    };
    match response.status() {
        StatusCode::OK => {}
        StatusCode::UNAUTHORIZED => {
            let error = TransportError::Unauthorized(link.address.clone());
            return fail_all(live.into_iter().map(|(p, _)| p.respond), error);
        }
        // A runner of an older version: nothing ran; one request per envelope, as it
        // understands, for a while.
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => {
            *link.singles_until.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(Instant::now() + SINGLES_FOR);
            drop(slot);
            return deliver_singly(&link, live).await;
        }
        status => {
            let body = response.bytes().await.unwrap_or_default();
            let error = match serde_json::from_slice::<DeliveryError>(&body) {
                Ok(error) => TransportError::Delivery(error),
                Err(_) => link.protocol(format!(
                    "status {status}: {}",
                    String::from_utf8_lossy(&body)
                )),
            };
            return fail_all(live.into_iter().map(|(p, _)| p.respond), error);
        }
    }
    // Each answer is due by its envelope's deadline + GRACE (the runner answers a timeout
    // at the deadline). One that is not is the connection's failure: retired before its
    // caller's own timer (deadline + 2×GRACE) reports it, like any other failure.
    let due: Vec<Instant> = live.iter().map(|(p, _)| p.deadline + GRACE).collect();
    let mut respond: Vec<Option<oneshot::Sender<Answer>>> =
        live.into_iter().map(|(p, _)| Some(p.respond)).collect();
    let mut slot = Some(slot);
    let mut lines = Lines::default();
    loop {
        let overdue_at = respond
            .iter()
            .zip(&due)
            .filter(|(r, _)| r.is_some())
            .map(|(_, due)| *due)
            .min()
            .unwrap_or(linger_until);
        let wake = if slot.is_some() {
            overdue_at.min(linger_until)
        } else {
            overdue_at
        };
        let chunk = match tokio::time::timeout_at(wake, response.chunk()).await {
            Ok(chunk) => chunk,
            Err(_) if Instant::now() >= overdue_at => {
                link.retire(&connection);
                let now = Instant::now();
                for (respond, due) in respond.iter_mut().zip(&due) {
                    if *due <= now
                        && let Some(respond) = respond.take()
                    {
                        let _ = respond.send(Err(link.lost("no answer by the deadline")));
                    }
                }
                if respond.iter().all(Option::is_none) {
                    return;
                }
                continue;
            }
            Err(_) => {
                slot = None;
                continue;
            }
        };
        let chunk = match chunk {
            Ok(Some(chunk)) => chunk,
            Ok(None) => {
                let error = link.protocol("the batch ended before every envelope was answered");
                return fail_all(respond.into_iter().flatten(), error);
            }
            // Sent, and the answers broke off: those without one may have run.
            Err(error) => {
                link.retire(&connection);
                return fail_all(respond.into_iter().flatten(), link.lost(error.to_string()));
            }
        };
        let complete = match lines.push(&chunk) {
            Ok(complete) => complete,
            Err(too_long) => {
                return fail_all(respond.into_iter().flatten(), link.protocol(too_long));
            }
        };
        for line in complete.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let answer = match serde_json::from_slice::<BatchAnswer>(line) {
                Ok(answer) => answer,
                Err(error) => {
                    let error = link.protocol(format!("undecodable batch answer: {error}"));
                    return fail_all(respond.into_iter().flatten(), error);
                }
            };
            if let Some(respond) = respond.get_mut(answer.index).and_then(Option::take) {
                let _ = respond.send(answer.into_result());
            }
        }
        if respond.iter().all(Option::is_none) {
            return;
        }
    }
}

/// Fails every caller still waiting.
fn fail_all(respond: impl IntoIterator<Item = oneshot::Sender<Answer>>, error: TransportError) {
    for respond in respond {
        let _ = respond.send(Err(error.clone()));
    }
}

/// One request per envelope (a peer without the batch route).
async fn deliver_singly(link: &Link, live: Vec<(Pending, Duration)>) {
    let sends = live.into_iter().map(|(pending, _)| async move {
        let _ = pending
            .respond
            .send(deliver_one(link, pending.encoded, pending.deadline).await);
    });
    futures::future::join_all(sends).await;
}

/// Delivers one encoded envelope with one request (`/deliver`) before `deadline`.
async fn deliver_one(link: &Link, encoded: Vec<u8>, deadline: Instant) -> Answer {
    let connection = link
        .establish(deadline.saturating_duration_since(Instant::now()))
        .await?;
    // What is left once the connection is known to reach a runner.
    let timeout = deadline.saturating_duration_since(Instant::now());
    if timeout.is_zero() {
        return Err(TransportError::Unreachable {
            address: link.address.clone(),
            reason: "the deadline passed before the delivery was sent".to_owned(),
        });
    }
    let response = connection
        .client
        .post(link.urls.single.clone())
        .header(SECRET_HEADER, &*link.secret)
        .header(TIMEOUT_HEADER, timeout.as_millis().to_string())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .timeout(timeout + GRACE)
        .body(encoded)
        .send()
        .await
        .map_err(|e| {
            link.retire(&connection);
            super::send_error(&link.address, e)
        })?;
    let status = response.status();
    let body = response.bytes().await.map_err(|e| {
        link.retire(&connection);
        link.lost(e.to_string())
    })?;
    single_answer(&link.address, status, &body)
}

/// Splits a byte stream into lines, keeping an unfinished line for the next chunk.
#[derive(Debug, Default)]
struct Lines {
    buffer: Vec<u8>,
}

impl Lines {
    /// Adds `chunk`; returns every line it completed, each ending in `\n`, as one buffer.
    fn push(&mut self, chunk: &[u8]) -> Result<Vec<u8>, String> {
        // Only the new bytes can hold the last newline.
        let end = chunk.iter().rposition(|b| *b == b'\n');
        let Some(end) = end else {
            self.buffer.extend_from_slice(chunk);
            return if self.buffer.len() > MAX_LINE {
                Err(format!("an answer line is longer than {MAX_LINE} bytes"))
            } else {
                Ok(Vec::new())
            };
        };
        let mut complete = std::mem::take(&mut self.buffer);
        complete.extend_from_slice(&chunk[..=end]);
        self.buffer.extend_from_slice(&chunk[end + 1..]);
        Ok(complete)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::{Lines, batch_body};
    use crate::transport::http::DeliveryBatch;

    proptest! {
        /// However the stream is cut, the same lines come out, in order.
        #[test]
        fn lines_survive_any_chunking(
            lines in proptest::collection::vec("[a-z{}\":0-9]{0,40}", 0..20),
            cuts in proptest::collection::vec(0usize..2000, 0..30),
        ) {
            let stream: Vec<u8> = lines.iter().flat_map(|l| format!("{l}\n").into_bytes()).collect();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (stream.len() + 1)).collect();
            cuts.push(0);
            cuts.push(stream.len());
            cuts.sort_unstable();
            let mut splitter = Lines::default();
            let mut out = Vec::new();
            for pair in cuts.windows(2) {
                let complete = splitter.push(&stream[pair[0]..pair[1]]).expect("short lines");
                prop_assert!(complete.is_empty() || complete.ends_with(b"\n"));
                out.extend_from_slice(&complete);
            }
            prop_assert_eq!(out, stream);
        }
    }

    #[test]
    fn a_line_without_end_past_the_limit_is_refused() {
        let mut splitter = Lines::default();
        let chunk = vec![b'x'; 1 << 20];
        let mut refused = false;
        for _ in 0..=(super::MAX_LINE >> 20) {
            if splitter.push(&chunk).is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused);
    }

    #[test]
    fn the_hand_built_body_is_a_delivery_batch() {
        let envelope = serde_json::json!({
            "version": 1, "entity_type": "counter", "entity_id": "a",
            "tag": "get", "payload": {}
        });
        let encoded = serde_json::to_vec(&envelope).expect("encodes");
        let body = batch_body(&[(5, &encoded), (7, &encoded)]);
        let batch: DeliveryBatch = serde_json::from_slice(&body).expect("decodes");
        assert_eq!(
            batch.items.iter().map(|i| i.timeout_ms).collect::<Vec<_>>(),
            vec![5, 7]
        );
        assert_eq!(batch.items[1].envelope.entity_id.as_str(), "a");
        let empty: DeliveryBatch = serde_json::from_slice(&batch_body(&[])).expect("decodes");
        assert!(empty.items.is_empty());
    }
}
