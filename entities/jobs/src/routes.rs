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
//! - `POST /jobs/{id}/cancel`: cancels the job (a running attempt cooperatively); 422
//!   `not_cancellable` for a job that is already over.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use shoal::client::{ClientError, ShoalClient};
use shoal::gateway::{ApiError, AppRouter, ErrorBody, GatewayContext, IdempotencyKey, JsonBody};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::JobId;
use super::control::{JobControl, JobControlMessage};
use super::enqueue::Enqueued;
use super::entity::{Job, JobMessage, NewJob};
use super::listing::{self, JobPage, ListQuery, MAX_LIMIT};
use super::record::{JobStatus, JobView};
use super::registry::JobRegistry;

/// Where the listing reads: the cluster's database.
#[derive(Debug, Clone)]
pub struct JobStore {
    /// A pool on the cluster's database.
    pub pool: sqlx::PgPool,
    /// The cluster's name.
    pub cluster: String,
}

/// The job routes over `registry`'s types; without a `store`, `GET /jobs` answers 503.
pub fn routes(registry: Arc<JobRegistry>, store: Option<JobStore>) -> AppRouter {
    let mut router = OpenApiRouter::new()
        .routes(routes!(enqueue, list))
        .routes(routes!(show))
        .routes(routes!(retry))
        .routes(routes!(cancel));
    declare(router.get_openapi_mut(), &registry);
    router.layer(Extension(registry)).layer(Extension(store))
}

/// Declares what the handlers below enforce that depends on `registry` (its types, the
/// operator's limits) or on a parser (job ids, states).
fn declare(api: &mut utoipa::openapi::OpenApi, registry: &JobRegistry) {
    use serde_json::json;
    use shoal::gateway::openapi::{declare_parameter, declare_property};
    use utoipa::openapi::path::ParameterIn;

    let id = json!({"type": "string", "pattern": JobId::PATTERN});
    declare_parameter(api, ParameterIn::Path, "id", id.clone());
    declare_parameter(api, ParameterIn::Query, "cursor", id);
    declare_parameter(
        api,
        ParameterIn::Query,
        "state",
        json!({"type": "string", "enum": STATES}),
    );
    declare_parameter(
        api,
        ParameterIn::Query,
        "limit",
        json!({"type": "integer", "minimum": 1, "maximum": super::listing::MAX_LIMIT}),
    );
    let types = registry.types();
    declare_parameter(
        api,
        ParameterIn::Query,
        "type",
        json!({"type": "string", "enum": types}),
    );
    declare_property(
        api,
        "NewJob",
        "type",
        json!({"type": "string", "enum": types}),
    );
    let limits = registry.limits();
    declare_property(
        api,
        "NewJob",
        "max_attempts",
        json!({"type": ["integer", "null"], "minimum": 1, "maximum": limits.max_attempts}),
    );
    declare_property(
        api,
        "NewJob",
        "timeout_ms",
        json!({"type": ["integer", "null"], "minimum": 1, "maximum": MAX_TIMEOUT_MS}),
    );
    // Set from `X-Tenant-Id` (or the token); a body naming one is refused.
    declare_property(api, "NewJob", "tenant", json!({"type": "null"}));
    let min_ms = min_backoff_ms(limits);
    declare_property(
        api,
        "NewJob",
        "backoff",
        json!({
            "type": ["object", "null"],
            "description": "The waits between attempts (default: the type's); first_ms ≤ \
                max_ms, else 422 `bad_backoff`",
            "required": ["first_ms", "max_ms"],
            "additionalProperties": false,
            "properties": {
                "first_ms": {"type": "integer", "minimum": min_ms, "maximum": u64::MAX,
                    "description": "The wait after the first failed attempt, milliseconds"},
                "max_ms": {"type": "integer", "minimum": min_ms, "maximum": u64::MAX,
                    "description": "The longest wait, milliseconds"},
            },
        }),
    );
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
        (status = 400, description = "Unknown type, a bad field or key (what the document forbids)", body = ErrorBody),
        (status = 401, description = "Auth is on and the token is missing or invalid", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "`bad_payload`: the payload does not fit its type; `bad_backoff`: first_ms above max_ms", body = ErrorBody),
        (status = 429, description = "The caller's rate limit; see `Retry-After`", body = ErrorBody),
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
    let enqueued = super::enqueue::enqueue(gateway.client(), new).await?;
    Ok((StatusCode::ACCEPTED, Json(enqueued)))
}

