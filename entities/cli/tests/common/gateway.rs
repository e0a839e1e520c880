//! Harness additions for message and gateway tests: a real `shoal gateway` process, a
//! [`ShoalClient`] connected to a test cluster, and a small HTTP client that keeps status,
//! headers and body of every answer (errors included) for assertions.

// Each test binary uses a different part of the harness.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use shoal::client::{ClientConfig, ClientParts, ShoalClient};
use shoal::ids::ClusterName;
use shoal::message_storage::postgres::{BatchConfig, PgMessageStorage};
use shoal::runner_storage::postgres::{LockSessionSettings, PgRunnerStorage};
use shoal::sharding::Sharding;
use shoal::transport::http::HttpTransport;
use shoal_testkit::ChildProcess;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{DEADLINE, TestCluster, free_port, shoal_command};

/// The cluster secret the harness gives every runner and gateway it starts (they refuse the
/// built-in `shoal::config::DEFAULT_SECRET`).
pub const DEFAULT_SECRET: &str = shoal_testkit::process::CLUSTER_SECRET;

// ---------------------------------------------------------------------------------------
// Gateway processes
// ---------------------------------------------------------------------------------------

/// What a gateway is started with, over the cluster's defaults.
#[derive(Debug, Clone, Default)]
pub struct GatewayOptions {
    /// Extra environment variables (e.g. `SHOAL__CLUSTER__SECRET`,
    /// `SHOAL__GATEWAY__READY_MAX_BACKLOG_AGE`).
    pub env: Vec<(String, String)>,
    /// `--redis-url` (keys get a prefix of their own per test database, unless `env` sets
    /// `SHOAL__REDIS__KEY_PREFIX`).
    pub redis_url: Option<String>,
    /// Listen here instead of on a fresh port (a gateway restarting at its old address).
    pub listen: Option<SocketAddr>,
}

/// A `shoal gateway` process (killed when dropped; its log tail is printed if the test
/// fails).
#[derive(Debug)]
pub struct Gateway {
    /// Its HTTP address.
    pub addr: SocketAddr,
    /// HTTP client for it.
    pub http: Http,
    process: ChildProcess,
}

impl Gateway {
    /// Starts a gateway for `cluster` and waits until `/health` answers (retrying if its
    /// port was taken).
    pub async fn start(cluster: &TestCluster, options: GatewayOptions) -> anyhow::Result<Self> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut gateway = Self::spawn(cluster, &options, attempt)?;
            match gateway.await_healthy().await {
                Ok(()) => return Ok(gateway),
                Err(error) if attempt < 3 && gateway.log().contains("cannot listen") => {
                    eprintln!("gateway could not bind (retrying): {error:#}");
                }
                Err(error) => {
                    return Err(error.context(format!("gateway log:\n{}", gateway.log_tail(30))));
                }
            }
        }
    }

    fn spawn(
        cluster: &TestCluster,
        options: &GatewayOptions,
        attempt: usize,
    ) -> anyhow::Result<Self> {
        let addr = match options.listen {
            Some(addr) => addr,
            None => SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        };
        let mut command = shoal_command(&cluster.dir);
        command
            .args(["gateway", "--database-url", &cluster.db.url])
            .args(["--listen", &addr.to_string(), "--cluster", &cluster.name])
            .env(
                "SHOAL__CLUSTER__SHARDS_PER_GROUP",
                cluster.shards.to_string(),
            )
            .env("SHOAL__LOG__FILTER", "info")
            .env("SHOAL__DATABASE__POOL_MAX_CONNECTIONS", "4");
        if let Some(redis) = &options.redis_url {
            // Keys of this test only (the default prefix, `shoal:<cluster>`, is the same
            // in every test cluster; other tests may use the same Redis at once).
            command.args(["--redis-url", redis]).env(
                "SHOAL__REDIS__KEY_PREFIX",
                format!("shoal-test:{}", cluster.db.name),
            );
        }
        command.envs(options.env.iter().map(|(k, v)| (k, v)));
        let log = cluster
            .dir
            .join(format!("gateway-{}-{attempt}.log", addr.port()));
        Ok(Self {
            addr,
            http: Http::new(format!("http://{addr}"))?,
            process: ChildProcess::spawn(format!("gateway ({addr})"), &mut command, log)?,
        })
    }

    async fn await_healthy(&mut self) -> anyhow::Result<()> {
        let http = &self.http;
        self.process
            .await_ready(DEADLINE, "answering /health", || async move {
                Ok(http.get("/health").await?.status == StatusCode::OK)
            })
            .await?;
        // Whoever holds the port answers /health: only this gateway's log says it bound.
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            let log = self.log();
            anyhow::ensure!(!log.contains("cannot listen"), "the gateway could not bind");
            if log.contains("gateway started") {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < until,
                "the gateway did not log that it bound its address within {DEADLINE:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.process.kill()
    }

    /// The process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.process.id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Everything the gateway has logged so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }
}

