//! An application's router, defined here, served by an in-process gateway against a real
//! cluster (one runner process, real Postgres and Redis): its route gets the gateway's
//! request id, its rate limit (429 in the JSON error shape past
//! `redis.api-limits.applications`), the JSON error shape on bad input, an operation in
//! `/openapi.json`, and graceful shutdown; it reaches entities through the gateway's client.
//! A router that claims one of the gateway's own paths stops the gateway from starting.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use common::gateway::Http;
use common::{DEADLINE, TestCluster, free_port, wait_until};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use shoal::client::Request;
use shoal::config::{ConfigLoader, ShoalConfig};
use shoal::gateway::{ApiError, AppRouter, ErrorBody, GatewayContext, GatewayParams, JsonBody};
use shoal::ids::{EntityAddress, EntityId, EntityType};
use shoal::message_storage::Reply;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

const SHARDS: u32 = 4;
/// Requests the application group admits per window in these tests.
const LIMIT: u32 = 5;

/// The test application's request body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Greeting {
    /// Who to greet.
    name: String,
}

/// The test application's answer.
#[derive(Debug, Serialize, ToSchema)]
struct Greeted {
    /// What the probe echoed.
    echoed: serde_json::Value,
}

/// Greets through a probe entity (its volatile `echo`).
#[utoipa::path(
    post,
    path = "/greetings/{entity_id}",
    params(("entity_id" = String, Path, description = "The probe to greet through")),
    request_body = Greeting,
    responses(
        (status = 200, description = "Greeted", body = Greeted),
        (status = 400, description = "Bad input", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    ),
    tag = "greetings"
)]
async fn greet(
    State(gateway): State<GatewayContext>,
    path: Result<Path<String>, PathRejection>,
    JsonBody(greeting): JsonBody<Greeting>,
) -> Result<Json<Greeted>, ApiError> {
    let Path(id) = path?;
    let address = EntityAddress {
        entity_type: EntityType::new("probe").map_err(|e| ApiError::Internal(e.to_string()))?,
        entity_id: EntityId::new(id)
            .map_err(|e| ApiError::bad_request("bad_entity_id", e.to_string()))?,
    };
    let value = serde_json::json!({ "value": format!("hello {}", greeting.name) });
    match gateway
        .client()
        .ask(Request::volatile(address, "echo", value))
        .await?
    {
        Reply::Ok { value } => Ok(Json(Greeted { echoed: value })),
        Reply::Err { code, message } => Err(ApiError::HandlerError { code, message }),
    }
}

fn test_router() -> AppRouter {
    OpenApiRouter::new().routes(routes!(greet))
}

fn config(cluster: &TestCluster, listen: SocketAddr) -> anyhow::Result<ShoalConfig> {
    let prefix = format!("shoal-test:{}", cluster.db.name);
    Ok(ConfigLoader::new()
        .set("database.url", Some(cluster.db.url.clone()))
        .set("database.pool-max-connections", Some(4))
        .set("cluster.name", Some(cluster.name.clone()))
        .set("cluster.shards-per-group", Some(SHARDS))
        .set(
            "cluster.secret",
            Some(shoal_testkit::process::CLUSTER_SECRET.to_owned()),
        )
        .set("gateway.listen", Some(listen.to_string()))
        .set("redis.url", Some(shoal_testkit::redis::redis_url()))
        .set("redis.key-prefix", Some(prefix))
        .set("redis.api-limits.applications.requests", Some(LIMIT))
        .load()?)
}

/// A gateway running in this process, with the test application's routes.
struct InProcessGateway {
    http: Http,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), shoal::gateway::GatewayError>>,
}

