//! The `webhook` job type through real processes: two runners and a gateway configured with
//! `[jobs.webhook]` from the environment, jobs enqueued with `POST /jobs` and followed with
//! `GET /jobs/{id}`, delivered to the testkit's receiver, which verifies every signature
//! with the Standard Webhooks project's Python implementation. A cluster without
//! `allowed-networks` refuses internal targets (422 at enqueue for a literal, a dead job
//! with its reason for a name), framing headers, credentials in URLs and jobs beyond the
//! operator's limits, and keeps a bounded attempt history.

mod common;

use anyhow::{Context, ensure};
use common::gateway::{Gateway, GatewayOptions, Http};
use common::{DEADLINE, RunnerOptions, TestCluster, wait_until};
use reqwest::StatusCode;
use serde_json::{Value, json};
use shoal_testkit::Receiver;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

async fn enqueue(http: &Http, url: &str) -> anyhow::Result<String> {
    let body = json!({"type": "webhook", "payload": {"url": url, "body": {"event": "e"}}});
    enqueue_body(http, &body).await
}

async fn enqueue_body(http: &Http, body: &Value) -> anyhow::Result<String> {
    let response = http.post_json("/jobs", body, &[]).await?;
    ensure!(
        response.status == StatusCode::ACCEPTED,
        "enqueue {body}: {} {}",
        response.status,
        response.text()
    );
    Ok(response.json()?["id"].as_str().context("an id")?.to_owned())
}

/// Waits until `done` holds for the job; returns it.
async fn await_job(
    http: &Http,
    id: &str,
    what: &str,
    done: fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let last = std::sync::Mutex::new(Value::Null);
    let waited = wait_until(DEADLINE, &format!("job {id}: {what}"), || async {
        let job = http.get(&format!("/jobs/{id}")).await?.json()?;
        let ok = done(&job);
        *last.lock().unwrap_or_else(|e| e.into_inner()) = job;
        Ok(ok)
    })
    .await;
    let job = last.into_inner().unwrap_or_else(|e| e.into_inner());
    waited.with_context(|| format!("last seen: {job}"))?;
    Ok(job)
}

