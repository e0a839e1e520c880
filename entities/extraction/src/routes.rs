//! The extraction routes (an application router on the gateway; the entity reached only
//! through the typed client):
//!
//! - `POST /extractions[?wait=true]` → 202 `{id, status_url, events_url}`, or 200 with the
//!   extraction when it is cached, finished, or (`wait=true`) finishes within
//!   `[extraction] wait-timeout`. A cached result (Redis, then the durable copy in
//!   Postgres) answers at once, without the entity or a provider. Redis configured but
//!   down → 503 `redis_unavailable` (fail fast: no silent bypass).
//! - `GET /extractions/{id}`: state, current stage, per-stage timings, result or error;
//!   with `Accept: application/ld+json` the result as JSON-LD.
//! - `GET /extractions/{id}/events`: the journal as SSE (`sse.rs`).
//!
//! The API's state, the read check and the id parsing, which `sse` uses too, are in
//! `api.rs` (so `routes` → `sse` → `api`, and `routes` → `api`).
//!
//! Tenancy: the caller's tenant (`X-Tenant-Id`, from the verified token when
//! `[gateway.auth]` is on) is part of the id ([`ExtractionId::of`]), so the same text from
//! two tenants is two extractions, each with its own dedup, cached result and events, and
//! `cached: true` never answers from another tenant's run. Every read by id checks the
//! tenant stored with the extraction (its state, its result row, its `started` event):
//! another tenant's id is a 404 like an unknown one. A caller without a tenant (auth off,
//! no header) reads any, as on the job routes. `[extraction] shared-cache = true` leaves
//! the tenant out of the id and the checks (one extraction per inputs across tenants).

use std::sync::Arc;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shoal::gateway::{ApiError, AppRouter, ErrorBody, GatewayContext, JsonBody};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::api::{may_read, parse_id};
use super::entity::{Extraction, ExtractionMessage, ExtractionState, ExtractionStatus, StageRun};
use super::model::{
    ExtractionFailure, ExtractionId, ExtractionRequest, ExtractionResult, MAX_TEXT_CHARS,
    NewExtraction, Stage,
};
use super::{jsonld, metrics, sse};
use shoal_notifications::Tenant;

pub use super::api::ExtractionApi;

/// The extraction routes.
pub fn routes(api: Arc<ExtractionApi>) -> AppRouter {
    let mut router = OpenApiRouter::new()
        .routes(routes!(create))
        .routes(routes!(show))
        .routes(routes!(sse::events));
    declare(router.get_openapi_mut(), &api);
    router.layer(Extension(api))
}

/// Declares what `validate` and the id parser enforce, from `api`'s ontologies and
/// providers.
fn declare(doc: &mut utoipa::openapi::OpenApi, api: &ExtractionApi) {
    use serde_json::json;
    use shoal::gateway::openapi::{declare_parameter, declare_property};
    use utoipa::openapi::path::ParameterIn;

    let id = json!({"type": "string", "pattern": ExtractionId::PATTERN});
    declare_parameter(doc, ParameterIn::Path, "id", id);
    let event_id = shoal_notifications::routes::EVENT_ID_PATTERN;
    declare_parameter(
        doc,
        ParameterIn::Header,
        "Last-Event-ID",
        json!({"type": "string", "pattern": event_id}),
    );
    let ontologies = api.ontologies.ids();
    declare_property(
        doc,
        "NewExtraction",
        "ontology_id",
        json!({"type": "string", "enum": ontologies}),
    );
    let providers: Vec<&String> = api.models.keys().collect();
    declare_property(
        doc,
        "ExtractionOptions",
        "provider",
        json!({"type": ["string", "null"], "enum": providers.iter().map(|p| json!(p)).chain([json!(null)]).collect::<Vec<_>>()}),
    );
}

/// `?wait=`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CreateQuery {
    /// Wait for the result (up to `[extraction] wait-timeout`, then 202).
    pub wait: Option<bool>,
}

/// An accepted extraction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    /// The extraction's id (its content address).
    pub id: String,
    /// Where its state is.
    pub status_url: String,
    /// Where its events stream.
    pub events_url: String,
}

/// An extraction as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ExtractionView {
    /// The id.
    pub id: String,
    /// Where it stands.
    pub status: ExtractionStatus,
    /// The current stage.
    pub stage: Option<Stage>,
    /// Per-stage attempts and timings.
    pub stages: Vec<StageRun>,
    /// Why it waits, if it does.
    pub waiting: Option<String>,
    /// The result, once completed.
    pub result: Option<ExtractionResult>,
    /// The error, once failed.
    pub error: Option<ExtractionFailure>,
    /// Whether this answer came from the result cache.
    pub cached: bool,
    /// Requests that attached to this run.
    pub dedup_hits: u32,
    /// When it started.
    pub created_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
}

impl ExtractionView {
    fn of(state: ExtractionState) -> Self {
        Self {
            id: state.id,
            status: state.status,
            stage: state.stage,
            stages: state.stages,
            waiting: state.waiting,
            result: state.result,
            error: state.error,
            cached: false,
            dedup_hits: state.dedup_hits,
            created_at: state.created_at,
            finished_at: state.finished_at,
        }
    }

