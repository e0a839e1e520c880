//! The notification routes (an application router on the gateway):
//!
//! - `POST /tenants/{tenant}/events {topic, data}` → 201 `{seq}`: a persisted `publish`
//!   to the tenant's entity; `Idempotency-Key` names the event (a resend answers the same
//!   seq and publishes nothing).
//! - `GET /tenants/{tenant}/events?topics=a,b&last_event_id=N` → `text/event-stream`
//!   ([`super::stream`]); `Last-Event-ID` (header, else the query) resumes.
//!
//! With gateway auth on, the tenant of the path must be the token's (403 otherwise).

use std::collections::HashSet;

use axum::Extension;
use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::response::sse::{KeepAlive, Sse};
use serde::{Deserialize, Serialize};
use shoal::gateway::openapi::declare_parameter;
use shoal::gateway::{
    ApiError, AppRouter, ErrorBody, GatewayContext, IdempotencyKey, JsonBody, Principal,
};
use shoal::retry::RetryClass;
use utoipa::IntoParams;
use utoipa::openapi::path::ParameterIn;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::entity::{NewEvent, Notification, NotificationMessage, Published};
use super::history::History;
use super::hub::HubHandle;
use super::stream::{self, Request};
use super::{NotificationsConfig, Tenant, Topic};

/// Most topics one subscription may name.
pub const MAX_TOPICS: usize = 32;

/// The space of the keys callers give `POST /tenants/{t}/events` (see
/// [`IdempotencyKey::in_space`]).
const KEY_SPACE: &str = "events";

/// What the subscribe route needs on this gateway.
#[derive(Debug, Clone)]
pub struct Subscriptions {
    /// The history (catch-up reads).
    pub history: History,
    /// This gateway's hub.
    pub hub: HubHandle,
    /// `[notifications]`.
    pub config: NotificationsConfig,
}

/// The notification routes; without `subscriptions`, `GET` answers 503.
pub fn routes(subscriptions: Option<Subscriptions>) -> AppRouter {
    let mut router = OpenApiRouter::new().routes(routes!(publish, subscribe));
    let api = router.get_openapi_mut();
    let event_id = serde_json::json!({"type": "string", "pattern": EVENT_ID_PATTERN});
    declare_parameter(api, ParameterIn::Path, "tenant", Tenant::schema());
    declare_parameter(api, ParameterIn::Header, "Last-Event-ID", event_id.clone());
    declare_parameter(api, ParameterIn::Query, "last_event_id", event_id);
    declare_parameter(api, ParameterIn::Query, "topics", topics_schema());
    let data = shoal::gateway::openapi::storable_json(api);
    shoal::gateway::openapi::declare_property(api, "NewEvent", "data", data);
    router.layer(Extension(subscriptions))
}

fn tenant_of(
    path: Result<Path<String>, PathRejection>,
    principal: Option<&Principal>,
) -> Result<Tenant, ApiError> {
    let Path(tenant) = path?;
    let tenant: Tenant = tenant.parse().map_err(|e: super::BadName| {
        ApiError::bad_request("bad_tenant", format!("path `tenant`: {e}"))
    })?;
    if let Some(principal) = principal
        && principal.tenant != tenant.as_str()
    {
        return Err(ApiError::Forbidden {
            code: "wrong_tenant",
            message: format!("the token's tenant may not use tenant `{tenant}`"),
        });
    }
    Ok(tenant)
}