fn attempts(job: &Value) -> &[Value] {
    job["attempts"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn at(value: &Value) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    Ok(value.as_str().context("a time")?.parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_jobs_are_delivered_retried_and_dead_through_the_cluster() -> anyhow::Result<()> {
    let receiver = Receiver::start(SECRET)?;
    let cluster = TestCluster::new(16).await?;
    // A service in the allowed network that the operator lists as refused.
    let internal = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let internal_addr = internal.local_addr()?;
    let env: Vec<(String, String)> = [
        ("SHOAL__REDIS__URL", shoal_testkit::redis::redis_url()),
        (
            "SHOAL__REDIS__KEY_PREFIX",
            format!("shoal-test:{}", cluster.db.name),
        ),
        ("SHOAL__JOBS__WEBHOOK__SECRETS", format!("[\"{SECRET}\"]")),
        ("SHOAL__JOBS__WEBHOOK__RESPONSE_TIMEOUT", "1s".to_owned()),
        ("SHOAL__JOBS__WEBHOOK__BACKOFF_FIRST", "200ms".to_owned()),
        // The receiver is on 127.0.0.1, which the egress policy refuses by default.
        (
            "SHOAL__JOBS__WEBHOOK__ALLOWED_NETWORKS",
            "[\"127.0.0.0/8\"]".to_owned(),
        ),
        (
            "SHOAL__JOBS__WEBHOOK__REFUSED_ADDRESSES",
            format!("[\"{internal_addr}\"]"),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let mut runners = Vec::new();
    for _ in 0..2 {
        let options = RunnerOptions {
            env: env.clone(),
            ..Default::default()
        };
        runners.push(cluster.start_runner_with(options).await?);
    }
    cluster
        .await_balanced(&runners.iter().collect::<Vec<_>>())
        .await?;
    let gateway = Gateway::start(
        &cluster,
        GatewayOptions {
            env: env.clone(),
            ..Default::default()
        },
    )
    .await?;
    let http = &gateway.http;

    // An https URL is refused at enqueue, naming the field.
    let https = json!({"type": "webhook", "payload": {"url": "https://x.test/h", "body": {}}});
    let refused = http.post_json("/jobs", &https, &[]).await?;
    ensure!(
        refused.status == StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        refused.text()
    );
    ensure!(refused.text().contains("url"), "{}", refused.text());

    let ok = enqueue(http, &receiver.url("/ok")).await?;
    let flaky = enqueue(http, &receiver.url("/sequence/flaky?codes=500,200")).await?;
    let bad = enqueue(http, &receiver.url("/status/400")).await?;
    let limited = enqueue(http, &receiver.url("/status/429?retry_after=2")).await?;
    let hung = enqueue(http, &receiver.url("/hang?seconds=10")).await?;

    let job = await_job(http, &ok, "succeeded", |j| j["status"] == "succeeded").await?;
    ensure!(job["result"]["status"] == 204, "{job}");
    ensure!(
        attempts(&job)[0]["notes"][0]["status"] == 204,
        "the attempt's record: {job}"
    );
    let log = receiver.log_of("/ok").await?;
    ensure!(log.len() == 1 && log[0]["verified"] == true, "{log:?}");
    ensure!(
        log[0]["id"] == ok.as_str(),
        "webhook-id is the job id: {log:?}"
    );

    // 500 then 200: retried once.
    let job = await_job(http, &flaky, "succeeded", |j| j["status"] == "succeeded").await?;
    let outcomes: Vec<_> = attempts(&job)
        .iter()
        .map(|a| a["outcome"].clone())
        .collect();
    ensure!(outcomes == [json!("failed"), json!("succeeded")], "{job}");
    ensure!(attempts(&job)[0]["notes"][0]["status"] == 500, "{job}");

    // 400: dead without a retry.
    let job = await_job(http, &bad, "dead", |j| j["status"] == "dead").await?;
    ensure!(attempts(&job).len() == 1, "{job}");
    ensure!(
        attempts(&job)[0]["outcome"] == "failed_permanently",
        "{job}"
    );

    // 429 with Retry-After: 2 → the next attempt starts at least 2 s after the first ended.
    let job = await_job(http, &limited, "a second attempt", |j| {
        attempts(j).len() >= 2
    })
    .await?;
    let gap = at(&attempts(&job)[1]["started_at"])? - at(&attempts(&job)[0]["ended_at"])?;
    ensure!(gap >= chrono::Duration::seconds(2), "gap {gap}: {job}");

    // A receiver that hangs: the response timeout ends the attempt, which is retried.
    let job = await_job(http, &hung, "a timed-out attempt", |j| {
        !attempts(j).is_empty()
    })
    .await?;
    let error = attempts(&job)[0]["error"].as_str().unwrap_or_default();
    ensure!(error.contains("timed out"), "{job}");
    ensure!(job["status"] != "dead", "a timeout is retried: {job}");

    // The cluster's own addresses, inside the allowed network: each runner's transport
    // (whichever runner attempts the job, the other is refused too), Postgres, Redis, and
    // what `refused-addresses` lists. Each attempt is refused before a byte is written.
    let postgres = reqwest::Url::parse(&cluster.db.url)?;
    let mut targets = vec![
        format!("http://{}/_shoal/v1/deliver", runners[0].addr),
        format!("http://{}/_shoal/v1/deliver", runners[1].addr),
        format!(
            "http://{}:{}/",
            postgres.host_str().context("a host")?,
            postgres.port().unwrap_or(5432)
        ),
        format!("http://{internal_addr}/"),
    ];
    if let Some(redis) = reqwest::Url::parse(&shoal_testkit::redis::redis_url())?.port() {
        targets.push(format!("http://127.0.0.1:{redis}/"));
    }
    let listened = tokio::spawn(async move {
        let (mut stream, _) = internal.accept().await?;
        let mut bytes = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut bytes).await?;
        anyhow::Ok(bytes.len())
    });
    for target in &targets {
        let id = enqueue(http, target).await?;
        let job = await_job(http, &id, "dead", |j| j["status"] == "dead").await?;
        ensure!(attempts(&job).len() == 1, "{target}: dead at once: {job}");
        let attempt = &attempts(&job)[0];
        ensure!(
            attempt["notes"][0]["outcome"] == "refused",
            "{target}: {job}"
        );
        ensure!(
            attempt["error"]
                .as_str()
                .is_some_and(|e| e.contains("this cluster's own addresses")),
            "{target}: {job}"
        );
    }
    let written = tokio::time::timeout(DEADLINE, listened).await???;
    ensure!(written == 0, "{written} bytes reached a refused address");
    Ok(())
}

/// Asserts `body` is refused at `POST /jobs` with a 400 (what the document forbids) whose
/// message names `field`.
async fn refused(http: &Http, body: &Value, field: &str) -> anyhow::Result<String> {
    refused_as(http, body, field, StatusCode::BAD_REQUEST).await
}

/// Asserts `body`'s payload is refused at `POST /jobs` with a 422 `bad_payload` (a rule of
/// the job type the document cannot state) whose message names `field`.
async fn unfit(http: &Http, body: &Value, field: &str) -> anyhow::Result<String> {
    let text = refused_as(http, body, field, StatusCode::UNPROCESSABLE_ENTITY).await?;
    ensure!(text.contains("bad_payload"), "{body}: {text}");
    Ok(text)
}

async fn refused_as(
    http: &Http,
    body: &Value,
    field: &str,
    status: StatusCode,
) -> anyhow::Result<String> {
    let response = http.post_json("/jobs", body, &[]).await?;
    let text = response.text();
    ensure!(
        response.status == status,
        "{body}: {} {text}",
        response.status
    );
    ensure!(text.contains(field), "{body}: {text} does not name {field}");
    Ok(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_allowed_networks_internal_targets_framing_headers_and_excess_are_refused()
-> anyhow::Result<()> {
    let receiver = Receiver::start(SECRET)?;
    let cluster = TestCluster::new(8).await?;
    let env: Vec<(String, String)> = [
        ("SHOAL__REDIS__URL", shoal_testkit::redis::redis_url()),
        (
            "SHOAL__REDIS__KEY_PREFIX",
            format!("shoal-test:{}", cluster.db.name),
        ),
        ("SHOAL__JOBS__WEBHOOK__SECRETS", format!("[\"{SECRET}\"]")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let runner = cluster
        .start_runner_with(RunnerOptions {
            env: env.clone(),
            ..Default::default()
        })
        .await?;
    cluster.await_balanced(&[&runner]).await?;
    let gateway = Gateway::start(
        &cluster,
        GatewayOptions {
            env,
            ..Default::default()
        },
    )
    .await?;
    let http = &gateway.http;
    let port = receiver.port();
    let hook = |url: String| json!({"type": "webhook", "payload": {"url": url, "body": {}}});

    // IP literals in every spelling: 400 naming the URL field, at the gateway.
    for host in [
        "127.0.0.1",
        "2130706433",
        "0x7f.0.0.1",
        "0.0.0.0",
        "[::ffff:127.0.0.1]",
        "[::1]",
        "169.254.169.254",
        "10.0.0.1",
    ] {
        let text = unfit(http, &hook(format!("http://{host}:{port}/ok")), "`url`").await?;
        ensure!(text.contains("egress policy"), "{host}: {text}");
    }
    // Credentials in the URL: refused, not stripped.
    unfit(
        http,
        &hook(format!("http://user:pass@example.com:{port}/ok")),
        "credentials",
    )
    .await?;
    // Headers that change framing or routing, in any case.
    for name in [
        "Host",
        "content-length",
        "Transfer-Encoding",
        "Connection",
        "Upgrade",
        "TE",
        "Trailer",
        "Proxy-Authorization",
        "X-Shoal-Secret",
        "Webhook-Signature",
    ] {
        let body = json!({"type": "webhook", "payload": {
            "url": "http://example.com/h", "body": {}, "headers": {name: "x"}}});
        unfit(http, &body, "`headers`").await?;
    }
    // The operator's limits.
    let noop = |extra: Value| {
        let mut body = json!({"type": "diag.noop", "payload": {}});
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        body
    };
    refused(
        http,
        &noop(json!({"max_attempts": 4_000_000_000u64})),
        "max_attempts",
    )
    .await?;
    refused(
        http,
        &noop(json!({"max_attempts": 101})),
        "max-attempts-limit",
    )
    .await?;
    refused(
        http,
        &noop(json!({"backoff": {"first_ms": 1, "max_ms": 1}})),
        "min-backoff",
    )
    .await?;
    enqueue_body(
        http,
        &noop(json!({"max_attempts": 100, "backoff": {"first_ms": 100, "max_ms": 100}})),
    )
    .await?;

    // A name that resolves to loopback only: the job is dead, its reason on the record,
    // and nothing reached the receiver.
    let named = enqueue(http, &format!("http://localhost:{port}/ok")).await?;
    let job = await_job(http, &named, "dead", |j| j["status"] == "dead").await?;
    ensure!(attempts(&job).len() == 1, "dead at once, no retry: {job}");
    let error = attempts(&job)[0]["error"].as_str().unwrap_or_default();
    ensure!(
        error.contains("resolves only to refused addresses"),
        "{job}"
    );
    ensure!(
        attempts(&job)[0]["notes"][0]["outcome"] == "refused",
        "{job}"
    );
    ensure!(receiver.log().await?.is_empty(), "no connection was made");

    // A job's history keeps the last attempts and the count.
    let flaky = enqueue_body(
        http,
        &json!({"type": "diag.flaky", "payload": {"fail_times": 25},
        "max_attempts": 30, "backoff": {"first_ms": 100, "max_ms": 100}}),
    )
    .await?;
    let job = await_job(http, &flaky, "succeeded", |j| j["status"] == "succeeded").await?;
    ensure!(job["attempt_count"] == 26, "{job}");
    ensure!(attempts(&job).len() == 20, "{job}");
    ensure!(
        attempts(&job)[0]["number"] == 7 && attempts(&job)[19]["number"] == 26,
        "{job}"
    );
    Ok(())
}