    fn cached(id: &str, result: ExtractionResult) -> Self {
        Self {
            id: id.to_owned(),
            status: ExtractionStatus::Completed,
            stage: None,
            stages: Vec::new(),
            waiting: None,
            result: Some(result),
            error: None,
            cached: true,
            dedup_hits: 0,
            created_at: None,
            finished_at: None,
        }
    }
}

/// Starts an extraction (or attaches to the same inputs' run).
#[utoipa::path(
    post,
    path = "/extractions",
    request_body = NewExtraction,
    params(CreateQuery),
    responses(
        (status = 200, description = "Cached, finished, or finished while waiting", body = ExtractionView),
        (status = 202, description = "Accepted: follow status_url or events_url", body = Accepted),
        (status = 400, description = "Bad text, unknown provider, bad option, bad X-Tenant-Id", body = ErrorBody),
        (status = 401, description = "Auth is on and the token is missing or invalid", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "`unknown_ontology`: no such ontology on this gateway (ontologies reload, so the document does not list them)", body = ErrorBody),
        (status = 429, description = "The caller's rate limit; see `Retry-After`", body = ErrorBody),
        (status = 503, description = "Redis, storage or the owner is unavailable", body = ErrorBody),
    ),
    tag = "extractions"
)]
async fn create(
    State(gateway): State<GatewayContext>,
    Extension(api): Extension<Arc<ExtractionApi>>,
    query: Result<Query<CreateQuery>, QueryRejection>,
    headers: HeaderMap,
    JsonBody(new): JsonBody<NewExtraction>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let caller = Tenant::of_caller(&headers)?;
    let request = validate(&api, new, caller.as_ref())?;
    let id = request.id();
    if let Some(result) = cached(&api, &id).await? {
        return Ok(respond(
            &headers,
            ExtractionView::cached(id.as_str(), result),
        ));
    }
    let extraction = gateway.client().entity::<Extraction>(id.as_str());
    let state = extraction.ask(ExtractionMessage::Start(request)).await?;
    if state.status.is_finished() {
        return Ok(respond(&headers, ExtractionView::of(state)));
    }
    if query.wait == Some(true)
        && let Some(journal) = &api.journal
        && sse::await_end(
            journal,
            &api.watch,
            &id,
            caller.as_ref(),
            api.config.wait_timeout,
        )
        .await
    {
        let state = extraction.ask(ExtractionMessage::Get {}).await?;
        return Ok(respond(&headers, ExtractionView::of(state)));
    }
    let accepted = Accepted {
        status_url: format!("/extractions/{id}"),
        events_url: format!("/extractions/{id}/events"),
        id: id.to_string(),
    };
    Ok((StatusCode::ACCEPTED, Json(accepted)).into_response())
}

/// The request with every default filled in, or a 400 naming the problem.
fn validate(
    api: &ExtractionApi,
    new: NewExtraction,
    tenant: Option<&Tenant>,
) -> Result<ExtractionRequest, ApiError> {
    if new.text.chars().all(char::is_whitespace) {
        return Err(ApiError::bad_request("bad_text", "field `text` is blank"));
    }
    if new.text.contains('\0') {
        return Err(ApiError::bad_request(
            "bad_text",
            "field `text` holds a NUL character (\\u0000), which storage cannot hold",
        ));
    }
    if new.text.chars().count() > MAX_TEXT_CHARS {
        return Err(ApiError::bad_request(
            "bad_text",
            format!("field `text` is over {MAX_TEXT_CHARS} characters"),
        ));
    }
    let ontology = api.ontologies.get(&new.ontology_id).ok_or_else(|| {
        ApiError::unprocessable(
            "unknown_ontology",
            format!(
                "field `ontology_id`: no ontology `{}` (known: {})",
                new.ontology_id,
                api.ontologies.ids().join(", ")
            ),
        )
    })?;
    let provider = new
        .options
        .provider
        .unwrap_or_else(|| api.config.default_provider.clone());
    let default_model = api.models.get(&provider).ok_or_else(|| {
        let known: Vec<&str> = api.models.keys().map(String::as_str).collect();
        ApiError::bad_request(
            "unknown_provider",
            format!(
                "field `options.provider`: no provider `{provider}` (known: {})",
                known.join(", ")
            ),
        )
    })?;
    let temperature = new.options.temperature.unwrap_or(0.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request(
            "bad_option",
            "field `options.temperature`: must be within 0–2",
        ));
    }
    let max_tokens = new.options.max_tokens.unwrap_or(1024);
    if !(1..=32_768).contains(&max_tokens) {
        return Err(ApiError::bad_request(
            "bad_option",
            "field `options.max_tokens`: must be within 1–32768",
        ));
    }
    let model = match new.options.model {
        Some(model) if model.is_empty() || model.chars().count() > 128 => {
            return Err(ApiError::bad_request(
                "bad_option",
                "field `options.model`: 1–128 characters",
            ));
        }
        Some(model) => model,
        None => default_model.clone(),
    };
    Ok(ExtractionRequest {
        text: new.text,
        ontology_id: ontology.id.clone(),
        ontology_version: ontology.version.clone(),
        provider,
        model,
        temperature,
        max_tokens,
        tenant: tenant.map(Tenant::to_string),
        shared: api.config.shared_cache,
    })
}

