//! Gateway handlers. Each validates its input into typed ids first and answers every
//! problem with an [`ApiError`]; none can answer 500 for bad input.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, AppState, IdempotencyKey, Principal, RequestId};
use crate::client::Request;
use crate::entity::{AccessDenied, Caller, DecodeError, ErasedEntity};
use crate::ids::{EntityAddress, EntityId, EntityType, RunnerId};
use crate::message_storage::Reply;
use crate::message_storage::storable::nul_pointer;
use crate::retry::RetryClass;
use crate::runner_storage::RunnerStorage;
use crate::status::ClusterStatus;

/// Longest deadline a request may ask for.
const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// A message's reply.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SendResponse {
    /// The handler's reply (any JSON value; the typed operations say which).
    pub reply: serde_json::Value,
    /// `type/id` of the entity.
    pub entity: String,
    /// Whether the message was persisted before delivery.
    pub persisted: bool,
}

/// The error body every failure answers with.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// An error's fields.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable code, e.g. `mailbox_full`.
    pub code: String,
    /// What went wrong, naming the field where one is to blame.
    pub message: String,
    /// Whether sending the same request again may succeed (`retry` is not `never`).
    pub retryable: bool,
    /// What sending the same request again can do: `safe` (nothing ran, nothing stored),
    /// `safe_with_same_key` (the message is stored and runs: resend with the same
    /// `Idempotency-Key` and it is deduplicated), `may_run_twice` (a volatile message that
    /// may have run, or a stored one sent without a key), `never` (final: a resend gets the
    /// same answer).
    pub retry: RetryClass,
}

/// `?persisted=`: must agree with the message's type when given.
#[derive(Debug, Deserialize)]
pub struct SendQuery {
    persisted: Option<bool>,
}

fn path_error(rejection: PathRejection) -> ApiError {
    ApiError::bad_request("bad_path", rejection.body_text())
}

/// Who is calling, as the access rules see it.
fn caller(principal: Option<&Extension<Principal>>) -> Caller<'_> {
    match principal {
        None => Caller::Anonymous,
        Some(Extension(principal)) if principal.operator => Caller::Operator,
        Some(Extension(principal)) => Caller::Tenant(&principal.tenant),
    }
}

/// The entity a generic route names, if `caller` may reach it (and message `message`,
/// when one is sent): an internal type is answered as unknown, an internal message too,
/// an id outside the tenant's scope with 403.
fn parse_address(
    entity_type: String,
    entity_id: String,
    message: Option<&str>,
    caller: Caller<'_>,
    state: &AppState,
) -> Result<(EntityAddress, std::sync::Arc<dyn ErasedEntity>), ApiError> {
    let entity_type = EntityType::new(entity_type)
        .map_err(|e| ApiError::bad_request("bad_entity_type", e.to_string()))?;
    let unknown = || ApiError::NotFound {
        code: "unknown_entity_type",
        message: format!("no entity type `{entity_type}`"),
    };
    let def = state
        .registry
        .get(&entity_type)
        .cloned()
        .ok_or_else(unknown)?;
    let entity_id = EntityId::new(entity_id)
        .map_err(|e| ApiError::bad_request("bad_entity_id", e.to_string()))?;
    let internal_message = message.is_some_and(|tag| def.is_internal_message(tag));
    match def
        .access()
        .check(caller, entity_id.as_str(), internal_message)
    {
        Ok(()) => {}
        Err(AccessDenied::InternalType) => return Err(unknown()),
        Err(AccessDenied::InternalMessage) => {
            return Err(ApiError::bad_request(
                "unknown_message",
                DecodeError::UnknownMessage {
                    entity_type: entity_type.clone(),
                    tag: message.unwrap_or_default().to_owned(),
                }
                .to_string(),
            ));
        }
        Err(AccessDenied::OutsideTenant { prefix }) => {
            return Err(ApiError::Forbidden {
                code: "outside_tenant",
                message: format!(
                    "this tenant's `{entity_type}` entities have ids `{}` or starting with \
                     `{prefix}`",
                    prefix.trim_end_matches(':')
                ),
            });
        }
    }
    Ok((
        EntityAddress {
            entity_type,
            entity_id,
        },
        def,
    ))
}

/// `X-Request-Timeout`'s grammar: a positive whole number of milliseconds, or of `ms`, `s`
/// or `m`. A longer deadline than [`MAX_REQUEST_TIMEOUT`] is that maximum.
pub(crate) const REQUEST_TIMEOUT_PATTERN: &str = "^[1-9][0-9]{0,11}(ms|s|m)?$";

