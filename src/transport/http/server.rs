//! The runner side of the HTTP/2 transport: the delivery routes and entity status.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Json, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::Semaphore;

use super::{
    BatchAnswer, BatchItem, DELIVER_BATCH_PATH, DELIVER_PATH, ENTITY_PATH, HELLO_PATH, NDJSON,
    SECRET_HEADER, TIMEOUT_HEADER,
};
use crate::entity_runtime::EntityRuntime;
use crate::ids::{EntityAddress, EntityId, EntityType};
use crate::message_storage::Reply;
use crate::transport::{DeliveryError, EntityStatus};
use crate::transport::{ENVELOPE_VERSION, Envelope};

/// The deadline of a delivery that names none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Answers that are ready together go out as one chunk (one DATA frame) of at most this
/// many lines.
const MAX_LINES_PER_CHUNK: usize = 256;

/// Envelopes of batches running at once on this runner; more wait (within their deadline).
/// One HTTP/2 connection's stream limit used to bound this; a batch carries up to 256.
const MAX_RUNNING: usize = 8192;

/// Largest batch body accepted (senders stop adding envelopes at 1 MiB).
const MAX_BATCH_BODY: usize = 8 << 20;

struct ServerState {
    runtime: EntityRuntime,
    secret: String,
    running: Semaphore,
}

/// A batch as received: each envelope is decoded on its own, so a bad one fails alone.
#[derive(Deserialize)]
struct RawBatch {
    items: Vec<Box<RawValue>>,
}

/// The runner side: the delivery routes, for mounting on the runner's HTTP server.
pub fn router(runtime: EntityRuntime, secret: String) -> Router {
    Router::new()
        .route(HELLO_PATH, get(hello))
        .route(DELIVER_PATH, post(deliver))
        .route(
            DELIVER_BATCH_PATH,
            post(deliver_batch).layer(DefaultBodyLimit::max(MAX_BATCH_BODY)),
        )
        .route(
            &format!("{ENTITY_PATH}/{{entity_type}}/{{entity_id}}"),
            get(entity_status),
        )
        // One shared state: axum gives every request its own copy.
        .with_state(Arc::new(ServerState {
            runtime,
            secret,
            running: Semaphore::new(MAX_RUNNING),
        }))
}

fn authorized(headers: &HeaderMap, secret: &str) -> bool {
    let given = headers
        .get(SECRET_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    same_secret(given, secret.as_bytes())
}

/// Compares secrets without an early exit, so timing reveals nothing about the prefix.
pub(crate) fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Answers a sender's first request on a new connection: proof that a live runner reads it
/// (see `peer::Link::establish`).
async fn hello(State(state): State<Arc<ServerState>>, headers: HeaderMap) -> Response {
    if !authorized(&headers, &state.secret) {
        return unauthorized();
    }
    StatusCode::NO_CONTENT.into_response()
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(serde_json::json!({"error": "missing or wrong cluster secret"})),
    )
        .into_response()
}

fn refused(error: DeliveryError) -> Response {
    (status_of(&error), Json(error)).into_response()
}

async fn entity_status(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    Path((entity_type, entity_id)): Path<(String, String)>,
) -> Response {
    if !authorized(&headers, &state.secret) {
        return unauthorized();
    }
    let (Ok(entity_type), Ok(entity_id)) = (EntityType::new(entity_type), EntityId::new(entity_id))
    else {
        return (StatusCode::BAD_REQUEST, Json(EntityStatus::default())).into_response();
    };
    let address = EntityAddress {
        entity_type,
        entity_id,
    };
    Json(state.runtime.entity_status(&address).await).into_response()
}

