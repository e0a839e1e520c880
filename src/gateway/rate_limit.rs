//! The gateway's use of Redis: API rate limits (an axum middleware) and the readiness
//! report of the providers' circuit breakers.
//!
//! Rate limits: each request of a limited route group (`entities`, `cluster`, and
//! `applications` for the application's routes) is decided by a sliding window keyed
//! by route group, tenant (`X-Tenant-Id`, else `anonymous`) and client IP, shared by every
//! gateway through Redis. Admitted responses carry `X-RateLimit-Limit`,
//! `X-RateLimit-Remaining` and `X-RateLimit-Reset` (seconds until a slot frees); refused
//! ones are 429 with the same headers and `Retry-After`. While Redis is down the request is
//! refused with 503 `redis_unavailable`, unless `redis.api-limits.when-unavailable` is
//! `allow` (then it passes unlimited, logged and counted). The client IP is the socket's
//! peer: a balancer in front must be accounted for by the tenant header.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};
use crate::config::{RedisDownPolicy, ShoalConfig};
use crate::redis::breaker::{BreakerState, CircuitBreaker};
use crate::redis::limits::{Decision, SlidingWindow};
use crate::redis::{RedisClient, RedisError};
use crate::retry::RetryClass;

const TENANT: HeaderName = HeaderName::from_static("x-tenant-id");
const LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// The gateway's Redis services.
#[derive(Debug, Clone)]
pub(crate) struct GatewayRedis {
    pub(crate) client: RedisClient,
    api: Option<ApiLimits>,
    breakers: Vec<CircuitBreaker>,
}

/// One sliding window per limited route group.
#[derive(Debug, Clone)]
struct ApiLimits {
    entities: SlidingWindow,
    cluster: SlidingWindow,
    applications: SlidingWindow,
    when_unavailable: RedisDownPolicy,
}

impl GatewayRedis {
    /// The services `config` asks for, or `None` when `redis.url` is unset. Connects
    /// lazily: a gateway starts while Redis is down and answers 503 until it is back.
    pub(crate) fn connect(config: &ShoalConfig) -> Result<Option<Self>, RedisError> {
        if config.redis.url.is_none() {
            return Ok(None);
        }
        let client = RedisClient::connect(&config.redis, &config.cluster.name)?;
        let limits = &config.redis.api_limits;
        let api = limits.enabled.then(|| ApiLimits {
            entities: SlidingWindow::new(
                client.clone(),
                "api:entities",
                limits.entities.requests,
                limits.entities.window,
            ),
            cluster: SlidingWindow::new(
                client.clone(),
                "api:cluster",
                limits.cluster.requests,
                limits.cluster.window,
            ),
            applications: SlidingWindow::new(
                client.clone(),
                "api:applications",
                limits.applications.requests,
                limits.applications.window,
            ),
            when_unavailable: limits.when_unavailable,
        });
        let breakers = config
            .redis
            .providers
            .keys()
            .map(|name| CircuitBreaker::new(client.clone(), name, &config.redis.breaker))
            .collect();
        Ok(Some(Self {
            client,
            api,
            breakers,
        }))
    }

    /// The breakers' states for `/ready`: every state by name, and `status` `degraded`
    /// while one is open (readiness itself is not affected: the gateway still serves).
    pub(crate) async fn breaker_report(&self) -> Result<serde_json::Value, String> {
        let mut states = serde_json::Map::new();
        let mut open = Vec::new();
        for breaker in &self.breakers {
            let state = breaker.state().await.map_err(|e| e.to_string())?;
            if matches!(state, BreakerState::Open { .. }) {
                open.push(breaker.name().to_owned());
            }
            states.insert(breaker.name().to_owned(), state.name().into());
        }
        let status = if open.is_empty() { "ok" } else { "degraded" };
        Ok(serde_json::json!({"status": status, "open": open, "breakers": states}))
    }
}

impl ApiLimits {
    /// The limiter of the route group `path` belongs to; `None` for unlimited routes
    /// (health, readiness, metrics, the OpenAPI document, unknown paths). A path that
    /// `matched` a route and is not the gateway's own is an application route.
    fn group(&self, path: &str, matched: bool) -> Option<(&'static str, &SlidingWindow)> {
        if path.starts_with("/entities/") {
            Some(("entities", &self.entities))
        } else if path == "/cluster" || path == "/cron" {
            Some(("cluster", &self.cluster))
        } else if matched && !super::app::is_reserved(path) {
            Some(("applications", &self.applications))
        } else {
            None
        }
    }
}

/// Whether `t` is a tenant name: 1 to 64 letters, digits, `-`, `_` or `.`.
pub(crate) fn valid_tenant(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The tenant a request is counted against.
fn tenant(headers: &HeaderMap) -> Result<&str, ApiError> {
    let Some(value) = headers.get(&TENANT) else {
        return Ok("anonymous");
    };
    value
        .to_str()
        .ok()
        .filter(|t| valid_tenant(t))
        .ok_or_else(|| {
            ApiError::bad_request(
                "bad_tenant",
                "X-Tenant-Id must be 1 to 64 letters, digits, `-`, `_` or `.`",
            )
        })
}

/// The middleware: decides the request, then answers it or lets it through with the
/// rate-limit headers.
pub(crate) async fn enforce(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(api) = state.redis.as_ref().and_then(|r| r.api.as_ref()) else {
        return next.run(request).await;
    };
    let matched = request.extensions().get::<MatchedPath>().is_some();
    let Some((group, limiter)) = api.group(request.uri().path(), matched) else {
        return next.run(request).await;
    };
    let tenant = match tenant(request.headers()) {
        Ok(tenant) => tenant,
        Err(error) => return error.into_response(),
    };
    let ip = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "unknown".to_owned(), |c| c.0.ip().to_string());
    let key = format!("{tenant}:{ip}");
    match limiter.check(&key).await {
        Ok(decision) if decision.allowed => {
            crate::metrics::rate_limit_decision("api", "allowed");
            let mut response = next.run(request).await;
            set_headers(response.headers_mut(), &decision);
            response
        }
        Ok(decision) => {
            crate::metrics::rate_limit_decision("api", "limited");
            let retry_after =
                Duration::from_secs(decision.retry_after.as_millis().div_ceil(1000) as u64);
            let mut response = ApiError::TooManyRequests {
                code: "rate_limited",
                message: format!(
                    "more than {} requests to `{group}` routes for tenant `{tenant}` from {ip}; retry after {}s",
                    decision.limit,
                    retry_after.as_secs().max(1)
                ),
                retry_after,
            }
            .into_response();
            set_headers(response.headers_mut(), &decision);
            response
        }
        Err(error) => match api.when_unavailable {
            RedisDownPolicy::Deny => ApiError::Unavailable {
                code: "redis_unavailable",
                message: format!("rate limits cannot be checked: {error}"),
                // Refused before the route ran.
                retry: RetryClass::Safe,
            }
            .into_response(),
            RedisDownPolicy::Allow => {
                crate::metrics::rate_limit_decision("api", "bypassed");
                tracing::warn!(%error, group, "redis unavailable; request admitted unlimited (when-unavailable = allow)");
                next.run(request).await
            }
        },
    }
}

fn set_headers(headers: &mut HeaderMap, decision: &Decision) {
    headers.insert(LIMIT, HeaderValue::from(decision.limit));
    headers.insert(REMAINING, HeaderValue::from(decision.remaining));
    headers.insert(RESET, HeaderValue::from(decision.reset_after_secs()));
}
