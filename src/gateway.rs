//! The HTTP gateway: a stateless, client-only node (it hosts no entities) that validates
//! each request against the entity types it knows and routes it to the owning runner
//! through the client API.
//!
//! Every response carries an `X-Request-Id` (taken from the request or generated, uuid v7);
//! the id is in the request's span and travels to the runner in the envelope. Errors are
//! [`ApiError`]s. Shutdown stops accepting and gives in-flight requests
//! `gateway.shutdown-timeout` to finish.
//!
//! The application adds routes of its own ([`GatewayParams::with_routes`], [`AppRouter`]):
//! they are served behind the same middleware and listed in the same OpenAPI document.

mod app;
mod auth;
mod connections;
mod cors;
mod error;
mod health;
mod idempotency;
pub mod openapi;
mod rate_limit;
mod routes;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{MethodRouter, get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use app::{AppRouter, GatewayContext, JsonBody, object_only};
pub use auth::{OPERATOR_SCOPE, Principal};
pub use error::ApiError;
pub use idempotency::IdempotencyKey;
pub use routes::{ErrorBody, ErrorDetail};

use crate::client::{ClientConfig, ClientParts, ShoalClient};
use crate::config::ShoalConfig;
use crate::entity::EntityRegistry;
use crate::message_storage::MessageStorage;
use crate::message_storage::postgres::{BatchConfig, PgMessageStorage};
use crate::runner_storage::StorageError;
use crate::runner_storage::postgres::{LockSessionSettings, PgRunnerStorage, connect_pool_named};
use crate::transport::http::HttpTransport;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The database refused.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The listen address could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: String,
        /// Why.
        source: std::io::Error,
    },
    /// Redis or the transport client could not be set up.
    #[error("{0}")]
    Setup(String),
}

/// The `application_name` of a gateway's Postgres sessions.
pub const APPLICATION_NAME: &str = "shoal-gateway";

/// What the gateway is started with.
#[derive(Debug)]
pub struct GatewayParams {
    /// The validated configuration.
    pub config: ShoalConfig,
    /// The entity types requests are validated against (the runners' types).
    pub registry: EntityRegistry,
    /// The process's metrics exporter, served at `/metrics`.
    pub metrics: Option<PrometheusHandle>,
    /// The application's routes, served beside the gateway's own.
    pub routes: Vec<AppRouter>,
    /// The pool the gateway shares with its application ([`GatewayParams::with_pool`]);
    /// without one it opens `database.pool-max-connections` of its own.
    pub pool: Option<sqlx::PgPool>,
}

impl GatewayParams {
    /// A gateway for `config` that validates requests against `registry`, without metrics
    /// or application routes.
    pub fn new(config: ShoalConfig, registry: EntityRegistry) -> Self {
        Self {
            config,
            registry,
            metrics: None,
            routes: Vec::new(),
            pool: None,
        }
    }