/// `X-Request-Timeout` (see [`REQUEST_TIMEOUT_PATTERN`]).
fn request_timeout(headers: &HeaderMap, default: Duration) -> Result<Duration, ApiError> {
    let Some(value) = headers.get("x-request-timeout") else {
        return Ok(default);
    };
    let refused = || {
        let shown = String::from_utf8_lossy(value.as_bytes());
        ApiError::bad_request(
            "bad_timeout",
            format!(
                "X-Request-Timeout `{}`: a positive whole number of milliseconds, or of \
                 `ms`, `s` or `m` (e.g. `5s`)",
                shown.chars().take(40).collect::<String>()
            ),
        )
    };
    let text = value.to_str().map_err(|_| refused())?;
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    if number.is_empty() || number.starts_with('0') || number.len() > 12 {
        return Err(refused());
    }
    let number: u64 = number.parse().map_err(|_| refused())?;
    let timeout = match unit {
        "" | "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number.saturating_mul(60)),
        _ => return Err(refused()),
    };
    Ok(timeout.min(MAX_REQUEST_TIMEOUT))
}

/// Refuses a persisted message storage cannot hold (a NUL character: Postgres' `jsonb` and
/// `text` refuse it), naming where it is, before it can share a batch with other requests.
fn check_storable(payload: &serde_json::Value) -> Result<(), ApiError> {
    if let Some(pointer) = nul_pointer(payload) {
        return Err(ApiError::bad_request(
            "unstorable_body",
            format!(
                "the string at `{pointer}` in the body holds a NUL character (\\u0000), \
                 which a persisted message cannot hold"
            ),
        ));
    }
    Ok(())
}

/// Send a message to an entity and wait for its reply.
#[utoipa::path(
    post,
    path = "/entities/{entity_type}/{entity_id}/{message}",
    params(
        ("entity_type" = String, Path, description = "Entity type, e.g. `counter`"),
        ("entity_id" = String, Path, description = "Entity id"),
        ("message" = String, Path, description = "Message name, e.g. `increment`"),
        ("persisted" = Option<bool>, Query, description = "Must match the message's kind when given"),
        ("Idempotency-Key" = Option<String>, Header, description = "Deduplicates persisted sends to this entity"),
        ("X-Request-Timeout" = Option<String>, Header, description = "Deadline: milliseconds, or a number of `ms`, `s` or `m` like `5s`; at most 5 minutes (a longer one is 5 minutes)"),
    ),
    request_body(content = Object, description = "The message body (JSON object)", content_type = "application/json"),
    responses(
        (status = 200, description = "The entity's reply", body = SendResponse),
        (status = 400, description = "Bad input; the message names the field", body = ErrorBody),
        (status = 403, description = "The id is outside the caller's tenant (`outside_tenant`)", body = ErrorBody),
        (status = 404, description = "Unknown entity type", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "The handler answered with an error", body = ErrorBody),
        (status = 429, description = "Mailbox full; see Retry-After; `retry` is `safe`", body = ErrorBody),
        (status = 503, description = "Owner or storage unavailable; `retry` says whether it may have run", body = ErrorBody),
        (status = 504, description = "No reply before the deadline; `retry` is `safe_with_same_key` for a stored message sent with a key", body = ErrorBody),
    ),
    tag = "entities"
)]
pub(crate) async fn send_message(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    principal: Option<Extension<Principal>>,
    path: Result<Path<(String, String, String)>, PathRejection>,
    query: Result<Query<SendQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<SendResponse>, ApiError> {
    let Path((entity_type, entity_id, message)) = path.map_err(path_error)?;
    let Query(query) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let (address, def) = parse_address(
        entity_type,
        entity_id,
        Some(&message),
        caller(principal.as_ref()),
        &state,
    )?;
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(format!(
            "the body is larger than {} bytes",
            state.config.gateway.max_body_bytes
        )),
        _ => ApiError::bad_request("bad_body", e.body_text()),
    })?;
    let payload: serde_json::Value = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::json!({})
    } else {
        let mut payload = serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request("malformed_json", format!("the body is not valid JSON: {e}"))
        })?;
        super::app::integral_numbers(&mut payload);
        payload
    };
    if !payload.is_object() {
        return Err(ApiError::bad_request(
            "bad_body",
            "the body must be a JSON object",
        ));
    }
    let decoded = def.decode(&message, payload.clone()).map_err(|e| match e {
        DecodeError::UnknownMessage { .. } => {
            ApiError::bad_request("unknown_message", e.to_string())
        }
        other => ApiError::bad_request("bad_message", other.to_string()),
    })?;
    let persisted = def.is_persisted(&decoded);
    if let Some(wanted) = query.persisted
        && wanted != persisted
    {
        return Err(ApiError::bad_request(
            "persistence_mismatch",
            format!(
                "message `{message}` of `{}` is {}",
                address.entity_type,
                if persisted {
                    "always persisted"
                } else {
                    "volatile"
                }
            ),
        ));
    }
    // The caller's key as given (the routes that front an entity put theirs in a space of
    // their own); a key the message itself derives is the same whoever sends it.
    let key = IdempotencyKey::from_headers(&headers)?
        .map(IdempotencyKey::into_inner)
        .or_else(|| def.idempotency_key(&decoded));
    if key.is_some() && !persisted {
        return Err(ApiError::bad_request(
            "not_persisted",
            format!(
                "message `{message}` is volatile; Idempotency-Key applies to persisted messages"
            ),
        ));
    }
    if persisted {
        check_storable(&payload)?;
    }
    let timeout = request_timeout(&headers, state.config.gateway.request_timeout)?;
    let mut request = if persisted {
        Request::persisted(address.clone(), message, payload)
    } else {
        Request::volatile(address.clone(), message, payload)
    };
    request.idempotency_key = key;
    request.timeout = Some(timeout);
    request.request_id = Some(request_id.0);
    let keyed = request.idempotency_key.is_some();
    let answer = state.client.ask(request).await.map_err(|error| {
        let error = ApiError::from(error);
        // An HTTP caller has no way to name a stored message but its key.
        if keyed { error } else { error.without_key() }
    })?;
    match answer {
        Reply::Ok { value } => Ok(Json(SendResponse {
            reply: value,
            entity: address.to_string(),
            persisted,
        })),
        Reply::Err { code, message } => Err(ApiError::HandlerError { code, message }),
    }
}