fn validate(registry: &JobRegistry, new: &mut NewJob, headers: &HeaderMap) -> Result<(), ApiError> {
    let handler = registry.get(&new.job_type).ok_or_else(|| {
        let known = registry.types().join(", ");
        ApiError::bad_request(
            "unknown_type",
            format!(
                "field `type`: no job type `{}` (known: {known})",
                new.job_type
            ),
        )
    })?;
    if new.tenant.is_some() {
        return Err(ApiError::bad_request(
            "bad_body",
            "field `tenant`: set by the gateway from `X-Tenant-Id` (or the token), not the body",
        ));
    }
    new.tenant = tenant_of(headers)?;
    // One rule for the key, in the body or the header; job keys are a space of their own
    // (`job-key` entities, not message keys).
    new.key = match new.key.take() {
        Some(key) => Some(IdempotencyKey::parse(&key, "field `key`")?.into_inner()),
        None => IdempotencyKey::from_headers(headers)?.map(IdempotencyKey::into_inner),
    };
    check_limits(registry.limits(), new)?;
    if new
        .priority
        .is_some_and(|p| p > super::entity::LOWEST_PRIORITY)
    {
        return Err(ApiError::bad_request(
            "bad_body",
            format!(
                "field `priority`: 0 (first) to {}",
                super::entity::LOWEST_PRIORITY
            ),
        ));
    }
    if new
        .timeout_ms
        .is_some_and(|ms| !(1..=MAX_TIMEOUT_MS).contains(&ms))
    {
        return Err(ApiError::bad_request(
            "bad_body",
            format!("field `timeout_ms`: 1–{MAX_TIMEOUT_MS}"),
        ));
    }
    // Last, so whatever the document forbids is a 400 first: the document declares a
    // payload as any JSON value, so one its type refuses is a 422.
    handler
        .check(&new.payload)
        .map_err(|e| ApiError::unprocessable("bad_payload", format!("field `payload`: {e}")))?;
    Ok(())
}

/// `max_attempts` and `backoff` within the operator's limits (`[jobs]`).
fn check_limits(limits: super::JobLimits, new: &NewJob) -> Result<(), ApiError> {
    if let Some(attempts) = new.max_attempts
        && !(1..=limits.max_attempts).contains(&attempts)
    {
        return Err(ApiError::bad_request(
            "bad_body",
            format!(
                "field `max_attempts`: 1–{} (`[jobs] max-attempts-limit`), got {attempts}",
                limits.max_attempts
            ),
        ));
    }
    let min_ms = min_backoff_ms(limits);
    if let Some(backoff) = new.backoff {
        if backoff.first_ms < min_ms || backoff.max_ms < min_ms {
            return Err(ApiError::bad_request(
                "bad_body",
                format!(
                    "field `backoff`: first_ms and max_ms at least {min_ms} (`[jobs] \
                     min-backoff`)"
                ),
            ));
        }
        if backoff.first_ms > backoff.max_ms {
            return Err(ApiError::unprocessable(
                "bad_backoff",
                "field `backoff`: first_ms ≤ max_ms",
            ));
        }
    }
    Ok(())
}