// ---------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------

/// A finished HTTP exchange: whatever the status, the body was read.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The body as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("status {}, body is not JSON: {}", self.status, self.text()))
    }

    /// The body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// `x-request-id`, if present.
    pub fn request_id(&self) -> Option<&str> {
        self.headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
    }

    /// The `{"error": {"code", "message", "retryable"}}` body: (code, retryable). Fails if
    /// the body does not have that shape.
    pub fn error(&self) -> anyhow::Result<(String, bool)> {
        let body = self.json()?;
        let error = body
            .get("error")
            .with_context(|| format!("no `error` in {body}"))?;
        let code = error
            .get("code")
            .and_then(|v| v.as_str())
            .with_context(|| format!("no string `error.code` in {body}"))?;
        error
            .get("message")
            .and_then(|v| v.as_str())
            .with_context(|| format!("no string `error.message` in {body}"))?;
        let retryable = error
            .get("retryable")
            .and_then(|v| v.as_bool())
            .with_context(|| format!("no bool `error.retryable` in {body}"))?;
        Ok((code.to_owned(), retryable))
    }
}

/// A small HTTP/1 client for one base URL.
#[derive(Debug, Clone)]
pub struct Http {
    /// `http://host:port`.
    pub base: String,
    /// The underlying client (no proxy, 30 s timeout unless a request sets its own).
    pub client: reqwest::Client,
}

impl Http {
    /// A client for `base`.
    pub fn new(base: impl Into<String>) -> anyhow::Result<Self> {
        Ok(Self {
            base: base.into(),
            client: reqwest::Client::builder()
                .no_proxy()
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(30))
                .build()?,
        })
    }

    /// `base` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends `request` and reads the whole answer.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<HttpResponse> {
        let response = request.send().await?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await?.to_vec();
        Ok(HttpResponse {
            status,
            headers,
            body,
        })
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> anyhow::Result<HttpResponse> {
        self.send(self.client.get(self.url(path))).await
    }

    /// `POST path` with a JSON body and extra headers.
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<HttpResponse> {
        self.post_raw(path, serde_json::to_vec(body)?, headers)
            .await
    }

    /// `POST path` with raw body bytes (sent as `application/json`) and extra headers.
    pub async fn post_raw(
        &self,
        path: &str,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<HttpResponse> {
        let mut request = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.send(request).await
    }
}

// ---------------------------------------------------------------------------------------
// A client API node in the test process
// ---------------------------------------------------------------------------------------

/// A [`ShoalClient`] for a test cluster; its routing refresher stops when this is dropped.
#[derive(Debug)]
pub struct TestClient {
    /// The client.
    pub client: ShoalClient,
    /// Storage the client saves through (for direct checks).
    pub messages: Arc<PgMessageStorage>,
    _stop: DropGuard,
}

impl Deref for TestClient {
    type Target = ShoalClient;

    fn deref(&self) -> &ShoalClient {
        &self.client
    }
}

impl TestClient {
    /// A client connected like `shoal bench`'s (Postgres runner and message storage, HTTP/2
    /// transport presenting `secret`), with a pool of `pool_size` connections; waits until it
    /// sees a runner unless `wait_for_runners` is false.
    pub async fn connect(
        cluster: &TestCluster,
        secret: &str,
        pool_size: u32,
        wait_for_runners: bool,
    ) -> anyhow::Result<Self> {
        let pool = shoal::runner_storage::postgres::connect_pool(
            &cluster.db.url,
            pool_size,
            Duration::from_secs(5),
        )
        .await?;
        let name = ClusterName::new(&cluster.name)?;
        let runners = PgRunnerStorage::new(
            pool.clone(),
            &cluster.db.url,
            name.clone(),
            LockSessionSettings::default(),
        )?;
        let messages = Arc::new(PgMessageStorage::new(pool, name, BatchConfig::default()));
        let transport = HttpTransport::new(secret).map_err(anyhow::Error::msg)?;
        let stop = CancellationToken::new();
        let client = ShoalClient::start(
            ClientParts {
                sharding: sharding(cluster.shards)?,
                runners: Arc::new(runners),
                messages: messages.clone(),
                transport: Arc::new(transport),
                machine_id: std::process::id(),
                config: ClientConfig::default(),
            },
            stop.clone(),
        );
        if wait_for_runners && !client.wait_for_runners(DEADLINE).await {
            bail!("the client saw no live runner within {DEADLINE:?}");
        }
        Ok(Self {
            client,
            messages,
            _stop: stop.drop_guard(),
        })
    }
}

/// The sharding of a cluster of `shards` shards.
pub fn sharding(shards: u32) -> anyhow::Result<Sharding> {
    Ok(Sharding::new(
        NonZeroU32::new(shards).context("zero shards")?,
    ))
}