/// Where an entity lives and how it is doing.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Explain {
    /// `type/id`.
    pub entity: String,
    /// Its shard.
    pub shard: u32,
    /// The runner whose session holds the shard's lock (none while unowned).
    #[schema(value_type = Option<i32>)]
    pub owner_runner_id: Option<RunnerId>,
    /// That runner's address.
    pub owner_address: Option<String>,
    /// The shard's epoch.
    pub epoch: Option<i64>,
    /// Whether an actor is live for it.
    pub resident: bool,
    /// Unfinished requests in its mailbox.
    pub mailbox_depth: usize,
    /// Unprocessed persisted messages.
    pub unprocessed: u64,
    /// Age of the oldest unprocessed persisted message, in milliseconds.
    pub oldest_unprocessed_age_ms: Option<i64>,
    /// The last handler error or panic.
    pub last_error: Option<String>,
}

/// Explain an entity: shard, owner, epoch, mailbox, backlog, last error.
#[utoipa::path(
    get,
    path = "/entities/{entity_type}/{entity_id}",
    params(
        ("entity_type" = String, Path, description = "Entity type"),
        ("entity_id" = String, Path, description = "Entity id"),
    ),
    responses(
        (status = 200, description = "What the cluster knows about the entity", body = Explain),
        (status = 400, description = "Bad input", body = ErrorBody),
        (status = 403, description = "The id is outside the caller's tenant (`outside_tenant`)", body = ErrorBody),
        (status = 404, description = "Unknown entity type", body = ErrorBody),
    ),
    tag = "entities"
)]
pub(crate) async fn explain(
    State(state): State<Arc<AppState>>,
    principal: Option<Extension<Principal>>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Explain>, ApiError> {
    let Path((entity_type, entity_id)) = path.map_err(path_error)?;
    let (address, _) = parse_address(
        entity_type,
        entity_id,
        None,
        caller(principal.as_ref()),
        &state,
    )?;
    let shard = state.config.sharding().shard_of(&address.entity_id);
    let snapshot = state
        .runners
        .snapshot()
        .await
        .map_err(storage_unavailable)?;
    let owner = snapshot.owners.get(&shard).copied();
    let owner_address = owner.and_then(|id| {
        snapshot
            .runners
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.address.clone())
    });
    let (unprocessed, oldest) =
        state
            .messages
            .entity_backlog(&address)
            .await
            .map_err(|e| ApiError::Unavailable {
                code: "storage_unavailable",
                message: e.to_string(),
                // A read: nothing runs.
                retry: RetryClass::Safe,
            })?;
    let status = state
        .client
        .entity_status(&address)
        .await
        .unwrap_or_default();
    Ok(Json(Explain {
        entity: address.to_string(),
        shard: shard.get(),
        owner_runner_id: owner,
        owner_address,
        epoch: snapshot.epochs.get(&shard).map(|e| e.get()),
        resident: status.resident,
        mailbox_depth: status.mailbox_depth,
        unprocessed,
        oldest_unprocessed_age_ms: oldest
            .map(|t: DateTime<Utc>| (Utc::now() - t).num_milliseconds()),
        last_error: status.last_error,
    }))
}