/// `[jobs] min-backoff` in milliseconds (at least 1).
fn min_backoff_ms(limits: super::JobLimits) -> u64 {
    u64::try_from(limits.min_backoff.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// The longest attempt timeout a job may ask for (`timeout_ms`): a week.
pub const MAX_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;

/// The caller's tenant: `X-Tenant-Id` (written from the token when auth is on). A caller
/// with a tenant sees and changes only its own tenant's jobs.
fn tenant_of(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    Ok(shoal_notifications::Tenant::of_caller(headers)?.map(|t| t.to_string()))
}

/// The job as `headers`' caller may see it: a job that does not exist, or belongs to
/// another tenant than the caller's, is a 404 alike (a tenant learns nothing of others').
async fn visible(
    client: &ShoalClient,
    registry: &JobRegistry,
    headers: &HeaderMap,
    id: &str,
) -> Result<JobView, ApiError> {
    let caller = tenant_of(headers)?;
    let mut view = read(client, id).await?;
    if view.status == JobStatus::New {
        view = stored_enqueue(client, registry, id).await?;
    }
    shown_to(view, caller.as_deref()).ok_or_else(|| not_found(id))
}

/// `view` if a caller of tenant `caller` may see it: not a job that was never enqueued,
/// and with a tenant, only that tenant's jobs (`None`: the 404 of no job).
fn shown_to(view: JobView, caller: Option<&str>) -> Option<JobView> {
    let hidden = view.status == JobStatus::New
        || caller.is_some_and(|caller| view.tenant.as_deref() != Some(caller));
    (!hidden).then_some(view)
}

fn job_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(id) = path?;
    id.parse::<JobId>()
        .map(|id| id.to_string())
        .map_err(|e| ApiError::bad_path_id("id", e))
}

fn not_found(id: &str) -> ApiError {
    ApiError::unknown("unknown_job", "job", id)
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
    Extension(registry): Extension<Arc<JobRegistry>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<JobView>, ApiError> {
    let id = job_id(path)?;
    Ok(Json(
        visible(gateway.client(), &registry, &headers, &id).await?,
    ))
}

/// A job its record calls new: a stored `enqueue` its job has not run yet (`POST /jobs`
/// answers once it is stored) is the queued or scheduled job it will be; without one, the
/// record read again (the `enqueue` may have run between the two reads).
async fn stored_enqueue(
    client: &ShoalClient,
    registry: &JobRegistry,
    id: &str,
) -> Result<JobView, ApiError> {
    let address = super::entity::address(id).map_err(|e| ApiError::bad_path_id("id", e))?;
    let stored = client
        .pending_with_key(&address, super::entity::ENQUEUE_KEY)
        .await?;
    match stored.and_then(|message| pending_view(registry, id, message)) {
        Some(view) => Ok(view),
        None => read(client, id).await,
    }
}

/// The job a stored `enqueue` not run yet will be: `None` for a message that is not a
/// `NewJob` of a type `registry` has (what holds the key is then not an enqueue).
fn pending_view(
    registry: &JobRegistry,
    id: &str,
    message: shoal::message_storage::StoredMessage,
) -> Option<JobView> {
    let new = serde_json::from_value::<NewJob>(message.payload).ok()?;
    super::entity::recorded(registry, id, new, Some(message.id), chrono::Utc::now())
}

/// How long `GET /jobs/{id}` waits for the job's own reply before looking for a running
/// attempt again (a `get` queued behind an attempt that just started waits for all of it).
const READ_WAIT: Duration = Duration::from_millis(500);
/// Rounds of (live view, stored record) before giving up.
const READ_ROUNDS: usize = 20;

/// The live view of a running attempt, else the stored record.
async fn read(client: &ShoalClient, id: &str) -> Result<JobView, ApiError> {
    let control = client.entity::<JobControl>(id);
    let job = client.entity::<Job>(id).with_timeout(READ_WAIT);
    let mut last = None;
    for _ in 0..READ_ROUNDS {
        if let Some(live) = control.ask(JobControlMessage::Status {}).await?.live {
            return Ok(live);
        }
        match job.ask(JobMessage::Get {}).await {
            Ok(view) => return Ok(view),
            Err(error @ ClientError::Timeout { .. }) => last = Some(error),
            Err(error) => return Err(error.into()),
        }
    }
    Err(last.map_or_else(|| ApiError::Internal("no read".to_owned()), ApiError::from))
}

/// Runs a dead or cancelled job again with a fresh attempt budget.
#[utoipa::path(
    post,
    path = "/jobs/{id}/retry",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 202, description = "Queued again", body = JobView),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 422, description = "The job is not dead or cancelled", body = ErrorBody),
        (status = 503, description = "The owner or storage is unavailable", body = ErrorBody),
    ),
    tag = "jobs"
)]
async fn retry(
    State(gateway): State<GatewayContext>,
    Extension(registry): Extension<Arc<JobRegistry>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let id = job_id(path)?;
    let client = gateway.client();
    visible(client, &registry, &headers, &id).await?;
    let view = client
        .entity::<Job>(id.as_str())
        .ask(JobMessage::Retry {})
        .await?;
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
        (status = 404, description = "No such job (of the caller's tenant)", body = ErrorBody),
        (status = 422, description = "`not_cancellable`: the job already succeeded, died or was cancelled; nothing changed", body = ErrorBody),
        (status = 503, description = "The owner or storage is unavailable", body = ErrorBody),
    ),
    tag = "jobs"
)]
async fn cancel(
    State(gateway): State<GatewayContext>,
    Extension(registry): Extension<Arc<JobRegistry>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<(StatusCode, Json<CancelRequested>), ApiError> {
    let id = job_id(path)?;
    // Only the caller's own job, and one that is not over: a cancel that would change
    // nothing says so (a job that finishes between this read and the cancel stays as it
    // finished; `GET /jobs/{id}` tells).
    let view = visible(gateway.client(), &registry, &headers, &id).await?;
    if view.status.is_finished() {
        return Err(ApiError::unprocessable(
            "not_cancellable",
            format!(
                "job {id} is already {}; cancel changes nothing",
                serde_json::to_value(view.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            ),
        ));
    }
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

const STATES: [&str; 6] = [
    "scheduled",
    "queued",
    "retrying",
    "succeeded",
    "dead",
    "cancelled",
];

/// Lists jobs, newest first, by state and type, one page at a time.
#[utoipa::path(
    get,
    path = "/jobs",
    params(ListQuery),
    responses(
        (status = 200, description = "One page", body = JobPage),
        (status = 400, description = "A bad state, type, limit or cursor", body = ErrorBody),
        (status = 503, description = "The database is unavailable", body = ErrorBody),
    ),
    tag = "jobs"
)]
async fn list(
    Extension(store): Extension<Option<JobStore>>,
    Extension(registry): Extension<Arc<JobRegistry>>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<JobPage>, ApiError> {
    let Query(query) = query?;
    check_list(&query, &registry)?;
    let tenant = tenant_of(&headers)?;
    let unavailable = |message: String| ApiError::Unavailable {
        code: "database_unavailable",
        message,
        retry: shoal::retry::RetryClass::Safe,
    };
    let store = store.ok_or_else(|| unavailable("this gateway lists no jobs".to_owned()))?;
    let page = listing::list(&store.pool, &store.cluster, tenant.as_deref(), &query)
        .await
        .map_err(|e| unavailable(format!("listing jobs: {e}")))?;
    Ok(Json(page))
}

fn check_list(query: &ListQuery, registry: &JobRegistry) -> Result<(), ApiError> {
    if let Some(job_type) = &query.job_type
        && registry.get(job_type).is_none()
    {
        return Err(ApiError::bad_request(
            "bad_query",
            format!(
                "query `type`: no job type `{job_type}` (known: {})",
                registry.types().join(", ")
            ),
        ));
    }
    if let Some(state) = &query.state
        && !STATES.contains(&state.as_str())
    {
        return Err(ApiError::bad_request(
            "bad_query",
            format!(
                "query `state`: `{state}` is not one of {}",
                STATES.join(", ")
            ),
        ));
    }
    if let Some(limit) = query.limit
        && !(1..=MAX_LIMIT).contains(&limit)
    {
        return Err(ApiError::bad_request(
            "bad_query",
            format!("query `limit`: 1–{MAX_LIMIT}, got {limit}"),
        ));
    }
    if let Some(cursor) = &query.cursor {
        cursor
            .parse::<JobId>()
            .map_err(|e| ApiError::bad_request("bad_query", format!("query `cursor`: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use shoal::gateway::IdempotencyKey;
    use utoipa::PartialSchema;

    use super::NewJob;

    /// A stored `enqueue` of tenant `acme`'s job, not run yet.
    fn stored_enqueue(payload: serde_json::Value) -> shoal::message_storage::StoredMessage {
        let address = super::super::entity::address("0193e3a4-5b6c-7d8e-9f00-112233445566")
            .expect("a job address");
        shoal::message_storage::StoredMessage {
            id: shoal::snowflake::first_id_at(chrono::Utc::now()),
            shard: shoal::ids::ShardId::new(1),
            address,
            tag: "enqueue".to_owned(),
            payload,
            idempotency_key: Some(super::super::entity::ENQUEUE_KEY.to_owned()),
            deliver_at: None,
            attempts: 0,
        }
    }

    #[test]
    fn a_stored_enqueue_is_shown_only_to_its_tenant() {
        let mut registry = super::JobRegistry::new();
        registry
            .register(crate::diagnostic::Noop)
            .expect("registers");
        let id = "0193e3a4-5b6c-7d8e-9f00-112233445566";
        let new = serde_json::json!({"type": "diag.noop", "payload": {}, "tenant": "acme"});
        let view = super::pending_view(&registry, id, stored_enqueue(new)).expect("a job");
        assert_eq!(view.status, super::JobStatus::Queued);
        assert_eq!(view.tenant.as_deref(), Some("acme"));
        // Another tenant's token gets the 404 of no job; the owner and an untenanted
        // (operator) caller see it queued.
        assert_eq!(super::shown_to(view.clone(), Some("globex")), None);
        assert_eq!(
            super::shown_to(view.clone(), Some("acme")),
            Some(view.clone())
        );
        assert_eq!(super::shown_to(view.clone(), None), Some(view));

        // A job without a tenant is no tenant's.
        let untenanted = serde_json::json!({"type": "diag.noop", "payload": {}});
        let view = super::pending_view(&registry, id, stored_enqueue(untenanted)).expect("a job");
        assert_eq!(super::shown_to(view, Some("acme")), None);

        // What holds the key but is no enqueue of a known type shows nothing of itself.
        for payload in [
            serde_json::json!({}),
            serde_json::json!({"type": "diag.unknown", "payload": {}, "tenant": "globex"}),
            serde_json::json!("x".repeat(1 << 16)),
        ] {
            assert_eq!(
                super::pending_view(&registry, id, stored_enqueue(payload)),
                None
            );
        }
    }

    #[test]
    fn the_documented_key_is_the_key_rule() {
        let schema = serde_json::to_value(NewJob::schema()).expect("a schema");
        let key = &schema["properties"]["key"];
        assert_eq!(key["minLength"], 1, "{key}");
        assert_eq!(key["maxLength"], IdempotencyKey::MAX_CHARS, "{key}");
        assert_eq!(key["pattern"], IdempotencyKey::PATTERN, "{key}");
        let priority = &schema["properties"]["priority"];
        assert_eq!(
            priority["maximum"],
            super::super::entity::LOWEST_PRIORITY,
            "{priority}"
        );
    }

    #[test]
    fn the_declared_job_id_is_what_the_parser_takes() {
        let declared = jsonschema::validator_for(
            &serde_json::json!({"type": "string", "pattern": super::JobId::PATTERN}),
        )
        .expect("the pattern compiles");
        let id = uuid::Uuid::now_v7();
        for text in [
            id.hyphenated().to_string(),
            id.hyphenated().to_string().to_uppercase(),
            id.simple().to_string(),
            id.braced().to_string(),
            id.urn().to_string(),
            "0".to_owned(),
            String::new(),
            format!("{id}\n"),
        ] {
            assert_eq!(
                declared.is_valid(&serde_json::json!(text)),
                text.parse::<super::JobId>().is_ok(),
                "`{text}`"
            );
        }
    }
}