impl InProcessGateway {
    async fn start(cluster: &TestCluster, routes: AppRouter) -> anyhow::Result<Self> {
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let params = GatewayParams::new(config(cluster, listen)?, shoal_cli::registry()?)
            .with_routes(routes);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(shoal::gateway::run(params, shutdown.clone()));
        let http = Http::new(format!("http://{listen}"))?;
        let gateway = Self {
            http,
            shutdown,
            task,
        };
        wait_until(DEADLINE, "the gateway answers /health", || async {
            if gateway.task.is_finished() {
                bail!("the gateway stopped during start-up");
            }
            Ok(gateway.http.get("/health").await?.status == StatusCode::OK)
        })
        .await?;
        Ok(gateway)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_router_is_served_behind_the_gateways_middleware() -> anyhow::Result<()> {
    let (cluster, _runners) = TestCluster::balanced(SHARDS, 1).await?;
    let gateway = InProcessGateway::start(&cluster, test_router()).await?;
    let http = &gateway.http;

    // Through the client to a probe, with a generated request id.
    let greeted = http
        .post_json("/greetings/g-1", &serde_json::json!({"name": "ada"}), &[])
        .await?;
    ensure!(greeted.status == StatusCode::OK, "{greeted:?}");
    ensure!(
        greeted.json()?["echoed"] == "hello ada",
        "{}",
        greeted.text()
    );
    ensure!(greeted.request_id().is_some_and(|id| !id.is_empty()));
    ensure!(
        greeted
            .headers
            .get("x-ratelimit-limit")
            .and_then(|v| v.to_str().ok())
            == Some(&LIMIT.to_string()),
        "the application group's limit: {:?}",
        greeted.headers
    );

    // A request id given by the caller comes back.
    let named = http
        .post_json(
            "/greetings/g-1",
            &serde_json::json!({"name": "bob"}),
            &[("x-request-id", "greeting-42")],
        )
        .await?;
    ensure!(named.request_id() == Some("greeting-42"), "{named:?}");

    // Bad input: the gateway's JSON error shape, naming the problem.
    let wrong_type = http
        .post_json("/greetings/g-1", &serde_json::json!({"name": 7}), &[])
        .await?;
    ensure!(
        wrong_type.status == StatusCode::BAD_REQUEST,
        "{wrong_type:?}"
    );
    let body = wrong_type.json()?;
    ensure!(body["error"]["code"] == "bad_body", "{body}");
    ensure!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("name")),
        "{body}"
    );
    ensure!(body["error"]["retry"] == "never" && body["error"]["retryable"] == false);
    let unknown_field = http
        .post_json(
            "/greetings/g-1",
            &serde_json::json!({"name": "c", "age": 3}),
            &[],
        )
        .await?;
    ensure!(
        unknown_field.error()?.0 == "bad_body",
        "{}",
        unknown_field.text()
    );
    let malformed = http
        .post_raw("/greetings/g-1", b"{not json".to_vec(), &[])
        .await?;
    ensure!(
        malformed.error()?.0 == "malformed_json",
        "{}",
        malformed.text()
    );

    // Five admitted in the window (the 400s count); the sixth is refused.
    let limited = http
        .post_json("/greetings/g-1", &serde_json::json!({"name": "dan"}), &[])
        .await?;
    ensure!(
        limited.status == StatusCode::TOO_MANY_REQUESTS,
        "{limited:?}"
    );
    let body = limited.json()?;
    ensure!(body["error"]["code"] == "rate_limited", "{body}");
    ensure!(body["error"]["retry"] == "safe", "{body}");
    ensure!(limited.headers.contains_key("retry-after"));
    ensure!(limited.request_id().is_some());
    // The gateway's own groups keep their own budgets.
    let explain = http.get("/entities/probe/g-1").await?;
    ensure!(explain.status == StatusCode::OK, "{explain:?}");

    // The route and its schemas are in the document.
    let doc = http.get("/openapi.json").await?.json()?;
    let operation = &doc["paths"]["/greetings/{entity_id}"]["post"];
    ensure!(
        operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            == "#/components/schemas/Greeting",
        "{operation}"
    );
    let greeting = &doc["components"]["schemas"]["Greeting"];
    ensure!(greeting["additionalProperties"] == false, "{greeting}");
    ensure!(doc["components"]["schemas"]["Greeted"].is_object());
    ensure!(
        operation["parameters"][0]["schema"]["pattern"].is_string(),
        "the id pattern is declared: {operation}"
    );

    // Graceful shutdown: the gateway stops when told and returns cleanly.
    gateway.shutdown.cancel();
    let stopped = tokio::time::timeout(DEADLINE, gateway.task)
        .await
        .context("the gateway did not stop")??;
    stopped?;
    ensure!(
        http.get("/health").await.is_err(),
        "the gateway still answers"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_on_the_gateways_own_paths_is_refused() -> anyhow::Result<()> {
    let cluster = TestCluster::new(SHARDS).await?;
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let routes = OpenApiRouter::new().routes(routes!(own_path));
    let params =
        GatewayParams::new(config(&cluster, listen)?, shoal_cli::registry()?).with_routes(routes);
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        shoal::gateway::run(params, CancellationToken::new()),
    )
    .await
    .context("the gateway should refuse to start, not serve")?;
    let Err(error) = outcome else {
        bail!("a router on /cluster was accepted");
    };
    ensure!(error.to_string().contains("/cluster"), "{error}");
    Ok(())
}

/// Claims the gateway's `/cluster`.
#[utoipa::path(get, path = "/cluster", responses((status = 200, description = "Mine")))]
async fn own_path() -> &'static str {
    "mine"
}