/// A read of runner storage failed (read-only routes: nothing runs, resending is safe).
fn storage_unavailable(error: crate::runner_storage::StorageError) -> ApiError {
    ApiError::Unavailable {
        code: "storage_unavailable",
        message: error.to_string(),
        retry: RetryClass::Safe,
    }
}

/// One shard's owner and epoch.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ShardLine {
    /// Owning runner (none while unowned).
    #[schema(value_type = Option<i32>)]
    pub owner: Option<RunnerId>,
    /// Current epoch.
    pub epoch: Option<i64>,
}

/// The cluster map.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ClusterMap {
    /// Summary: runners with liveness and shard counts.
    #[schema(value_type = Object)]
    pub status: serde_json::Value,
    /// Shard → owner and epoch.
    pub shards: BTreeMap<u32, ShardLine>,
    /// Shards nobody owns.
    pub unowned: Vec<u32>,
}

/// Runners, shard → owner map with epochs, unowned shards.
#[utoipa::path(
    get,
    path = "/cluster",
    responses(
        (status = 200, description = "The cluster map", body = ClusterMap),
        (status = 503, description = "Postgres unavailable", body = ErrorBody),
    ),
    tag = "cluster"
)]
pub(crate) async fn cluster(
    State(state): State<Arc<AppState>>,
) -> Result<Json<ClusterMap>, ApiError> {
    let snapshot = state
        .runners
        .snapshot()
        .await
        .map_err(storage_unavailable)?;
    let sharding = state.config.sharding();
    let status =
        ClusterStatus::from_snapshot(state.config.cluster.name.clone(), sharding, &snapshot);
    let mut shards = BTreeMap::new();
    let mut unowned = Vec::new();
    for shard in sharding.all() {
        let owner = snapshot.owners.get(&shard).copied();
        if owner.is_none() {
            unowned.push(shard.get());
        }
        shards.insert(
            shard.get(),
            ShardLine {
                owner,
                epoch: snapshot.epochs.get(&shard).map(|e| e.get()),
            },
        );
    }
    Ok(Json(ClusterMap {
        status: serde_json::to_value(status).map_err(|e| ApiError::Internal(e.to_string()))?,
        shards,
        unowned,
    }))
}

/// Cron schedules: last fired, next instant, policy, the runner driving them.
#[utoipa::path(
    get,
    path = "/cron",
    responses(
        (status = 200, description = "Every schedule", body = crate::cron::CronListing),
        (status = 503, description = "Postgres unavailable", body = ErrorBody),
    ),
    tag = "cluster"
)]
pub(crate) async fn cron(
    State(state): State<Arc<AppState>>,
) -> Result<Json<crate::cron::CronListing>, ApiError> {
    let schedules = crate::cron::schedules(&state.config.cron).map_err(ApiError::Internal)?;
    let snapshot = state
        .runners
        .snapshot()
        .await
        .map_err(storage_unavailable)?;
    let driver_shard = state.config.sharding().shard_of_key(crate::cron::DRIVER);
    let driver = snapshot.owners.get(&driver_shard).copied();
    let store = crate::cron::CronStore::new(state.pool.clone(), state.config.cluster.name.clone());
    let listing = crate::cron::list(&schedules, &store, driver)
        .await
        .map_err(|e| ApiError::Unavailable {
            code: "storage_unavailable",
            message: e.to_string(),
            // A read: nothing runs.
            retry: RetryClass::Safe,
        })?;
    Ok(Json(listing))
}

