//! The application's HTTP routes, served by the gateway beside its own: the binary hands
//! [`routes()`] to `GatewayParams::with_routes`, so they share the gateway's request ids,
//! rate limits (`redis.api-limits.applications`), JSON errors and OpenAPI document. Each
//! handler reaches entities only through the gateway's typed client.
//!
//! - `GET /counters/{entity_id}`: a counter's count (its volatile `get`).
//! - `/jobs…`: the job routes ([`shoal_jobs::routes`]).
//! - `/tenants/{tenant}/events`: notifications ([`shoal_notifications::routes`]).
//! - `/extractions…`: the extraction routes ([`shoal_extraction::routes`]).

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use shoal::gateway::{ApiError, AppRouter, ErrorBody, GatewayContext};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::counter::{Counter, CounterMessage};

/// Every route of the built-in application.
pub fn routes() -> AppRouter {
    routes_with(None)
}

/// Every route; `GET /jobs` lists from `store`.
pub fn routes_with(store: Option<shoal_jobs::routes::JobStore>) -> AppRouter {
    let jobs = shoal_jobs::job_types(None).unwrap_or_default();
    routes_with_types(store, jobs, None)
}

/// Every route, `POST /jobs` validating against `jobs` (the runners' job types), streams
/// served from `subscriptions` (none: `GET /tenants/{tenant}/events` answers 503).
pub fn routes_with_types(
    store: Option<shoal_jobs::routes::JobStore>,
    jobs: shoal_jobs::JobRegistry,
    subscriptions: Option<shoal_notifications::routes::Subscriptions>,
) -> AppRouter {
    let extraction = shoal_extraction::ExtractionSetup::offline()
        .api()
        .map(std::sync::Arc::new)
        .ok();
    routes_for(store, jobs, subscriptions, extraction)
}

/// Every route, `POST /jobs` validating against `jobs`, streams served from
/// `subscriptions`; the extraction routes over `extraction` (left out without it).
pub fn routes_for(
    store: Option<shoal_jobs::routes::JobStore>,
    jobs: shoal_jobs::JobRegistry,
    subscriptions: Option<shoal_notifications::routes::Subscriptions>,
    extraction: Option<std::sync::Arc<shoal_extraction::routes::ExtractionApi>>,
) -> AppRouter {
    let jobs = std::sync::Arc::new(jobs);
    let router = OpenApiRouter::new()
        .routes(routes!(counter_value))
        .merge(shoal_jobs::routes::routes(jobs, store))
        .merge(shoal_notifications::routes::routes(subscriptions));
    match extraction {
        Some(api) => router.merge(shoal_extraction::routes::routes(api)),
        None => router,
    }
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
    let counter = gateway.client().entity::<Counter>(id.as_str());
    let address = counter.address()?.to_string();
    let reply = counter.ask(CounterMessage::Get {}).await?;
    Ok(Json(CounterValue {
        counter: address,
        count: reply.count,
    }))
}
