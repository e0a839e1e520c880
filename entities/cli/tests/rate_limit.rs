//! Redis-backed limits across real `shoal gateway` processes, with no balancer in front:
//! three gateways share one API limit exactly; a breaker opened from elsewhere shows as
//! `degraded` in every gateway's `/ready`; with Redis stopped the gateways answer 503
//! `redis_unavailable` (or pass, when configured to) and recover when it is back.
//!
//! Each test uses its own key prefix on the shared Redis (`SHOAL_TEST_REDIS_URL`, default
//! `redis://127.0.0.1:6379`); the outage test runs its own `redis-server` on a free port.

mod common;

use std::time::Duration;

use anyhow::{Context, ensure};
use common::gateway::{Gateway, GatewayOptions};
use common::{DEADLINE, TestCluster, wait_until};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use shoal::ClusterName;
use shoal::config::{BreakerConfig, RedisConfig};
use shoal::redis::RedisClient;
use shoal::redis::breaker::{CircuitBreaker, Outcome};
use shoal_testkit::OwnRedis;
use shoal_testkit::redis::{redis_url, unique_prefix};
use tokio::time::Instant;

const SHARDS: u32 = 8;

/// A `shoal gateway` process with Redis under `prefix` (killed when dropped).
struct RedisGateway {
    gateway: Gateway,
}

/// One answer, whatever its status.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: serde_json::Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<u64> {
        self.headers.get(name)?.to_str().ok()?.parse().ok()
    }

    fn error_code(&self) -> Option<(&str, bool)> {
        let error = self.body.get("error")?;
        error.get("message")?.as_str()?;
        Some((
            error.get("code")?.as_str()?,
            error.get("retryable")?.as_bool()?,
        ))
    }
}

impl RedisGateway {
    async fn start(
        cluster: &TestCluster,
        redis_url: &str,
        prefix: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut options = GatewayOptions {
            env: vec![("SHOAL__REDIS__KEY_PREFIX".to_owned(), prefix.to_owned())],
            redis_url: Some(redis_url.to_owned()),
            listen: None,
        };
        options
            .env
            .extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        Ok(Self {
            gateway: Gateway::start(cluster, options).await?,
        })
    }

    async fn get(&self, path: &str, tenant: Option<&str>) -> anyhow::Result<Answer> {
        self.request(path, tenant).await
    }

