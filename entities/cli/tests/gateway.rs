//! The HTTP gateway end to end: a real `shoal gateway` process in front of real runners,
//! over HTTP. Replies and explain agree with `shoal status`; bad input is always a 4xx with
//! the JSON error shape; persisted requests survive the SIGKILL of their entity's owner;
//! `/ready` turns red while a shard is unowned or a consumer is stalled; `/openapi.json` and
//! `/metrics` are served.
//!
//! Numbers are printed; `--nocapture` shows them.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use common::gateway::{Gateway, GatewayOptions, HttpResponse, sharding};
use common::{DEADLINE, Runner, RunnerOptions, TestCluster, wait_until};
use reqwest::StatusCode;
use serde_json::json;
use shoal::ids::{EntityId, ShardId};
use tokio::task::JoinSet;

/// Shards of the test clusters.
const SHARDS: u32 = 64;

async fn cluster_with(runners: usize) -> anyhow::Result<(TestCluster, Vec<Runner>)> {
    TestCluster::balanced(SHARDS, runners).await
}

fn reply_count(response: &HttpResponse) -> anyhow::Result<i64> {
    let body = response.json()?;
    body.pointer("/reply/count")
        .and_then(|c| c.as_i64())
        .with_context(|| format!("{}: no reply count in {body}", response.status))
}