/// Liveness: the process is up.
#[utoipa::path(get, path = "/health", responses((status = 200, description = "Up", body = super::health::Health)), tag = "operations")]
pub(crate) async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// Readiness: Postgres, Redis (when configured), every shard owned, no stalled shard.
#[utoipa::path(
    get,
    path = "/ready",
    responses(
        (status = 200, description = "Ready; every check passed", body = super::health::Readiness),
        (status = 503, description = "Not ready; the failing checks are named", body = super::health::Readiness),
    ),
    tag = "operations"
)]
pub(crate) async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let mut checks = serde_json::Map::new();
    let mut ok = true;
    // `gates`: whether a failure makes this gateway unready. Only what taking the gateway
    // out of rotation or an operator's action fixes does; what one caller can cause (a
    // backlog behind a long or failing handler) is reported, never a red /ready on every
    // gateway at once.
    let mut check = |name: &str, gates: bool, result: Result<serde_json::Value, String>| {
        match result {
            Ok(detail) => checks.insert(
                name.to_owned(),
                serde_json::json!({"ok": true, "detail": detail}),
            ),
            Err(error) => {
                ok &= !gates;
                checks.insert(
                    name.to_owned(),
                    serde_json::json!({"ok": false, "affects_ready": gates, "error": error}),
                )
            }
        };
    };
    let postgres = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&state.pool),
    )
    .await;
    check(
        "postgres",
        true,
        match postgres {
            Ok(Ok(_)) => Ok(serde_json::json!("reachable")),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer within 2s".to_owned()),
        },
    );
    if let Some(redis) = &state.redis {
        let pong = redis.client.health().await;
        check(
            "redis",
            true,
            pong.map(|rtt| serde_json::json!(format!("reachable ({rtt:?})")))
                .map_err(|e| e.to_string()),
        );
        // An open breaker degrades the service but does not make the gateway unready.
        check("breakers", false, redis.breaker_report().await);
    }
    let sharding = state.config.sharding();
    match state.runners.snapshot().await {
        Ok(snapshot) => {
            let unowned = sharding.shard_count() as usize
                - snapshot.owners.len().min(sharding.shard_count() as usize);
            check(
                "shards_owned",
                true,
                if unowned == 0 {
                    Ok(serde_json::json!(format!(
                        "all {} shards owned",
                        sharding.shard_count()
                    )))
                } else {
                    Err(format!(
                        "{unowned} of {} shards unowned",
                        sharding.shard_count()
                    ))
                },
            );
            let bound = state.config.gateway.ready_max_backlog_age;
            let owned: Vec<_> = snapshot.owners.keys().copied().collect();
            let stalled = state
                .messages
                .shards_with_backlog(&owned, crate::snowflake::id_before(bound), Utc::now())
                .await;
            check(
                "backlog",
                false,
                match stalled {
                    Ok(stalled) if stalled.is_empty() => Ok(serde_json::json!(format!(
                        "no owned shard has a message older than {bound:?}"
                    ))),
                    Ok(stalled) => Err(format!(
                        "{} owned shard(s) have unprocessed messages older than {bound:?}: {:?}",
                        stalled.len(),
                        stalled.iter().take(10).map(|s| s.get()).collect::<Vec<_>>()
                    )),
                    Err(e) => Err(e.to_string()),
                },
            );
        }
        Err(error) => check("shards_owned", true, Err(error.to_string())),
    }
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({"ready": ok, "checks": checks})),
    )
        .into_response()
}

/// Prometheus metrics of this gateway process.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text", content_type = "text/plain")), tag = "operations")]
pub(crate) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match &state.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => ApiError::NotFound {
            code: "metrics_disabled",
            message: "metrics are not enabled in this process".to_owned(),
        }
        .into_response(),
    }
}

/// This API's OpenAPI document.
#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json", body = Object)), tag = "operations")]
pub(crate) async fn openapi_json(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.openapi.clone(),
    )
        .into_response()
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::NotFound {
        code: "no_route",
        message: "no such route; see /openapi.json".to_owned(),
    }
}

pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_declared_timeout_grammar_is_what_the_parser_takes() {
        let declared = jsonschema::validator_for(
            &serde_json::json!({"type": "string", "pattern": REQUEST_TIMEOUT_PATTERN}),
        )
        .expect("the pattern compiles");
        let default = Duration::from_secs(30);
        for text in [
            "1",
            "5s",
            "300000",
            "999999999999",
            "10m",
            "1ms",
            "0",
            "01",
            "0s",
            "5 s",
            "1h",
            "",
            "-5",
            "5S",
            "1000000000000",
            "1.5s",
            "5sec",
            "5ms ",
            "soon",
        ] {
            let mut headers = HeaderMap::new();
            headers.insert("x-request-timeout", text.parse().expect("a header value"));
            let parsed = request_timeout(&headers, default);
            assert_eq!(
                parsed.is_ok(),
                declared.is_valid(&serde_json::json!(text)),
                "`{text}`: {parsed:?}"
            );
        }
        let mut headers = HeaderMap::new();
        headers.insert("x-request-timeout", "90m".parse().expect("a header value"));
        assert_eq!(
            request_timeout(&headers, default).ok(),
            Some(MAX_REQUEST_TIMEOUT)
        );
    }
}