    /// `GET path` as a future that owns what it needs (to spawn it).
    fn request(
        &self,
        path: &str,
        tenant: Option<&str>,
    ) -> impl Future<Output = anyhow::Result<Answer>> + Send + 'static {
        let http = &self.gateway.http;
        let mut request = http.client.get(http.url(path));
        if let Some(tenant) = tenant {
            request = request.header("x-tenant-id", tenant);
        }
        async move {
            let response = request.send().await?;
            let status = response.status();
            let headers = response.headers().clone();
            let bytes = response.bytes().await?;
            let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
            Ok(Answer {
                status,
                headers,
                body,
            })
        }
    }

    async fn metrics(&self) -> anyhow::Result<String> {
        Ok(self.gateway.http.get("/metrics").await?.text())
    }

    fn is_running(&mut self) -> bool {
        self.gateway.is_running()
    }

    fn log(&self) -> String {
        self.gateway.log()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_admit_exactly_one_hundred_of_three_hundred_requests() -> anyhow::Result<()>
{
    let cluster = TestCluster::new(SHARDS).await?;
    let prefix = unique_prefix();
    let env = [("SHOAL__REDIS__API_LIMITS__CLUSTER__REQUESTS", "100")];
    let redis = redis_url();
    let gateways = [
        RedisGateway::start(&cluster, &redis, &prefix, &env).await?,
        RedisGateway::start(&cluster, &redis, &prefix, &env).await?,
        RedisGateway::start(&cluster, &redis, &prefix, &env).await?,
    ];
    let started = Instant::now();
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..300 {
        requests.spawn(gateways[i % 3].request("/cluster", Some("acme")));
    }
    let answers: Vec<Answer> = requests
        .join_all()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    eprintln!(
        "300 requests over 3 gateways answered in {:?}",
        started.elapsed()
    );

    let admitted: Vec<&Answer> = answers.iter().filter(|a| a.status == 200).collect();
    let refused: Vec<&Answer> = answers.iter().filter(|a| a.status == 429).collect();
    ensure!(
        admitted.len() == 100 && refused.len() == 200,
        "{} admitted, {} refused, others: {:?}",
        admitted.len(),
        refused.len(),
        answers.iter().find(|a| a.status != 200 && a.status != 429)
    );
    // Every admission saw its own count: the remaining values are exactly 99 down to 0.
    let mut remaining: Vec<u64> = admitted
        .iter()
        .map(|a| a.header("x-ratelimit-remaining").context("remaining"))
        .collect::<anyhow::Result<_>>()?;
    remaining.sort_unstable();
    ensure!(
        remaining == (0..100).collect::<Vec<_>>(),
        "remaining {remaining:?}"
    );
    for answer in admitted.iter().chain(&refused) {
        ensure!(
            answer.header("x-ratelimit-limit") == Some(100),
            "{answer:?}"
        );
        let reset = answer.header("x-ratelimit-reset").context("reset")?;
        ensure!((1..=60).contains(&reset), "reset {reset}");
    }
    for answer in &refused {
        ensure!(
            answer.header("x-ratelimit-remaining") == Some(0),
            "{answer:?}"
        );
        let retry_after = answer.header("retry-after").context("Retry-After")?;
        ensure!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
        ensure!(
            answer.error_code() == Some(("rate_limited", true)),
            "{:?}",
            answer.body
        );
    }
    // Other tenants have their own limit; health and readiness are never limited.
    let other = gateways[1].get("/cluster", Some("other-tenant")).await?;
    ensure!(other.status == 200, "{other:?}");
    ensure!(gateways[2].get("/health", Some("acme")).await?.status == 200);
    let bad = gateways[0].get("/cluster", Some("no spaces")).await?;
    ensure!(bad.status == 400 && bad.error_code() == Some(("bad_tenant", false)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_opened_elsewhere_shows_degraded_in_every_gateway_ready() -> anyhow::Result<()> {
    let cluster = TestCluster::new(SHARDS).await?;
    let _runner = cluster.start_runner().await?;
    let prefix = unique_prefix();
    let redis = redis_url();
    let env = [
        ("SHOAL__REDIS__BREAKER__FAILURE_THRESHOLD", "2"),
        ("SHOAL__REDIS__BREAKER__RESET_TIMEOUT", "1s"),
    ];
    let gateways = [
        RedisGateway::start(&cluster, &redis, &prefix, &env).await?,
        RedisGateway::start(&cluster, &redis, &prefix, &env).await?,
        RedisGateway::start(&cluster, &redis, &prefix, &env).await?,
    ];
    let breakers_status = |answer: &Answer| {
        answer.body["checks"]["breakers"]["detail"]["status"]
            .as_str()
            .map(str::to_owned)
    };
    for gateway in &gateways {
        wait_until(DEADLINE, "the gateway is ready", || async {
            let ready = gateway.get("/ready", None).await?;
            Ok(ready.status == 200 && breakers_status(&ready).as_deref() == Some("ok"))
        })
        .await?;
    }

    // Another replica (this test process) sees two failures of the provider.
    let config = RedisConfig {
        url: Some(redis.clone()),
        key_prefix: Some(prefix.clone()),
        ..RedisConfig::default()
    };
    let client = RedisClient::connect(&config, &ClusterName::new(&cluster.name)?)?;
    let breaker_config = BreakerConfig {
        failure_threshold: 2,
        reset_timeout: Duration::from_secs(1),
        ..BreakerConfig::default()
    };
    let breaker = CircuitBreaker::new(client.clone(), "anthropic", &breaker_config);
    for _ in 0..2 {
        let permit = breaker.admit().await?;
        breaker.record(permit, Outcome::Failure).await?;
    }
    for gateway in &gateways {
        let ready = gateway.get("/ready", None).await?;
        ensure!(ready.status == 200, "ready must stay 200: {:?}", ready.body);
        ensure!(
            breakers_status(&ready).as_deref() == Some("degraded"),
            "{:?}",
            ready.body
        );
        let open = &ready.body["checks"]["breakers"]["detail"]["open"];
        ensure!(*open == serde_json::json!(["anthropic"]), "{open}");
        let metrics = gateway.metrics().await?;
        ensure!(
            metrics.contains("shoal_circuit_breaker_state{breaker=\"anthropic\"} 2"),
            "no open-state gauge in /metrics"
        );
    }

    // After the reset timeout a trial succeeds: every gateway reports ok again.
    let permit = loop {
        match breaker.admit().await {
            Ok(permit) => break permit,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    ensure!(permit.is_trial());
    breaker.record(permit, Outcome::Success).await?;
    for gateway in &gateways {
        let ready = gateway.get("/ready", None).await?;
        ensure!(
            breakers_status(&ready).as_deref() == Some("ok"),
            "{:?}",
            ready.body
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_gateways_answer_503_or_pass_as_configured_and_recover()
-> anyhow::Result<()> {
    let cluster = TestCluster::new(SHARDS).await?;
    let mut redis = OwnRedis::start().await?;
    let prefix = unique_prefix();
    let mut deny = RedisGateway::start(&cluster, &redis.url(), &prefix, &[]).await?;
    let allow_env = [("SHOAL__REDIS__API_LIMITS__WHEN_UNAVAILABLE", "allow")];
    let mut allow = RedisGateway::start(&cluster, &redis.url(), &prefix, &allow_env).await?;
    ensure!(deny.get("/cluster", None).await?.status == 200);
    ensure!(allow.get("/cluster", None).await?.status == 200);

    redis.kill().await?;
    let started = Instant::now();
    let down = deny.get("/cluster", None).await?;
    eprintln!(
        "a limited request with redis down answered {} in {:?}",
        down.status,
        started.elapsed()
    );
    ensure!(down.status == 503, "{down:?}");
    ensure!(
        down.error_code() == Some(("redis_unavailable", true)),
        "{:?}",
        down.body
    );
    ensure!(down.header("retry-after").is_some());
    let passed = allow.get("/cluster", None).await?;
    ensure!(
        passed.status == 200 && passed.header("x-ratelimit-limit").is_none(),
        "{passed:?}"
    );
    ensure!(deny.get("/health", None).await?.status == 200);
    let ready = deny.get("/ready", None).await?;
    ensure!(
        ready.status == 503 && ready.body["checks"]["redis"]["ok"] == false,
        "{:?}",
        ready.body
    );

    // Back on the same port: both gateways recover without a restart.
    redis.restart().await?;
    let took = wait_until(DEADLINE, "the deny gateway admits again", || async {
        let answer = deny.get("/cluster", None).await?;
        Ok(answer.status == 200 && answer.header("x-ratelimit-limit").is_some())
    })
    .await?;
    eprintln!("the gateway admitted again {took:?} after redis came back");
    let answer = allow.get("/cluster", None).await?;
    ensure!(answer.status == 200 && answer.header("x-ratelimit-limit").is_some());
    ensure!(deny.is_running() && allow.is_running(), "a gateway exited");
    ensure!(!deny.log().contains("panicked") && !allow.log().contains("panicked"));
    redis.kill().await?;
    Ok(())
}