// ---------------------------------------------------------------------------------------
// A reply, and explain against `shoal status`
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_and_explain_agree_with_status() -> anyhow::Result<()> {
    let (cluster, runners) = cluster_with(2).await?;
    let gateway = Gateway::start(&cluster, GatewayOptions::default()).await?;
    let http = &gateway.http;

    let first = http
        .post_json("/entities/counter/x/increment", &json!({}), &[])
        .await?;
    ensure!(first.status == 200, "{} {}", first.status, first.text());
    ensure!(
        first.json()? == json!({"reply": {"count": 1}, "entity": "counter/x", "persisted": true}),
        "{}",
        first.text()
    );
    ensure!(first.request_id().is_some(), "no x-request-id");
    let second = http
        .post_json(
            "/entities/counter/x/increment",
            &json!({"by": 5}),
            &[("x-request-id", "my-request-1")],
        )
        .await?;
    ensure!(reply_count(&second)? == 6, "{}", second.text());
    ensure!(
        second.request_id() == Some("my-request-1"),
        "the caller's request id comes back: {:?}",
        second.request_id()
    );
    let get = http
        .post_json("/entities/counter/x/get", &json!({}), &[])
        .await?;
    ensure!(
        get.json()? == json!({"reply": {"count": 6}, "entity": "counter/x", "persisted": false}),
        "{}",
        get.text()
    );

    let explain = http.get("/entities/counter/x").await?;
    ensure!(
        explain.status == 200,
        "{} {}",
        explain.status,
        explain.text()
    );
    ensure!(explain.request_id().is_some(), "no x-request-id");
    let explain = explain.json()?;
    let owner = explain["owner_runner_id"]
        .as_i64()
        .with_context(|| format!("no owner in {explain}"))?;
    let owner_address = explain["owner_address"]
        .as_str()
        .with_context(|| format!("no owner address in {explain}"))?;
    let status = cluster.cluster_status().await?;
    let line = status
        .runners
        .iter()
        .find(|r| i64::from(r.id.get()) == owner)
        .with_context(|| format!("owner {owner} is not in shoal status: {status:?}"))?;
    ensure!(line.alive, "owner {owner} is not alive in shoal status");
    ensure!(
        line.address == owner_address,
        "explain says {owner_address}, status says {}",
        line.address
    );
    // It is one of the runner processes, which believes it owns the shard under that epoch.
    let shard = sharding(SHARDS)?.shard_of(&EntityId::new("x")?);
    ensure!(explain["shard"] == json!(shard.get()), "{explain}");
    let mut found = false;
    for runner in &runners {
        let view = runner.status().await?;
        if view.runner_id.map(|id| i64::from(id.get())) == Some(owner) {
            found = true;
            ensure!(runner.addr.to_string() == owner_address, "{}", runner.addr);
            let epoch = view.owned.get(&shard).map(|e| e.get());
            ensure!(
                epoch.is_some() && explain["epoch"] == json!(epoch),
                "runner holds shard {shard} under {epoch:?}; explain: {explain}"
            );
        }
    }
    ensure!(found, "owner {owner} is none of the runner processes");
    ensure!(
        explain["resident"] == json!(true)
            && explain["mailbox_depth"] == json!(0)
            && explain["unprocessed"] == json!(0)
            && explain["entity"] == json!("counter/x"),
        "{explain}"
    );
    eprintln!("explain: {explain}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------

struct Case {
    what: &'static str,
    method: reqwest::Method,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    status: u16,
    /// The error code, where one specific code is the only right answer.
    code: Option<&'static str>,
}

fn case(what: &'static str, path: &str, body: &str, status: u16, code: &'static str) -> Case {
    Case {
        what,
        method: reqwest::Method::POST,
        path: path.to_owned(),
        headers: Vec::new(),
        body: body.as_bytes().to_vec(),
        status,
        code: Some(code),
    }
}

impl Case {
    fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    fn method(mut self, method: reqwest::Method) -> Self {
        self.method = method;
        self
    }

    fn any_code(mut self) -> Self {
        self.code = None;
        self
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_4xx_with_a_json_error() -> anyhow::Result<()> {
    use reqwest::Method;
    let (cluster, _runners) = cluster_with(1).await?;
    let gateway = Gateway::start(&cluster, GatewayOptions::default()).await?;
    let inc = "/entities/counter/x/increment";
    let huge = format!(r#"{{"by": 1, "pad": "{}"}}"#, "x".repeat((1 << 20) + 10));
    let cases = vec![
        case("malformed JSON", inc, r#"{"by": "#, 400, "malformed_json"),
        case(
            "trailing garbage",
            inc,
            r#"{"by": 1} x"#,
            400,
            "malformed_json",
        ),
        case("wrong type", inc, r#"{"by": "x"}"#, 400, "bad_message"),
        case(
            "overflowing number",
            inc,
            r#"{"by": 1e400}"#,
            400,
            "malformed_json",
        ),
        case(
            "extra field",
            inc,
            r#"{"by": 1, "extra": true}"#,
            400,
            "bad_message",
        ),
        case(
            "missing field",
            "/entities/probe/p/sleep",
            "{}",
            400,
            "bad_message",
        ),
        case(
            "extra field on an empty message",
            "/entities/counter/x/get",
            r#"{"x": 1}"#,
            400,
            "bad_message",
        ),
        case("non-object body (array)", inc, "[1,2]", 400, "bad_body"),
        case("non-object body (string)", inc, r#""one""#, 400, "bad_body"),
        case("non-object body (null)", inc, "null", 400, "bad_body"),
        Case {
            body: b"{\"by\": \"\xff\"}".to_vec(),
            ..case("invalid UTF-8 in the body", inc, "", 400, "malformed_json")
        },
        case("huge body", inc, &huge, 413, "payload_too_large"),
        case(
            "unknown entity type",
            "/entities/nosuch/x/do",
            "{}",
            404,
            "unknown_entity_type",
        ),
        case(
            "unknown message",
            "/entities/counter/x/explode",
            "{}",
            400,
            "unknown_message",
        ),
        case(
            "invalid UTF-8 in the entity id",
            "/entities/counter/%FF/increment",
            "{}",
            400,
            "bad_path",
        ),
        case(
            "invalid UTF-8 in the entity type",
            "/entities/%FF%FE/x/increment",
            "{}",
            400,
            "bad_path",
        ),
        case(
            "invalid UTF-8 in the message",
            "/entities/counter/x/%C3%28",
            "{}",
            400,
            "bad_path",
        ),
        case(
            "bad entity type characters",
            "/entities/coun.ter/x/increment",
            "{}",
            400,
            "bad_entity_type",
        ),
        case(
            "space in the entity type",
            "/entities/coun%20ter/x/increment",
            "{}",
            400,
            "bad_entity_type",
        ),
        case(
            "control character in the entity id",
            "/entities/counter/a%0Ab/increment",
            "{}",
            400,
            "bad_entity_id",
        ),
        case(
            "entity id too long",
            &format!("/entities/counter/{}/increment", "i".repeat(513)),
            "{}",
            400,
            "bad_entity_id",
        ),
        case(
            "empty entity id",
            "/entities/counter//increment",
            "{}",
            400,
            "",
        )
        .any_code(),
        case(
            "Idempotency-Key on a volatile message",
            "/entities/counter/x/get",
            "{}",
            400,
            "not_persisted",
        )
        .header("idempotency-key", "k-1"),
        case(
            "empty Idempotency-Key",
            inc,
            "{}",
            400,
            "bad_idempotency_key",
        )
        .header("idempotency-key", ""),
        case(
            "Idempotency-Key too long",
            inc,
            "{}",
            400,
            "bad_idempotency_key",
        )
        .header("idempotency-key", "k".repeat(256)),
        case(
            "non-numeric X-Request-Timeout",
            inc,
            "{}",
            400,
            "bad_timeout",
        )
        .header("x-request-timeout", "soon"),
        case("zero X-Request-Timeout", inc, "{}", 400, "bad_timeout")
            .header("x-request-timeout", "0"),
        case("X-Request-Timeout in hours", inc, "{}", 400, "bad_timeout")
            .header("x-request-timeout", "1000h"),
        case("negative X-Request-Timeout", inc, "{}", 400, "bad_timeout")
            .header("x-request-timeout", "-5"),
        case(
            "?persisted=false on a persisted message",
            &format!("{inc}?persisted=false"),
            "{}",
            400,
            "persistence_mismatch",
        ),
        case(
            "?persisted=true on a volatile message",
            "/entities/counter/x/get?persisted=true",
            "{}",
            400,
            "persistence_mismatch",
        ),
        case(
            "?persisted=maybe",
            &format!("{inc}?persisted=maybe"),
            "{}",
            400,
            "bad_query",
        ),
        case("GET on the send route", inc, "", 405, "method_not_allowed").method(Method::GET),
        case(
            "DELETE on explain",
            "/entities/counter/x",
            "",
            405,
            "method_not_allowed",
        )
        .method(Method::DELETE),
        case(
            "POST on explain",
            "/entities/counter/x",
            "{}",
            405,
            "method_not_allowed",
        ),
        case(
            "PUT on /cluster",
            "/cluster",
            "{}",
            405,
            "method_not_allowed",
        )
        .method(Method::PUT),
        case("unknown route", "/nope", "", 404, "no_route").method(Method::GET),
        case(
            "unknown route under /entities",
            "/entities/counter/x/increment/more",
            "{}",
            404,
            "no_route",
        ),
        case(
            "explain of an unknown type",
            "/entities/nosuch/x",
            "",
            404,
            "unknown_entity_type",
        )
        .method(Method::GET),
        case(
            "explain with a bad type",
            "/entities/coun.ter/x",
            "",
            400,
            "bad_entity_type",
        )
        .method(Method::GET),
        case(
            "explain with invalid UTF-8",
            "/entities/counter/%FF",
            "",
            400,
            "bad_path",
        )
        .method(Method::GET),
    ];
    let mut failures = Vec::new();
    for case in &cases {
        let mut request = gateway
            .http
            .client
            .request(case.method.clone(), gateway.http.url(&case.path))
            .header("content-type", "application/json")
            .body(case.body.clone());
        for (name, value) in &case.headers {
            request = request.header(*name, value);
        }
        let response = match gateway.http.send(request).await {
            Ok(response) => response,
            Err(error) => {
                failures.push(format!("{}: no answer: {error:#}", case.what));
                continue;
            }
        };
        let shape = response.error();
        let problem = if response.status.as_u16() != case.status {
            Some(format!("status {}", response.status))
        } else if let Err(error) = &shape {
            Some(format!("error shape: {error:#}"))
        } else if response.request_id().is_none() {
            Some("no x-request-id".to_owned())
        } else if let (Some(code), Ok((got, _))) = (case.code, &shape)
            && code != got
        {
            Some(format!("code {got}, expected {code}"))
        } else {
            None
        };
        if let Some(problem) = problem {
            failures.push(format!(
                "{} ({} {}): {problem}; body {}",
                case.what,
                case.method,
                case.path.chars().take(80).collect::<String>(),
                response.text().chars().take(300).collect::<String>()
            ));
        } else {
            eprintln!(
                "{:45} → {} {}",
                case.what,
                response.status.as_u16(),
                shape.map(|(code, _)| code).unwrap_or_default()
            );
        }
    }
    ensure!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // Still serving, and nothing reached a handler.
    let ok = gateway
        .http
        .post_json("/entities/counter/x/increment", &json!({}), &[])
        .await?;
    ensure!(reply_count(&ok)? == 1, "{}", ok.text());
    Ok(())
}

// ---------------------------------------------------------------------------------------
// SIGKILL of the owner while requests are in flight
// ---------------------------------------------------------------------------------------

const KILL_ENTITIES: usize = 4;
const KILL_REQUESTS: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persisted_requests_survive_the_owners_kill_9() -> anyhow::Result<()> {
    let (cluster, mut runners) = cluster_with(3).await?;
    let gateway = Gateway::start(&cluster, GatewayOptions::default()).await?;
    let victim = runners[0].id().await?;

    // Entities owned by the victim.
    let snapshot = cluster.snapshot().await?;
    let entities = entities_on("k", |shard| snapshot.owners.get(&shard) == Some(&victim))?;

    let answered = Arc::new(AtomicUsize::new(0));
    let mut increments = JoinSet::new();
    for i in 0..KILL_REQUESTS {
        let http = gateway.http.clone();
        let entity = entities[i % KILL_ENTITIES].clone();
        let answered = answered.clone();
        increments.spawn(async move {
            let key = format!("inc-{i}");
            let mut resent = 0;
            loop {
                let response = http
                    .send(
                        http.client
                            .post(http.url(&format!("/entities/counter/{entity}/increment")))
                            .header("idempotency-key", &key)
                            .header("x-request-timeout", "60s")
                            .timeout(Duration::from_secs(90))
                            .json(&json!({})),
                    )
                    .await?;
                if response.status == StatusCode::OK {
                    answered.fetch_add(1, Ordering::Relaxed);
                    return anyhow::Ok((entity, reply_count(&response)?, resent));
                }
                // Only a retryable error may be sent again (with the same key).
                let (code, retryable) = response.error()?;
                ensure!(
                    retryable && resent < 10,
                    "{entity} `{key}`: {} {code} (sent {} times)",
                    response.status,
                    resent + 1
                );
                eprintln!(
                    "{entity} `{key}`: {} {code}; sending again",
                    response.status
                );
                resent += 1;
            }
        });
    }

    // Volatile reads of the same entities during the kill: never hang.
    let reads_stop = tokio_util::sync::CancellationToken::new();
    let mut reads = JoinSet::new();
    for entity in &entities {
        let (http, entity, stop) = (gateway.http.clone(), entity.clone(), reads_stop.clone());
        reads.spawn(async move {
            let mut seen: Vec<(u16, Option<String>)> = Vec::new();
            while !stop.is_cancelled() {
                let sent = Instant::now();
                let response = http
                    .send(
                        http.client
                            .post(http.url(&format!("/entities/counter/{entity}/get")))
                            .header("x-request-timeout", "5s")
                            .timeout(Duration::from_secs(10))
                            .json(&json!({})),
                    )
                    .await
                    .with_context(|| {
                        format!("get {entity}: no answer after {:?}", sent.elapsed())
                    })?;
                if response.status == StatusCode::OK {
                    seen.push((200, None));
                } else {
                    let (code, retryable) = response.error()?;
                    ensure!(
                        response.status == StatusCode::SERVICE_UNAVAILABLE && retryable,
                        "get {entity}: {} {code} retryable {retryable}",
                        response.status
                    );
                    seen.push((response.status.as_u16(), Some(code)));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            anyhow::Ok(seen)
        });
    }

    let started = Instant::now();
    wait_until(DEADLINE, "some increments are answered", || async {
        Ok(answered.load(Ordering::Relaxed) >= 20)
    })
    .await?;
    let before_kill = answered.load(Ordering::Relaxed);
    let killed_at = Instant::now();
    runners[0].kill()?;
    eprintln!(
        "killed the owner (runner {victim}) {:?} in, with {before_kill} of {KILL_REQUESTS} answered",
        killed_at - started
    );

    let mut counts: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut resent = 0;
    while let Some(joined) = increments.join_next().await {
        let (entity, count, n) = joined??;
        counts.entry(entity).or_default().push(count);
        resent += n;
    }
    let all_answered = killed_at.elapsed();
    // Keep reading a little past the failover, then stop.
    wait_until(DEADLINE, "the survivors own every shard", || async {
        let survivors = [runners[1].id().await?, runners[2].id().await?];
        cluster.all_owned_by(&survivors).await
    })
    .await?;
    reads_stop.cancel();
    let mut read_statuses: BTreeMap<String, usize> = BTreeMap::new();
    while let Some(joined) = reads.join_next().await {
        for (status, code) in joined?? {
            let key = match code {
                Some(code) => format!("{status} {code}"),
                None => status.to_string(),
            };
            *read_statuses.entry(key).or_default() += 1;
        }
    }
    eprintln!(
        "all {KILL_REQUESTS} increments answered 200 {all_answered:?} after the kill \
         ({resent} resent with the same key); volatile gets meanwhile: {read_statuses:?}"
    );

    let expected: Vec<i64> = (1..=(KILL_REQUESTS / KILL_ENTITIES) as i64).collect();
    for (entity, replies) in &mut counts {
        replies.sort_unstable();
        ensure!(*replies == expected, "{entity} answered {replies:?}");
        let get = gateway
            .http
            .post_json(&format!("/entities/counter/{entity}/get"), &json!({}), &[])
            .await?;
        ensure!(
            reply_count(&get)? == expected.len() as i64,
            "{entity}: {}",
            get.text()
        );
    }
    let (messages, processed, replies): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE processed),
                (SELECT count(*) FROM shoal_replies r JOIN shoal_messages m ON m.id = r.message_id
                  WHERE m.cluster = $1)
           FROM shoal_messages WHERE cluster = $1",
    )
    .bind(&cluster.name)
    .fetch_one(&cluster.pool)
    .await?;
    ensure!(
        messages == KILL_REQUESTS as i64 && processed == messages && replies == messages,
        "{messages} messages, {processed} processed, {replies} replies"
    );
    Ok(())
}

/// `KILL_ENTITIES` entity ids `<prefix>-<n>` whose shards satisfy `on`.
fn entities_on(prefix: &str, on: impl Fn(ShardId) -> bool) -> anyhow::Result<Vec<String>> {
    let sharding = sharding(SHARDS)?;
    let mut entities = Vec::new();
    for i in 0.. {
        let id = format!("{prefix}-{i}");
        if on(sharding.shard_of(&EntityId::new(&id)?)) {
            entities.push(id);
            if entities.len() == KILL_ENTITIES {
                break;
            }
        }
    }
    Ok(entities)
}

/// A runner frozen with SIGSTOP keeps its Postgres sessions (the kernel still answers for
/// it): the survivors must see it make no progress, end its sessions and take its shards,
/// and nothing it does after it wakes may commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persisted_requests_survive_a_frozen_owner() -> anyhow::Result<()> {
    const HANG_TIMEOUT: Duration = Duration::from_secs(3);
    let (cluster, runners) = cluster_with(3).await?;
    let gateway = Gateway::start(&cluster, GatewayOptions::default()).await?;
    let victim = runners[0].id().await?;
    let survivors = [runners[1].id().await?, runners[2].id().await?];
    let victim_epochs = runners[0].status().await?.owned;
    let entities = entities_on("f", |shard| victim_epochs.contains_key(&shard))?;

    let answered = Arc::new(AtomicUsize::new(0));
    let mut increments = JoinSet::new();
    for i in 0..KILL_REQUESTS {
        let http = gateway.http.clone();
        let entity = entities[i % KILL_ENTITIES].clone();
        let answered = answered.clone();
        increments.spawn(async move {
            let key = format!("frozen-{i}");
            for attempt in 1..=10 {
                let response = http
                    .send(
                        http.client
                            .post(http.url(&format!("/entities/counter/{entity}/increment")))
                            .header("idempotency-key", &key)
                            .header("x-request-timeout", "60s")
                            .timeout(Duration::from_secs(90))
                            .json(&json!({})),
                    )
                    .await?;
                if response.status == StatusCode::OK {
                    answered.fetch_add(1, Ordering::Relaxed);
                    return anyhow::Ok(entity);
                }
                let (code, retryable) = response.error()?;
                ensure!(
                    retryable,
                    "{entity} `{key}`: {} {code} (attempt {attempt})",
                    response.status
                );
            }
            anyhow::bail!("{entity} `{key}`: not answered in 10 attempts")
        });
    }
    wait_until(DEADLINE, "some increments are answered", || async {
        Ok(answered.load(Ordering::Relaxed) >= 20)
    })
    .await?;

    runners[0].freeze()?;
    let frozen_at = Instant::now();
    wait_until(DEADLINE, "the survivors own every shard", || {
        cluster.all_owned_by(&survivors)
    })
    .await?;
    let took = frozen_at.elapsed();
    let taken_over = chrono::Utc::now();
    eprintln!("SIGSTOP → the survivors own every shard: {took:?} (hang-timeout {HANG_TIMEOUT:?})");
    ensure!(
        took <= HANG_TIMEOUT + Duration::from_secs(1),
        "the frozen runner's shards moved after {took:?}, above hang-timeout + 1 s"
    );

    let mut per_entity: BTreeMap<String, i64> = BTreeMap::new();
    while let Some(joined) = increments.join_next().await {
        *per_entity.entry(joined??).or_default() += 1;
    }
    eprintln!("all {KILL_REQUESTS} increments answered 200");

    // Woken, the runner finds its session ended and fences; it commits nothing for its old
    // incarnation's shards.
    runners[0].thaw()?;
    wait_until(DEADLINE, "the woken runner fences and rejoins", || async {
        let view = runners[0].status().await?;
        Ok(view.fenced_count >= 1 && view.runner_id.is_some_and(|id| id != victim))
    })
    .await?;
    let late: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM shoal_messages m JOIN unnest($2::int4[], $3::int8[]) AS v(shard, epoch)
             ON v.shard = m.shard
          WHERE m.cluster = $1 AND m.processed AND m.processed_at > $4 AND m.epoch <= v.epoch",
    )
    .bind(&cluster.name)
    .bind(victim_epochs.keys().map(|s| s.get() as i32).collect::<Vec<_>>())
    .bind(victim_epochs.values().map(|e| e.get()).collect::<Vec<_>>())
    .bind(taken_over)
    .fetch_one(&cluster.pool)
    .await?;
    ensure!(
        late == 0,
        "{late} completions under the frozen runner's epochs after the takeover"
    );
    for (entity, sent) in &per_entity {
        let get = gateway
            .http
            .post_json(&format!("/entities/counter/{entity}/get"), &json!({}), &[])
            .await?;
        ensure!(
            reply_count(&get)? == *sent,
            "{entity}: {sent} distinct keys sent, {}",
            get.text()
        );
    }
    let log = runners[0].log();
    ensure!(log.contains("fencing"), "the woken runner fenced:\n{log}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Readiness
// ---------------------------------------------------------------------------------------

/// `/ready`: (status, names of the failing checks).
async fn readiness(gateway: &Gateway) -> anyhow::Result<(u16, BTreeSet<String>)> {
    let response = gateway.http.get("/ready").await?;
    let body = response.json()?;
    let checks = body["checks"]
        .as_object()
        .with_context(|| format!("no checks in {body}"))?;
    let failing = checks
        .iter()
        .filter(|(_, check)| check["ok"] != json!(true))
        .map(|(name, _)| name.clone())
        .collect();
    ensure!(
        body["ready"] == json!(response.status == 200),
        "ready flag disagrees with status {}: {body}",
        response.status
    );
    Ok((response.status.as_u16(), failing))
}

async fn await_readiness(
    gateway: &Gateway,
    what: &str,
    status: u16,
    failing: &[&str],
) -> anyhow::Result<Duration> {
    let failing: BTreeSet<String> = failing.iter().map(|s| (*s).to_owned()).collect();
    let waited = wait_until(DEADLINE, what, || async {
        Ok(readiness(gateway).await? == (status, failing.clone()))
    })
    .await;
    match waited {
        Ok(took) => Ok(took),
        Err(error) => {
            let last = gateway.http.get("/ready").await.map(|r| r.text());
            Err(error.context(format!("last /ready: {last:?}")))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_red_while_a_shard_is_unowned_and_never_for_one_entitys_backlog()
-> anyhow::Result<()> {
    let cluster = TestCluster::new(SHARDS).await?;
    // Started before any runner: nothing is owned yet.
    let gateway = Gateway::start(
        &cluster,
        GatewayOptions {
            env: vec![(
                "SHOAL__GATEWAY__READY_MAX_BACKLOG_AGE".to_owned(),
                "1s".to_owned(),
            )],
            redis_url: Some(shoal_testkit::redis::redis_url()),
            listen: None,
        },
    )
    .await?;
    let health = gateway.http.get("/health").await?;
    ensure!(health.status == 200, "/health: {}", health.status);
    let (status, failing) = readiness(&gateway).await?;
    ensure!(
        status == 503 && failing == BTreeSet::from(["shards_owned".to_owned()]),
        "no runner: {status} {failing:?}"
    );

    // Ten delivery attempts, so a failing message stays unprocessed for several seconds
    // (restart backoff 100 ms doubling to 3.2 s) before it is given up.
    let runner_options = RunnerOptions {
        env: vec![(
            "SHOAL__RUNNER__MAX_DELIVERY_ATTEMPTS".to_owned(),
            "10".to_owned(),
        )],
        ..RunnerOptions::default()
    };
    let mut runner = cluster.start_runner_with(runner_options.clone()).await?;
    let took = await_readiness(&gateway, "ready with one runner", 200, &[]).await?;
    eprintln!("/ready green {took:?} after the runner registered");

    // One entity's backlog: a message whose handler keeps panicking stays unprocessed.
    // Any caller can cause that, so it is reported but every gateway stays ready.
    let stuck = {
        let http = gateway.http.clone();
        tokio::spawn(async move {
            http.send(
                http.client
                    .post(http.url("/entities/probe/stuck/fail_until"))
                    .header("x-request-timeout", "120s")
                    .timeout(Duration::from_secs(150))
                    .json(&json!({"attempts": 1000})),
            )
            .await
        })
    };
    let sent = Instant::now();
    await_readiness(&gateway, "backlog reported, still ready", 200, &["backlog"]).await?;
    let red_at = sent.elapsed();
    let body = gateway.http.get("/ready").await?.json()?;
    ensure!(
        body["checks"]["backlog"]["affects_ready"] == json!(false),
        "the backlog check says it does not gate readiness: {body}"
    );
    await_readiness(
        &gateway,
        "no backlog after the message is given up",
        200,
        &[],
    )
    .await?;
    let green_at = sent.elapsed();
    let response = stuck.await??;
    let (code, retryable) = response.error()?;
    ensure!(
        response.status == 422 && code == "too_many_attempts" && !retryable,
        "the stuck message: {} {}",
        response.status,
        response.text()
    );
    let (processed, attempts): (bool, i32) = sqlx::query_as(
        "SELECT processed, attempts FROM shoal_messages WHERE cluster = $1 AND entity_id = 'stuck'",
    )
    .bind(&cluster.name)
    .fetch_one(&cluster.pool)
    .await?;
    ensure!(processed, "the given-up message is not processed");
    let restarts = runner
        .log()
        .lines()
        .filter(|l| l.contains("entity failed; restarting") && l.contains("probe/stuck"))
        .count();
    eprintln!(
        "one entity's backlog: reported {red_at:?} after the send, cleared {green_at:?} after \
         (given up with too_many_attempts; {restarts} restarts, {attempts} attempts counted)"
    );

    // Every runner gone: red; a new one: green.
    runner.kill()?;
    await_readiness(&gateway, "red: no owner", 503, &["shards_owned"]).await?;
    let _successor = cluster.start_runner_with(runner_options).await?;
    let took = await_readiness(&gateway, "green with the successor", 200, &[]).await?;
    eprintln!("/ready green again {took:?} after the successor registered");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// OpenAPI and metrics
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_and_metrics_are_served() -> anyhow::Result<()> {
    let cluster = TestCluster::new(SHARDS).await?;
    let gateway = Gateway::start(&cluster, GatewayOptions::default()).await?;
    let response = gateway.http.get("/openapi.json").await?;
    ensure!(response.status == 200, "{}", response.status);
    let content_type = response
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    ensure!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let doc = response.json()?;
    let version = doc["openapi"].as_str().unwrap_or_default();
    ensure!(version.starts_with("3."), "openapi: {version:?}");
    let paths = doc["paths"]
        .as_object()
        .with_context(|| "no paths".to_owned())?;
    for path in [
        "/entities/{entity_type}/{entity_id}/{message}",
        "/entities/{entity_type}/{entity_id}",
        "/cluster",
        "/health",
        "/ready",
        "/metrics",
        "/openapi.json",
    ] {
        ensure!(
            paths.contains_key(path),
            "{path} missing from {:?}",
            paths.keys().collect::<Vec<_>>()
        );
    }
    ensure!(
        paths["/entities/{entity_type}/{entity_id}/{message}"]
            .get("post")
            .is_some()
            && paths["/entities/{entity_type}/{entity_id}"]
                .get("get")
                .is_some(),
        "methods: {}",
        paths["/entities/{entity_type}/{entity_id}/{message}"]
    );

    // One request that fails, so both a success and an error are counted.
    let missing = gateway.http.get("/nope").await?;
    ensure!(missing.status == 404, "{}", missing.status);
    let metrics = gateway.http.get("/metrics").await?;
    ensure!(metrics.status == 200, "{}", metrics.status);
    let text = metrics.text();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("shoal_http_requests_total"))
        .collect();
    ensure!(
        lines
            .iter()
            .any(|l| l.contains(r#"route="/openapi.json""#) && l.contains(r#"status="200""#)),
        "no counted /openapi.json request: {lines:?}"
    );
    ensure!(
        lines.iter().any(|l| l.contains(r#"status="404""#)),
        "no counted 404: {lines:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// A type the gateway has and the owner does not (a rolling upgrade)
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_its_owner_lacks_waits_is_explained_and_ends_with_the_stored_error()
-> anyhow::Result<()> {
    let cluster = TestCluster::new(SHARDS).await?;
    let env = [
        ("SHOAL__RUNNER__SKIP_ENTITY_TYPES", "[\"probe\"]"),
        ("SHOAL__RUNNER__TYPE_WAIT_BACKOFF", "300ms"),
        ("SHOAL__RUNNER__MAX_DELIVERY_ATTEMPTS", "3"),
    ];
    let runner = cluster
        .start_runner_with(RunnerOptions {
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..RunnerOptions::default()
        })
        .await?;
    cluster.await_balanced(&[&runner]).await?;
    let gateway = Gateway::start(&cluster, GatewayOptions::default()).await?;
    let http = &gateway.http;
    let key = [("idempotency-key", "upgrade-1")];
    let path = "/entities/probe/p1/record";

    // Stored, and the caller is told it waits for its type: retryable, not "unknown".
    let sent = http.post_json(path, &json!({"value": 1}), &key).await?;
    ensure!(sent.status == 503, "{} {}", sent.status, sent.text());
    ensure!(
        sent.error()? == ("type_not_deployed".to_owned(), true),
        "{}",
        sent.text()
    );
    let explain = http.get("/entities/probe/p1").await?.json()?;
    ensure!(
        explain["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("not deployed on this runner")),
        "{explain}"
    );

    // After the bounded attempts the stored message is answered `unknown_entity_type`, and
    // that is what a retry under the same key reads.
    wait_until(
        DEADLINE,
        "the waiting message gets its final reply",
        || async {
            let retry = http.post_json(path, &json!({"value": 1}), &key).await?;
            Ok(retry.status == 422 && retry.error()?.0 == "unknown_entity_type")
        },
    )
    .await?;
    let explain = http.get("/entities/probe/p1").await?.json()?;
    ensure!(explain["unprocessed"] == json!(0), "{explain}");
    // Nothing is left stalled: readiness is green.
    await_readiness(&gateway, "ready with nothing waiting", 200, &[]).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Connection caps
// ---------------------------------------------------------------------------------------

/// Sends `head` on a new connection from 127.0.0.2 (a client of its own: the harness's
/// pooled connections come from 127.0.0.1) and reads what comes back until the server
/// closes it or a response head has arrived (whichever first), under [`DEADLINE`].
async fn raw_exchange(
    addr: std::net::SocketAddr,
    head: &[u8],
) -> anyhow::Result<(tokio::net::TcpStream, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::from(([127, 0, 0, 2], 0)))?;
    let mut stream = socket.connect(addr).await?;
    stream.write_all(head).await?;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(DEADLINE, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    read.context("the gateway neither answered nor closed the connection")?;
    Ok((stream, answer))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_and_one_clients_excess_connections_are_closed() -> anyhow::Result<()> {
    let cluster = TestCluster::new(SHARDS).await?;
    let gateway = Gateway::start(
        &cluster,
        GatewayOptions {
            env: vec![
                (
                    "SHOAL__GATEWAY__HEADER_READ_TIMEOUT".to_owned(),
                    "1s".to_owned(),
                ),
                (
                    "SHOAL__GATEWAY__MAX_CONNECTIONS_PER_CLIENT".to_owned(),
                    "3".to_owned(),
                ),
            ],
            redis_url: None,
            listen: None,
        },
    )
    .await?;
    let addr = gateway.addr;
    const GET: &[u8] = b"GET /health HTTP/1.1\r\nHost: gateway\r\n\r\n";

    // Headers without end: closed without an answer once the head's time is up.
    let (_, answer) =
        raw_exchange(addr, b"GET /health HTTP/1.1\r\nHost: gateway\r\nX-A: 1\r\n").await?;
    ensure!(
        answer.is_empty(),
        "a slow head got {:?}",
        String::from_utf8_lossy(&answer)
    );

    // Three kept-alive connections answered; the client's fourth is closed unanswered.
    let mut held = Vec::new();
    for i in 0..3 {
        let (stream, answer) = raw_exchange(addr, GET).await?;
        ensure!(
            answer.starts_with(b"HTTP/1.1 200"),
            "connection {i}: {:?}",
            String::from_utf8_lossy(&answer)
        );
        held.push(stream);
    }
    let (_, answer) = raw_exchange(addr, GET).await?;
    ensure!(
        answer.is_empty(),
        "a fourth connection got {:?}",
        String::from_utf8_lossy(&answer)
    );
    // A place freed is a place for the next connection.
    drop(held.pop());
    wait_until(
        DEADLINE,
        "a new connection is answered after one closed",
        || async {
            let (_, answer) = raw_exchange(addr, GET).await?;
            Ok(answer.starts_with(b"HTTP/1.1 200"))
        },
    )
    .await?;
    let metrics = gateway.http.get("/metrics").await;
    drop(held);
    let text = metrics?.text();
    ensure!(
        text.contains("shoal_gateway_connections_refused_total{reason=\"per_client\"}")
            && text.contains(
                "shoal_gateway_connections_refused_total{reason=\"header_read_timeout\"}"
            ),
        "both refusals counted"
    );
    Ok(())
}
