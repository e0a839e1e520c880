//! The runner transport over HTTP/2: `POST /_shoal/v1/deliver` with a JSON [`Envelope`],
//! authenticated by the cluster's shared secret (`x-shoal-secret`). The client is one pooled
//! reqwest client speaking HTTP/2 with prior knowledge, so each peer gets one multiplexed
//! connection, re-established by itself after the peer restarts.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::extract::{Json, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use super::{ENVELOPE_VERSION, Envelope, Transport, TransportError};
use crate::entity_runtime::{DeliveryError, EntityRuntime, EntityStatus};
use crate::ids::{EntityAddress, EntityId, EntityType};
use crate::message_storage::Reply;

/// The header that carries the cluster secret.
pub const SECRET_HEADER: &str = "x-shoal-secret";
/// The header that carries the sender's deadline for this delivery, in milliseconds.
pub const TIMEOUT_HEADER: &str = "x-shoal-timeout-ms";
/// The delivery route.
pub const DELIVER_PATH: &str = "/_shoal/v1/deliver";
/// The entity-status route (followed by `/{type}/{id}`).
pub const ENTITY_PATH: &str = "/_shoal/v1/entities";
/// The header that carries the request id across the transport.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The HTTP/2 transport client.
#[derive(Debug, Clone)]
pub struct HttpTransport {
    client: reqwest::Client,
    secret: String,
}

impl HttpTransport {
    /// A client presenting `secret`.
    pub fn new(secret: impl Into<String>) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .http2_prior_knowledge()
            .connect_timeout(Duration::from_secs(1))
            .pool_idle_timeout(Duration::from_secs(60))
            .http2_keep_alive_interval(Duration::from_secs(5))
            .http2_keep_alive_timeout(Duration::from_secs(5))
            .http2_keep_alive_while_idle(true)
            .build()
            .map_err(|e| format!("cannot build the transport client: {e}"))?;
        Ok(Self {
            client,
            secret: secret.into(),
        })
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
            .header(SECRET_HEADER, &self.secret)
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
        let url = format!("http://{address}{DELIVER_PATH}");
        let mut request = self.client.post(url);
        if let Some(request_id) = &envelope.request_id {
            request = request.header(REQUEST_ID_HEADER, request_id);
        }
        let response = request
            .header(SECRET_HEADER, &self.secret)
            .header(TIMEOUT_HEADER, timeout.as_millis().to_string())
            .timeout(timeout + Duration::from_millis(250))
            .json(&envelope)
            .send()
            .await
            .map_err(|e| {
                let reason = e.to_string();
                if e.is_connect() {
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
            })?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| TransportError::Lost {
            address: address.to_owned(),
            reason: e.to_string(),
        })?;
        let protocol = |reason: String| TransportError::Protocol {
            address: address.to_owned(),
            reason,
        };
        match status {
            StatusCode::OK => serde_json::from_slice(&body).map_err(|e| protocol(e.to_string())),
            StatusCode::UNAUTHORIZED => Err(TransportError::Unauthorized(address.to_owned())),
            _ => match serde_json::from_slice::<DeliveryError>(&body) {
                Ok(error) => Err(TransportError::Delivery(error)),
                Err(_) => Err(protocol(format!(
                    "status {status}: {}",
                    String::from_utf8_lossy(&body)
                ))),
            },
        }
    }
}

struct ServerState {
    runtime: EntityRuntime,
    secret: String,
}

/// The runner side: the delivery route, for mounting on the runner's HTTP server.
pub fn router(runtime: EntityRuntime, secret: String) -> Router {
    Router::new()
        .route(DELIVER_PATH, post(deliver))
        .route(
            &format!("{ENTITY_PATH}/{{entity_type}}/{{entity_id}}"),
            get(entity_status),
        )
        // One shared state: axum gives every request its own copy.
        .with_state(Arc::new(ServerState { runtime, secret }))
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

fn authorized(headers: &HeaderMap, secret: &str) -> bool {
    let given = headers
        .get(SECRET_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    same_secret(given, secret.as_bytes())
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(serde_json::json!({"error": "missing or wrong cluster secret"})),
    )
        .into_response()
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
        DeliveryError::HandlerFailed(_) => StatusCode::SERVICE_UNAVAILABLE,
        DeliveryError::Timeout => StatusCode::GATEWAY_TIMEOUT,
    }
}

/// Compares secrets without an early exit, so timing reveals nothing about the prefix.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn deliver(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    envelope: Result<Json<Envelope>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if !authorized(&headers, &state.secret) {
        return unauthorized();
    }
    let Json(envelope) = match envelope {
        Ok(envelope) => envelope,
        Err(rejection) => {
            let error = DeliveryError::BadMessage(rejection.body_text());
            return (status_of(&error), Json(error)).into_response();
        }
    };
    if envelope.version != ENVELOPE_VERSION {
        let error = DeliveryError::BadMessage(format!(
            "envelope version {} is not supported (this runner speaks {ENVELOPE_VERSION})",
            envelope.version
        ));
        return (status_of(&error), Json(error)).into_response();
    }
    let timeout = headers
        .get(TIMEOUT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(Duration::from_secs(30), Duration::from_millis);
    let span = tracing::info_span!(
        "deliver",
        request_id = envelope.request_id.as_deref().unwrap_or(""),
        entity = %envelope.address(),
        tag = %envelope.tag,
    );
    let delivery = envelope.into_delivery();
    let delivered = tracing::Instrument::instrument(state.runtime.deliver(delivery), span);
    let result = match tokio::time::timeout(timeout, delivered).await {
        Ok(result) => result,
        Err(_) => Err(DeliveryError::Timeout),
    };
    match result {
        Ok(reply) => (StatusCode::OK, Json(reply)).into_response(),
        Err(error) => (status_of(&error), Json(error)).into_response(),
    }
}