/// Publishes an event on a tenant's stream.
#[utoipa::path(
    post,
    path = "/tenants/{tenant}/events",
    request_body = NewEvent,
    params(
        ("tenant" = String, Path, description = "The tenant"),
        ("Idempotency-Key" = Option<String>, Header, description = "Names the event: a resend answers the same seq"),
    ),
    responses(
        (status = 201, description = "Published", body = Published),
        (status = 400, description = "A bad tenant, topic or body", body = ErrorBody),
        (status = 401, description = "Auth is on and the token is missing or invalid", body = ErrorBody),
        (status = 403, description = "The token is for another tenant", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "The tenant's entity refused the event (e.g. a resend under a key whose first send it refused)", body = ErrorBody),
        (status = 429, description = "The caller's rate limit, or the tenant's entity is full; see `Retry-After`", body = ErrorBody),
        (status = 503, description = "The owner or storage is unavailable", body = ErrorBody),
        (status = 504, description = "No reply in time (the event is stored and will be published)", body = ErrorBody),
    ),
    tag = "notifications"
)]
async fn publish(
    State(gateway): State<GatewayContext>,
    principal: Option<Extension<Principal>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    JsonBody(new): JsonBody<NewEvent>,
) -> Result<(StatusCode, Json<Published>), ApiError> {
    let tenant = tenant_of(path, principal.as_deref())?;
    new.topic
        .parse::<Topic>()
        .map_err(|e| ApiError::bad_request("bad_topic", format!("field `topic`: {e}")))?;
    let key = IdempotencyKey::from_headers(&headers)?.map(|key| key.in_space(KEY_SPACE));
    let mut entity = gateway.client().entity::<Notification>(tenant.as_str());
    let keyed = key.is_some();
    if let Some(key) = key {
        entity = entity.with_key(key);
    }
    let published = entity
        .ask(NotificationMessage::Publish(new))
        .await
        .map_err(|e| {
            let error = ApiError::from(e);
            if keyed { error } else { error.without_key() }
        })?;
    Ok((StatusCode::CREATED, Json(published)))
}

/// An event id as `Last-Event-ID` carries it (on every stream of the cluster): 1 to 18
/// decimal digits ([`EVENT_ID_PATTERN`]), so it fits an `i64` as well.
pub fn parse_event_id(text: &str) -> Option<u64> {
    let digits = !text.is_empty() && text.len() <= 18 && text.bytes().all(|b| b.is_ascii_digit());
    digits.then(|| text.parse().ok()).flatten()
}

/// [`parse_event_id`]'s grammar.
pub const EVENT_ID_PATTERN: &str = "^[0-9]{1,18}$";

/// `?topics=`'s grammar: 1 to [`MAX_TOPICS`] topics, comma-separated (none of them `reset`).
fn topics_schema() -> serde_json::Value {
    let topic = Topic::PATTERN.trim_start_matches('^').trim_end_matches('$');
    serde_json::json!({
        "type": "string",
        "pattern": format!("^{topic}(,{topic}){{0,{}}}$", MAX_TOPICS - 1),
        "not": {"pattern": format!("(^|,){}(,|$)", super::stream::RESET)},
    })
}

/// The query of a subscription.
#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SubscribeQuery {
    /// Only these topics, comma-separated (default: all).
    pub topics: Option<String>,
    /// Resume after this id, for clients that cannot set `Last-Event-ID` (the header
    /// wins).
    pub last_event_id: Option<String>,
}

fn parse_request(
    tenant: Tenant,
    query: SubscribeQuery,
    headers: &HeaderMap,
    config: &NotificationsConfig,
) -> Result<Request, ApiError> {
    let asked = query.topics.iter().flat_map(|t| t.split(','));
    if asked.clone().count() > MAX_TOPICS {
        return Err(ApiError::bad_request(
            "bad_query",
            format!("query `topics`: at most {MAX_TOPICS}"),
        ));
    }
    let mut topics = HashSet::new();
    for topic in asked {
        let topic: Topic = topic
            .parse()
            .map_err(|e| ApiError::bad_request("bad_query", format!("query `topics`: {e}")))?;
        topics.insert(topic.to_string());
    }
    let header = headers
        .get("last-event-id")
        .map(|v| v.to_str().map(str::to_owned))
        .transpose()
        .map_err(|_| {
            ApiError::bad_request("bad_last_event_id", "header `Last-Event-ID` is not text")
        })?;
    // Both are checked when both are given; the header wins.
    let parsed = [header, query.last_event_id].map(|id| {
        id.map(|id| {
            parse_event_id(&id).ok_or_else(|| {
                ApiError::bad_request(
                    "bad_last_event_id",
                    format!(
                        "`Last-Event-ID`: `{}` is not an event id (1 to 18 decimal digits)",
                        id.chars().take(40).collect::<String>()
                    ),
                )
            })
        })
        .transpose()
    });
    let [header, query_id] = parsed;
    let last_event_id = header?.or(query_id?);
    Ok(Request {
        tenant,
        topics,
        last_event_id,
        retry: config.retry,
    })
}

