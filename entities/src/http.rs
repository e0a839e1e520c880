//! The application's HTTP routes, served by the gateway beside its own: the binary hands
//! [`routes`] to `GatewayParams::with_routes`, so they share the gateway's request ids,
//! rate limits (`redis.api-limits.applications`), JSON errors and OpenAPI document. Each
//! handler reaches entities only through the gateway's client.
//!
//! - `GET /counters/{entity_id}`: a counter's count (its volatile `get`).

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use shoal::client::Request;
use shoal::entity::Entity;
use shoal::gateway::{ApiError, AppRouter, ErrorBody, GatewayContext};
use shoal::ids::{EntityAddress, EntityId};
use shoal::message_storage::Reply;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::counter::{Counter, CounterReply};

/// Every route of the built-in application.
pub fn routes() -> AppRouter {
    OpenApiRouter::new().routes(routes!(counter_value))
}

/// A counter's count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CounterValue {
    /// `counter/<id>`.
    pub counter: String,
    /// The count.
    pub count: i64,
}

/// Reads a counter's count.
#[utoipa::path(
    get,
    path = "/counters/{entity_id}",
    params(("entity_id" = String, Path, description = "The counter's id")),
    responses(
        (status = 200, description = "The count", body = CounterValue),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 429, description = "Rate limited or the mailbox is full", body = ErrorBody),
        (status = 503, description = "The owner or storage is unavailable", body = ErrorBody),
        (status = 504, description = "No reply in time", body = ErrorBody),
    ),
    tag = "counters"
)]
async fn counter_value(
    State(gateway): State<GatewayContext>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<CounterValue>, ApiError> {
    let Path(id) = path?;
    let entity_id =
        EntityId::new(id).map_err(|e| ApiError::bad_request("bad_entity_id", e.to_string()))?;
    let address = EntityAddress {
        entity_type: Counter.entity_type(),
        entity_id,
    };
    let request = Request::volatile(address.clone(), "get", serde_json::json!({}));
    match gateway.client().ask(request).await? {
        Reply::Ok { value } => {
            let reply: CounterReply = serde_json::from_value(value)
                .map_err(|e| ApiError::Internal(format!("a counter replied oddly: {e}")))?;
            Ok(Json(CounterValue {
                counter: address.to_string(),
                count: reply.count,
            }))
        }
        Reply::Err { code, message } => Err(ApiError::HandlerError { code, message }),
    }
}
