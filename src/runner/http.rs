//! The runner's own HTTP endpoint: `/health`, `/metrics` and `/status` (what this runner
//! believes it owns). The runner transport's routes join these in the entity runtime.

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
    let app = Router::new()
        .route("/health", get(health))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(state)
        .merge(transport);
    if let Err(error) = axum::serve(crate::transport::http::without_nagle(listener), app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(%error, "runner HTTP server failed");
    }
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
