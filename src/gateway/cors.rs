//! Cross-origin access for web apps on the origins `[gateway.cors]` lists: preflights
//! are answered (before auth and rate limits, which a preflight cannot satisfy), and every
//! answer to an allowed origin, errors included, carries `Access-Control-Allow-Origin` and
//! exposes the headers a client acts on. An origin not listed gets no grant, so the
//! browser keeps the answer from its page.

use std::sync::Arc;

use axum::http::{HeaderName, HeaderValue, Method, header};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::CorsConfig;

/// The request headers a route may take.
pub(crate) const ALLOWED_HEADERS: [HeaderName; 7] = [
    header::AUTHORIZATION,
    header::CONTENT_TYPE,
    HeaderName::from_static("idempotency-key"),
    HeaderName::from_static("last-event-id"),
    HeaderName::from_static("x-request-timeout"),
    HeaderName::from_static("x-tenant-id"),
    HeaderName::from_static("x-request-id"),
];

/// The response headers a cross-origin page may read.
pub(crate) const EXPOSED_HEADERS: [HeaderName; 4] = [
    header::RETRY_AFTER,
    header::LOCATION,
    header::WWW_AUTHENTICATE,
    HeaderName::from_static("x-request-id"),
];

/// The layer for `config`, or `None` when no origin is listed. `methods` are the methods
/// the routes take (from the route table and the OpenAPI document).
pub(crate) fn layer(config: &CorsConfig, methods: Vec<Method>) -> Option<CorsLayer> {
    if config.allowed_origins.is_empty() {
        return None;
    }
    let origins: Arc<[HeaderValue]> = config
        .allowed_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::predicate(move |origin, _| {
                origins.contains(origin)
            }))
            .allow_methods(methods)
            .allow_headers(ALLOWED_HEADERS)
            .expose_headers(EXPOSED_HEADERS)
            .max_age(config.max_age),
    )
}

/// The methods the operations of OpenAPI document `doc` use.
pub(crate) fn methods_in(doc: &serde_json::Value) -> Vec<Method> {
    let mut methods: Vec<Method> = doc["paths"]
        .as_object()
        .into_iter()
        .flat_map(|paths| paths.values())
        .filter_map(serde_json::Value::as_object)
        .flat_map(|operations| operations.keys())
        .filter_map(|m| Method::from_bytes(m.to_ascii_uppercase().as_bytes()).ok())
        .collect();
    methods.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    methods.dedup();
    methods
}