    /// Uses `pool` (the one the application's routes hold) instead of a pool of its own,
    /// so the gateway's connection budget is one pool.
    pub fn with_pool(mut self, pool: sqlx::PgPool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Serves `metrics` at `/metrics`.
    pub fn with_metrics(mut self, metrics: PrometheusHandle) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Adds an application's routes (see [`AppRouter`]; paths the gateway keeps for itself
    /// are refused when the gateway starts).
    pub fn with_routes(mut self, routes: AppRouter) -> Self {
        self.routes.push(routes);
        self
    }
}

/// Shared by every request (behind an `Arc`: cloning the registry and the Redis services
/// for every request cost the gateway ~10 % of its CPU).
pub(crate) struct AppState {
    pub(crate) config: Arc<ShoalConfig>,
    pub(crate) registry: EntityRegistry,
    pub(crate) client: ShoalClient,
    pub(crate) runners: Arc<PgRunnerStorage>,
    pub(crate) messages: Arc<dyn MessageStorage>,
    pub(crate) pool: PgPool,
    pub(crate) redis: Option<rate_limit::GatewayRedis>,
    pub(crate) metrics: Option<PrometheusHandle>,
    /// `/openapi.json`: the gateway's operations, the registry's and the application's.
    pub(crate) openapi: axum::body::Bytes,
    /// `[gateway.auth]`'s verifier (`None`: auth is off).
    pub(crate) auth: auth::Gate,
    /// `[gateway.cors]`'s layer (`None`: no origin is listed).
    pub(crate) cors: Option<cors::Cors>,
}

/// The request id of the request being handled.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Runs the gateway until `shutdown`, then drains in-flight requests (bounded).
pub async fn run(params: GatewayParams, shutdown: CancellationToken) -> Result<(), GatewayError> {
    app::check(&params.routes)?;
    // What the document says of the application's routes is known before they are bound.
    let fragments: Vec<_> = params
        .routes
        .iter()
        .map(|r| r.get_openapi().clone())
        .collect();
    let openapi = openapi::render(&params.registry, fragments).map_err(GatewayError::Setup)?;
    let document: serde_json::Value =
        serde_json::from_slice(&openapi).map_err(|e| GatewayError::Setup(e.to_string()))?;
    let auth = auth::Verifier::new(&params.config.gateway.auth)
        .map_err(GatewayError::Setup)?
        .map(Arc::new);
    let auth = auth::Gate {
        verifier: auth,
        streams: auth::streams_in(&document).into(),
    };
    let cors = cors::Cors::new(&params.config.gateway.cors, &document);
    let config = Arc::new(params.config);
    let db = &config.database;
    let pool = match params.pool.clone() {
        Some(pool) => pool,
        None => {
            connect_pool_named(
                &db.url,
                db.pool_max_connections,
                db.connect_timeout,
                APPLICATION_NAME,
            )
            .await?
        }
    };
    let runners = Arc::new(PgRunnerStorage::new(
        pool.clone(),
        &db.url,
        config.cluster.name.clone(),
        LockSessionSettings::default(),
    )?);
    let messages: Arc<dyn MessageStorage> = Arc::new(PgMessageStorage::new(
        pool.clone(),
        config.cluster.name.clone(),
        BatchConfig::GROUP_COMMIT,
    ));
    let redis = rate_limit::GatewayRedis::connect(&config)
        .map_err(|e| GatewayError::Setup(e.to_string()))?;
    if let Some(redis) = &redis
        && let Err(error) = redis.client.health().await
    {
        tracing::warn!(%error, "redis is unreachable; limited routes answer 503 until it is back");
    }
    let transport =
        HttpTransport::new(config.cluster.secret.clone()).map_err(GatewayError::Setup)?;
    let client_shutdown = CancellationToken::new();
    let client = ShoalClient::start(
        ClientParts {
            sharding: config.sharding(),
            runners: runners.clone(),
            messages: messages.clone(),
            transport: Arc::new(transport),
            machine_id: crate::snowflake::random_machine_id(),
            config: ClientConfig {
                default_timeout: config.gateway.request_timeout,
                ..ClientConfig::default()
            },
        },
        client_shutdown.clone(),
    );
    let listener = TcpListener::bind(config.gateway.listen)
        .await
        .map_err(|source| GatewayError::Bind {
            address: config.gateway.listen.to_string(),
            source,
        })?;
    let app_routes = app::compose(params.routes, &GatewayContext::new(client.clone()));
    let state = AppState {
        config: config.clone(),
        registry: params.registry,
        client,
        runners,
        messages,
        pool: pool.clone(),
        redis,
        metrics: params.metrics,
        openapi,
        auth,
        cors,
    };
    let address = listener.local_addr().map_err(|source| GatewayError::Bind {
        address: config.gateway.listen.to_string(),
        source,
    })?;
    tracing::info!(listen = %address, cluster = %config.cluster.name, "gateway started");
    // Connection info: the API rate limits key on the client's IP.
    let app =
        router(state, app_routes).into_make_service_with_connect_info::<std::net::SocketAddr>();
    // `tap_io` (a no-op here) gives the listener axum's `ConnectInfo<SocketAddr>`.
    let listener = axum::serve::ListenerExt::tap_io(
        connections::GuardedListener::new(
            listener,
            connections::ConnectionLimits {
                total: config.gateway.max_connections,
                per_client: config.gateway.max_connections_per_client,
                header_read_timeout: config.gateway.header_read_timeout,
            },
        ),
        |_: &mut connections::GuardedStream| {},
    );
    let serve =
        axum::serve(listener, app).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let grace = config.gateway.shutdown_timeout;
    tokio::select! {
        result = serve => {
            if let Err(error) = result {
                tracing::error!(%error, "gateway server failed");
            }
        }
        _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "in-flight requests did not finish in time; closing");
        }
    }
    client_shutdown.cancel();
    pool.close().await;
    tracing::info!("gateway stopped");
    Ok(())
}

/// Every route of the gateway and the application's `app` routes, behind the gateway's
/// middleware (the OpenAPI document lists the same ones; tests keep them in step).
pub(crate) fn router(state: AppState, app: Router) -> Router {
    let max_body = state.config.gateway.max_body_bytes;
    // Shared, not cloned: axum hands every handler and middleware its own copy of the state.
    let auth = state.auth.clone();
    let cors = state.cors.clone();
    let state = Arc::new(state);
    let router = own_routes()
        .into_iter()
        .fold(Router::new(), |router, (_, path, route)| {
            router.route(path, route)
        })
        .with_state(state.clone())
        .merge(app)
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            rate_limit::enforce,
        ))
        .layer(middleware::from_fn_with_state(auth, auth::enforce))
        .layer(middleware::from_fn(request_context));
    // Outermost: a preflight is answered before auth and rate limits, and every answer to
    // an allowed origin (errors too) carries its grant.
    match cors {
        Some(cors) => router
            .layer(cors.layer)
            .layer(middleware::from_fn_with_state(cors.paths, cors::per_path)),
        None => router,
    }
}

/// The gateway's own routes as (method, path, handler): the router is built from this
/// list, and a test holds the OpenAPI document to it.
pub(crate) fn own_routes() -> Vec<(&'static str, &'static str, MethodRouter<Arc<AppState>>)> {
    vec![
        (
            "post",
            "/entities/{entity_type}/{entity_id}/{message}",
            post(routes::send_message),
        ),
        (
            "get",
            "/entities/{entity_type}/{entity_id}",
            get(routes::explain),
        ),
        ("get", "/cluster", get(routes::cluster)),
        ("get", "/cron", get(routes::cron)),
        ("get", "/health", get(routes::health)),
        ("get", "/ready", get(routes::ready)),
        ("get", "/metrics", get(routes::metrics)),
        ("get", "/openapi.json", get(routes::openapi_json)),
    ]
}

/// Assigns the request id, opens the request's span, records metrics.
async fn request_context(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    request.extensions_mut().insert(RequestId(id.clone()));
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let span = tracing::info_span!("request", request_id = %id, %method, route = %route);
    let started = Instant::now();
    let mut response = tracing::Instrument::instrument(next.run(request), span).await;
    crate::metrics::http_request(&route, response.status().as_u16(), started.elapsed());
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}
