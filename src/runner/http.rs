//! The runner's own HTTP endpoint: `/health`, `/metrics` and `/status` (what this runner
//! believes it owns). The runner transport's routes join these in the entity runtime.
//!
//! Only `/health` is open. `/status` and `/metrics` tell an outsider which entities and
//! webhook hosts the cluster serves, so they need the cluster secret like the transport:
//! `x-shoal-secret: <secret>`, or `Authorization: Bearer <secret>` (what a Prometheus
//! scrape job's `authorization` setting sends).

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::entity_runtime::EntityRuntime;
use serde::Serialize;

use crate::ownership::{OwnershipHandle, OwnershipView};
use crate::singleton::Singletons;

#[derive(Debug, Clone)]
pub(crate) struct RunnerHttp {
    pub(crate) ownership: OwnershipHandle,
    pub(crate) metrics: Option<PrometheusHandle>,
    pub(crate) runtime: EntityRuntime,
    pub(crate) secret: String,
    pub(crate) singletons: Singletons,
}

/// `GET /status`: what this runner believes it owns and runs.
#[derive(Debug, Serialize)]
struct RunnerStatus {
    #[serde(flatten)]
    ownership: OwnershipView,
    /// Singletons running here now.
    singletons: Vec<String>,
    /// Entities resident here now.
    entities_resident: usize,
    /// This process's id (drills use it to kill the runner).
    pid: u32,
}

pub(crate) async fn serve(listener: TcpListener, state: RunnerHttp, shutdown: CancellationToken) {
    let transport = crate::transport::http::router(state.runtime.clone(), state.secret.clone());
    let operator = Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            state.secret.clone(),
            require_secret,
        ));
    let app = Router::new()
        .route("/health", get(health))
        .merge(operator)
        .with_state(state)
        .merge(transport);
    if let Err(error) = axum::serve(crate::transport::http::without_nagle(listener), app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(%error, "runner HTTP server failed");
    }
}

/// Lets a request through only with the cluster secret.
async fn require_secret(
    State(secret): State<String>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let headers = request.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::as_bytes);
    let given = headers
        .get(crate::transport::http::SECRET_HEADER)
        .map(|v| v.as_bytes())
        .or(bearer);
    if given.is_some_and(|given| crate::transport::http::same_secret(given, secret.as_bytes())) {
        return next.run(request).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        Json(serde_json::json!({"error": {
            "code": "missing_secret",
            "message": "this route needs the cluster secret (x-shoal-secret or Authorization: Bearer)",
        }})),
    )
        .into_response()
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn status(State(state): State<RunnerHttp>) -> Json<RunnerStatus> {
    Json(RunnerStatus {
        ownership: state.ownership.view(),
        singletons: state.singletons.running_names(),
        entities_resident: state.runtime.resident(),
        pid: std::process::id(),
    })
}

async fn metrics(State(state): State<RunnerHttp>) -> Response {
    match &state.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled").into_response(),
    }
}
