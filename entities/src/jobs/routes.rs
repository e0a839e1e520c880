//! The job routes (an application router on the gateway; entities reached only through
//! the typed client):
//!
//! - `POST /jobs` → 202 `{id, status_url}`. The type must be registered and the payload
//!   must decode as its payload (400 naming the field otherwise). A `key` (or the
//!   `Idempotency-Key` header) names the same job every time: `job-key` keeps the first
//!   claimant's id.
//! - `GET /jobs/{id}`: the record, or the live view (status `running`, progress) while an
//!   attempt runs.
//! - `POST /jobs/{id}/retry`: a dead or cancelled job runs again with a fresh budget (422
//!   `not_retryable` otherwise).
//! - `POST /jobs/{id}/cancel`: cancels the job (a running attempt cooperatively).

use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use shoal::gateway::{ApiError, AppRouter, ErrorBody, GatewayContext, JsonBody};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::JobId;
use super::control::{JobControl, JobControlMessage};
use super::entity::{Job, JobMessage, NewJob};
use super::key::{JobKey, JobKeyMessage, key_entity_id};
use super::record::{JobStatus, JobView};
use super::registry::JobRegistry;

/// Longest unique key.
pub const MAX_KEY_LEN: usize = 256;

/// The job routes over `registry`'s types.
pub fn routes(registry: Arc<JobRegistry>) -> AppRouter {
    OpenApiRouter::new()
        .routes(routes!(enqueue))
        .routes(routes!(show))
        .routes(routes!(retry))
        .routes(routes!(cancel))
        .layer(Extension(registry))
}

/// An enqueued job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Enqueued {
    /// The job's id (an existing job's, for a key already taken).
    pub id: String,
    /// Where its status is.
    pub status_url: String,
}

/// A cancel request's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CancelRequested {
    /// The job.
    pub id: String,
    /// Whether an attempt was running (it stops cooperatively).
    pub running: bool,
}

/// Enqueues a job.
#[utoipa::path(
    post,
    path = "/jobs",
    request_body = NewJob,
    params(("Idempotency-Key" = Option<String>, Header, description = "The job's unique key (as `key`)")),
    responses(
        (status = 202, description = "Enqueued (or the existing job of the key)", body = Enqueued),
        (status = 400, description = "Unknown type, a payload that does not decode, a bad field", body = ErrorBody),
        (status = 503, description = "The owner or storage is unavailable", body = ErrorBody),
    ),
    tag = "jobs"
)]
async fn enqueue(
    State(gateway): State<GatewayContext>,
    Extension(registry): Extension<Arc<JobRegistry>>,
    headers: HeaderMap,
    JsonBody(mut new): JsonBody<NewJob>,
) -> Result<(StatusCode, Json<Enqueued>), ApiError> {
    validate(&registry, &mut new, &headers)?;
    let client = gateway.client();
    let mut id = JobId::new().to_string();
    if let Some(key) = &new.key {
        let claim = JobKeyMessage::Claim { job_id: id.clone() };
        let holder = client
            .entity::<JobKey>(key_entity_id(&new.job_type, key))
            .ask(claim)
            .await?;
        id = holder.job_id.unwrap_or(id);
    }
    client.entity::<Job>(id.as_str()).ask(JobMessage::Enqueue(new)).await?;
    let status_url = format!("/jobs/{id}");
    Ok((StatusCode::ACCEPTED, Json(Enqueued { id, status_url })))
}

fn validate(registry: &JobRegistry, new: &mut NewJob, headers: &HeaderMap) -> Result<(), ApiError> {
    let handler = registry.get(&new.job_type).ok_or_else(|| {
        let known = registry.types().join(", ");
        ApiError::bad_request(
            "unknown_type",
            format!("field `type`: no job type `{}` (known: {known})", new.job_type),
        )
    })?;
    handler
        .check(&new.payload)
        .map_err(|e| ApiError::bad_request("bad_payload", format!("field `payload`: {e}")))?;
    if new.key.is_none() {
        new.key = headers
            .get("idempotency-key")
            .map(|v| v.to_str().map(str::to_owned))
            .transpose()
            .map_err(|_| ApiError::bad_request("bad_key", "header `Idempotency-Key` is not text"))?;
    }
    if let Some(key) = &new.key
        && (key.is_empty() || key.len() > MAX_KEY_LEN || key.chars().any(char::is_control))
    {
        return Err(ApiError::bad_request(
            "bad_key",
            format!("field `key`: 1–{MAX_KEY_LEN} printable characters"),
        ));
    }
    if new.max_attempts == Some(0) {
        return Err(ApiError::bad_request("bad_body", "field `max_attempts`: at least 1"));
    }
    if new.timeout_ms == Some(0) {
        return Err(ApiError::bad_request("bad_body", "field `timeout_ms`: at least 1"));
    }
    Ok(())
}

fn job_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(id) = path?;
    id.parse::<JobId>()
        .map(|id| id.to_string())
        .map_err(|e| ApiError::bad_request("bad_id", format!("path `id`: {e}")))
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound {
        code: "no_such_job",
        message: format!("no job `{id}`"),
    }
}

/// A job's record, or its live view while an attempt runs.
#[utoipa::path(
    get,
    path = "/jobs/{id}",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "The job", body = JobView),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 503, description = "The owner or storage is unavailable", body = ErrorBody),
    ),
    tag = "jobs"
)]
async fn show(
    State(gateway): State<GatewayContext>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<JobView>, ApiError> {
    let id = job_id(path)?;
    let client = gateway.client();
    let control = client
        .entity::<JobControl>(id.as_str())
        .ask(JobControlMessage::Status {})
        .await?;
    if let Some(live) = control.live {
        return Ok(Json(live));
    }
    let view = client.entity::<Job>(id.as_str()).ask(JobMessage::Get {}).await?;
    if view.status == JobStatus::New {
        return Err(not_found(&id));
    }
    Ok(Json(view))
}

/// Runs a dead or cancelled job again with a fresh attempt budget.
#[utoipa::path(
    post,
    path = "/jobs/{id}/retry",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 202, description = "Queued again", body = JobView),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 422, description = "The job is not dead or cancelled", body = ErrorBody),
    ),
    tag = "jobs"
)]
async fn retry(
    State(gateway): State<GatewayContext>,
    path: Result<Path<String>, PathRejection>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let id = job_id(path)?;
    let job = gateway.client().entity::<Job>(id.as_str());
    if job.ask(JobMessage::Get {}).await?.status == JobStatus::New {
        return Err(not_found(&id));
    }
    let view = job.ask(JobMessage::Retry {}).await?;
    Ok((StatusCode::ACCEPTED, Json(view)))
}

/// Cancels a job; a running attempt is cancelled cooperatively, then stops.
#[utoipa::path(
    post,
    path = "/jobs/{id}/cancel",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 202, description = "Cancel requested", body = CancelRequested),
        (status = 400, description = "Bad id", body = ErrorBody),
    ),
    tag = "jobs"
)]
async fn cancel(
    State(gateway): State<GatewayContext>,
    path: Result<Path<String>, PathRejection>,
) -> Result<(StatusCode, Json<CancelRequested>), ApiError> {
    let id = job_id(path)?;
    let reply = gateway
        .client()
        .entity::<JobControl>(id.as_str())
        .ask(JobControlMessage::Cancel {})
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(CancelRequested {
            id,
            running: reply.running,
        }),
    ))
}