fn status_of(error: &DeliveryError) -> StatusCode {
    match error {
        DeliveryError::NotOwner(_) | DeliveryError::ShardMoving(_) => StatusCode::CONFLICT,
        DeliveryError::MailboxFull(_) | DeliveryError::Overloaded => StatusCode::TOO_MANY_REQUESTS,
        DeliveryError::UnknownEntityType(_) => StatusCode::NOT_FOUND,
        DeliveryError::BadMessage(_) => StatusCode::BAD_REQUEST,
        DeliveryError::HandlerFailed(_) | DeliveryError::TypeNotDeployed(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        DeliveryError::Timeout => StatusCode::GATEWAY_TIMEOUT,
    }
}

/// Runs one envelope.
async fn run(runtime: &EntityRuntime, envelope: Envelope) -> Result<Reply, DeliveryError> {
    if envelope.version != ENVELOPE_VERSION {
        return Err(DeliveryError::BadMessage(format!(
            "envelope version {} is not supported (this runner speaks {ENVELOPE_VERSION})",
            envelope.version
        )));
    }
    let span = tracing::info_span!(
        "deliver",
        request_id = envelope.request_id.as_deref().unwrap_or(""),
        entity = %envelope.address(),
        tag = %envelope.tag,
    );
    tracing::Instrument::instrument(runtime.deliver(envelope.into_delivery()), span).await
}

/// `work` under `timeout`.
async fn within(
    timeout: Duration,
    work: impl Future<Output = Result<Reply, DeliveryError>>,
) -> Result<Reply, DeliveryError> {
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(DeliveryError::Timeout))
}

/// A delivery body from a peer that presented the cluster secret, or the refusal to send.
fn admit<T>(
    state: &ServerState,
    headers: &HeaderMap,
    body: Result<Json<T>, axum::extract::rejection::JsonRejection>,
) -> Result<T, Box<Response>> {
    if !authorized(headers, &state.secret) {
        return Err(Box::new(unauthorized()));
    }
    body.map(|Json(body)| body)
        .map_err(|rejection| Box::new(refused(DeliveryError::BadMessage(rejection.body_text()))))
}

/// `POST /_shoal/v1/deliver`: one envelope, one JSON answer.
async fn deliver(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    envelope: Result<Json<Envelope>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let envelope = match admit(&state, &headers, envelope) {
        Ok(envelope) => envelope,
        Err(response) => return *response,
    };
    let timeout = headers
        .get(TIMEOUT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(DEFAULT_TIMEOUT, Duration::from_millis);
    match within(timeout, run(&state.runtime, envelope)).await {
        Ok(reply) => (StatusCode::OK, Json(reply)).into_response(),
        Err(error) => refused(error),
    }
}

/// `POST /_shoal/v1/deliver-batch`: many envelopes; the answers stream back as NDJSON lines
/// in the order they finish, each naming its envelope's index, so a slow handler holds up
/// only its own answer.
async fn deliver_batch(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    batch: Result<Json<RawBatch>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let batch = match admit(&state, &headers, batch) {
        Ok(batch) => batch,
        Err(response) => return *response,
    };
    let answers: FuturesUnordered<_> = batch
        .items
        .into_iter()
        .enumerate()
        .map(|(index, raw)| {
            let state = state.clone();
            async move {
                let result = match serde_json::from_str::<BatchItem>(raw.get()) {
                    Ok(item) => {
                        within(Duration::from_millis(item.timeout_ms), async {
                            let _running = state.running.acquire().await;
                            run(&state.runtime, item.envelope).await
                        })
                        .await
                    }
                    Err(error) => Err(DeliveryError::BadMessage(format!(
                        "envelope {index} of the batch: {error}"
                    ))),
                };
                BatchAnswer::new(index, result).to_line()
            }
        })
        .collect();
    // The handlers run as the body is polled: a caller that hangs up drops them, as it
    // drops a single delivery's handler (persisted messages stay stored and still run).
    let body = answers
        .ready_chunks(MAX_LINES_PER_CHUNK)
        .map(|lines| Ok::<_, Infallible>(lines.concat()));
    ([(header::CONTENT_TYPE, NDJSON)], Body::from_stream(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn secrets_match_only_when_equal() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abd", b"abc"));
        assert!(!same_secret(b"ab", b"abc"));
        assert!(!same_secret(b"", b"abc"));
    }
}