/// A finished result from the cache (Redis first, then the durable copy, which refills
/// Redis).
async fn cached(
    api: &ExtractionApi,
    id: &ExtractionId,
) -> Result<Option<ExtractionResult>, ApiError> {
    if let Some(cache) = &api.cache {
        let hit = cache.get(id.as_str()).await.map_err(redis_unavailable)?;
        if let Some(value) = hit.and_then(|v| serde_json::from_value(v).ok()) {
            metrics::cache("hit_redis");
            return Ok(Some(value));
        }
    }
    let Some(journal) = &api.journal else {
        metrics::cache("miss");
        return Ok(None);
    };
    let stored = journal
        .result(id.as_str())
        .await
        .map_err(storage_unavailable)?;
    // The id holds the caller's tenant (or none, with a shared cache): a row found under it
    // is of the caller's scope.
    match stored {
        Some(stored) => {
            if let Some(cache) = &api.cache {
                cache
                    .put(id.as_str(), &stored.result)
                    .await
                    .map_err(redis_unavailable)?;
            }
            metrics::cache("hit_postgres");
            Ok(serde_json::from_value(stored.result).ok())
        }
        None => {
            metrics::cache("miss");
            Ok(None)
        }
    }
}

fn redis_unavailable(error: shoal::redis::RedisError) -> ApiError {
    ApiError::Unavailable {
        code: "redis_unavailable",
        message: format!("the result cache is unavailable: {error}"),
        retry: shoal::retry::RetryClass::Safe,
    }
}

fn storage_unavailable(error: super::journal::JournalError) -> ApiError {
    ApiError::Unavailable {
        code: "storage_unavailable",
        message: error.to_string(),
        retry: shoal::retry::RetryClass::Safe,
    }
}

fn wants_jsonld(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/ld+json"))
}

/// The view as JSON, or its result as JSON-LD when asked for (and there is one).
fn respond(headers: &HeaderMap, view: ExtractionView) -> Response {
    if wants_jsonld(headers)
        && let Some(result) = &view.result
    {
        let document = jsonld::document(result);
        return (
            [(header::CONTENT_TYPE, "application/ld+json")],
            Json(document),
        )
            .into_response();
    }
    Json(view).into_response()
}

/// An extraction's state (or its result as JSON-LD with `Accept: application/ld+json`).
#[utoipa::path(
    get,
    path = "/extractions/{id}",
    params(("id" = String, Path, description = "The extraction's id")),
    responses(
        (status = 200, description = "The extraction; with Accept: application/ld+json, its result as JSON-LD",
            content((ExtractionView = "application/json"), (Object = "application/ld+json"))),
        (status = 400, description = "Not an extraction id", body = ErrorBody),
        (status = 404, description = "No such extraction of the caller's tenant", body = ErrorBody),
        (status = 422, description = "JSON-LD asked for an extraction without a result", body = ErrorBody),
        (status = 503, description = "The owner or storage is unavailable", body = ErrorBody),
    ),
    tag = "extractions"
)]
async fn show(
    State(gateway): State<GatewayContext>,
    Extension(api): Extension<Arc<ExtractionApi>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path(id) = path?;
    let id = parse_id(&id)?;
    let caller = Tenant::of_caller(&headers)?;
    // Another tenant's extraction is answered exactly as an unknown one.
    let unknown = || ApiError::unknown("unknown_extraction", "extraction", &id);
    let state = gateway
        .client()
        .entity::<Extraction>(id.as_str())
        .ask(ExtractionMessage::Get {})
        .await?;
    let view = if state.status == ExtractionStatus::New {
        // Never started, or forgotten after keep-handle: the durable copy still answers.
        let stored = match &api.journal {
            Some(journal) => journal
                .result(id.as_str())
                .await
                .map_err(storage_unavailable)?,
            None => None,
        };
        let stored = stored.filter(|s| may_read(&api, caller.as_ref(), s.tenant.as_deref()));
        match stored.and_then(|s| serde_json::from_value(s.result).ok()) {
            Some(result) => ExtractionView::cached(id.as_str(), result),
            None => return Err(unknown()),
        }
    } else {
        let owner = state.request.as_ref().and_then(|r| r.tenant.as_deref());
        if !may_read(&api, caller.as_ref(), owner) {
            return Err(unknown());
        }
        ExtractionView::of(state)
    };
    if wants_jsonld(&headers) && view.result.is_none() {
        return Err(ApiError::HandlerError {
            code: "no_result".to_owned(),
            message: format!(
                "extraction `{id}` is {:?}: no result to show as JSON-LD",
                view.status
            ),
        });
    }
    Ok(respond(&headers, view))
}