/// Subscribes to a tenant's stream (Server-Sent Events).
#[utoipa::path(
    get,
    path = "/tenants/{tenant}/events",
    params(
        ("tenant" = String, Path, description = "The tenant"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this id"),
        SubscribeQuery,
    ),
    responses(
        (status = 200, description = "The stream: `id: <seq>`, `event: <topic>`, `data: <json>` per event; `event: reset` when it cannot resume where asked; a comment heartbeat; `retry:`", content_type = "text/event-stream", body = String),
        (status = 400, description = "A bad tenant, topic or Last-Event-ID", body = ErrorBody),
        (status = 401, description = "Auth is on and the token is missing or invalid", body = ErrorBody),
        (status = 403, description = "The token is for another tenant", body = ErrorBody),
        (status = 429, description = "The tenant holds its maximum of streams on this gateway (`max-subscribers-per-tenant`; `Retry-After`)", body = ErrorBody),
        (status = 503, description = "This gateway holds its maximum of subscribers, or the history is unavailable", body = ErrorBody),
    ),
    tag = "notifications"
)]
async fn subscribe(
    Extension(subscriptions): Extension<Option<Subscriptions>>,
    principal: Option<Extension<Principal>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<SubscribeQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    let tenant = tenant_of(path, principal.as_deref())?;
    let Query(query) = query?;
    let unavailable = |code, message: String| ApiError::Unavailable {
        code,
        message,
        retry: RetryClass::Safe,
    };
    let subscriptions = subscriptions.ok_or_else(|| {
        unavailable(
            "no_subscriptions",
            "this gateway serves no streams".to_owned(),
        )
    })?;
    let request = parse_request(tenant, query, &headers, &subscriptions.config)?;
    let slot = subscriptions.hub.admit(&request.tenant)?;
    let bounds = subscriptions
        .history
        .bounds(&request.tenant)
        .await
        .map_err(|e| unavailable("history_unavailable", format!("reading the history: {e}")))?;
    let joined = subscriptions
        .hub
        .subscribe(request.tenant.clone(), bounds.newest)
        .await
        .map_err(|e| unavailable("shutting_down", e.to_string()))?;
    let heartbeat = subscriptions.config.heartbeat;
    let events = stream::events(request, subscriptions.history, bounds, joined, slot);
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(heartbeat).text("heartbeat")))
}

#[cfg(test)]
mod contract_tests {
    use serde_json::{Value, json};

    use super::*;

    fn declared(schema: &Value) -> impl Fn(&str) -> bool + use<> {
        let validator = jsonschema::validator_for(schema).expect("the schema compiles");
        move |text| validator.is_valid(&json!(text))
    }

    /// Each declared schema takes exactly what its parser takes.
    #[test]
    fn the_declared_names_and_ids_are_what_the_parsers_take() {
        let long = "a".repeat(65);
        let samples = [
            "",
            "a",
            "acme",
            "a.b-c_d",
            "a:b",
            "reset",
            "resets",
            "a,b",
            "a b",
            "é",
            "0",
            "007",
            "+5",
            " 5",
            "5 ",
            "-1",
            "18446744073709551615",
            "1234567890123456789",
            "a,reset",
            ",a",
            "a,,b",
            &long,
        ];
        let tenant = declared(&Tenant::schema());
        let topic = declared(&Topic::schema());
        let event_id = declared(&json!({"type": "string", "pattern": EVENT_ID_PATTERN}));
        let topics = declared(&topics_schema());
        for text in samples {
            assert_eq!(
                tenant(text),
                text.parse::<Tenant>().is_ok(),
                "tenant `{text}`"
            );
            assert_eq!(topic(text), text.parse::<Topic>().is_ok(), "topic `{text}`");
            assert_eq!(
                event_id(text),
                parse_event_id(text).is_some(),
                "id `{text}`"
            );
            let parsed = text.split(',').all(|t| t.parse::<Topic>().is_ok())
                && text.split(',').count() <= MAX_TOPICS;
            assert_eq!(topics(text), parsed, "topics `{text}`");
        }
        let most = vec!["t"; MAX_TOPICS].join(",");
        assert!(topics(&most) && !topics(&format!("{most},t")));
    }
}
