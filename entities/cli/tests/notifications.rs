//! Notifications across processes: real runners and gateways (`shoal runner`, `shoal
//! gateway`), the shared Postgres and Redis (a database and key prefix per test), SSE read
//! off the wire. A subscriber on one gateway gets, in order, what is published through
//! another; topics filter; `Last-Event-ID` (header and query) resumes exactly; the
//! owner's SIGKILL and a gateway's restart lose and repeat nothing; an id older than the
//! history gets `reset`, and so does one from before events past the max age (which are
//! no longer served, then pruned); an idle stream carries comment heartbeats at the
//! configured interval; a gateway whose carrier loses pushes gets them from the history by
//! its periodic sync, once each and in order; a subscriber that does not read is reset
//! without the gateway's memory growing; the subscriber cap answers 503; bad input is a
//! 400 naming the problem.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use common::gateway::{Gateway, GatewayOptions, Http};
use common::{DEADLINE, Runner, RunnerOptions, TestCluster, wait_until};
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};

const SHARDS: u32 = 64;

// ---------------------------------------------------------------------------------------
// A cluster with Redis
// ---------------------------------------------------------------------------------------

fn redis_env(cluster: &TestCluster) -> Vec<(String, String)> {
    vec![
        (
            "SHOAL__REDIS__URL".to_owned(),
            shoal_testkit::redis::redis_url(),
        ),
        (
            "SHOAL__REDIS__KEY_PREFIX".to_owned(),
            format!("shoal-test:{}", cluster.db.name),
        ),
    ]
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

async fn runners(
    cluster: &TestCluster,
    n: usize,
    extra: &[(&str, &str)],
) -> anyhow::Result<Vec<Runner>> {
    let mut started = Vec::new();
    for _ in 0..n {
        let mut env_vars = redis_env(cluster);
        env_vars.extend(env(extra));
        started.push(
            cluster
                .start_runner_with(RunnerOptions {
                    env: env_vars,
                    ..RunnerOptions::default()
                })
                .await?,
        );
    }
    cluster
        .await_balanced(&started.iter().collect::<Vec<_>>())
        .await?;
    Ok(started)
}

async fn gateway(cluster: &TestCluster, extra: &[(&str, &str)]) -> anyhow::Result<Gateway> {
    let mut env_vars = env(&[("SHOAL__REDIS__API_LIMITS__ENABLED", "false")]);
    env_vars.extend(env(extra));
    Gateway::start(
        cluster,
        GatewayOptions {
            env: env_vars,
            redis_url: Some(shoal_testkit::redis::redis_url()),
            listen: None,
        },
    )
    .await
}

async fn publish(http: &Http, tenant: &str, topic: &str, data: Value) -> anyhow::Result<u64> {
    publish_keyed(http, tenant, topic, data, None).await
}

async fn publish_keyed(
    http: &Http,
    tenant: &str,
    topic: &str,
    data: Value,
    key: Option<&str>,
) -> anyhow::Result<u64> {
    let headers: Vec<(&str, &str)> = key.map(|k| ("idempotency-key", k)).into_iter().collect();
    let answer = http
        .post_json(
            &format!("/tenants/{tenant}/events"),
            &json!({"topic": topic, "data": data}),
            &headers,
        )
        .await?;
    ensure!(
        answer.status == StatusCode::CREATED,
        "publish answered {}: {}",
        answer.status,
        answer.text()
    );
    answer.json()?["seq"].as_u64().context("no seq")
}

// ---------------------------------------------------------------------------------------
// An SSE reader (the independent clients are in `sse_clients.rs`)
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
struct Frame {
    id: Option<String>,
    event: String,
    data: String,
}

impl Frame {
    fn seq(&self) -> u64 {
        self.id.as_deref().and_then(|i| i.parse().ok()).unwrap_or(0)
    }
}

/// Checks that `frame` is an `expired` reset naming `oldest` (a seq, or null when nothing
/// is kept) and `newest`, with the id the stream resumes after; its data.
fn ensure_expired(frame: &Frame, oldest: Value, newest: u64, id: &str) -> anyhow::Result<Value> {
    ensure!(frame.event == "reset", "{frame:?}");
    let data: Value = serde_json::from_str(&frame.data)?;
    ensure!(
        data["reason"] == "expired" && data["oldest"] == oldest && data["newest"] == newest,
        "{data}"
    );
    ensure!(frame.id.as_deref() == Some(id), "{frame:?}");
    Ok(data)
}

struct Sse {
    response: reqwest::Response,
    buffer: String,
    retry: Option<u64>,
    /// The comment lines seen so far (heartbeats), in order.
    comments: Vec<String>,
}

impl Sse {
    async fn open(base: &str, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder().no_proxy().build()?;
        let mut request = client.get(format!("{base}{path}"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await?;
        if response.status() != StatusCode::OK {
            let status = response.status();
            bail!("subscribe answered {status}: {}", response.text().await?);
        }
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        ensure!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        Ok(Self {
            response,
            buffer: String::new(),
            retry: None,
            comments: Vec::new(),
        })
    }

    /// Takes the first complete block off the buffer: `Some(Some(frame))` for an event,
    /// `Some(None)` for a block of comments or `retry:` only (noted), `None` when no block
    /// is complete yet.
    fn block(&mut self) -> Option<Option<Frame>> {
        let end = self.buffer.find("\n\n")?;
        let block: String = self.buffer.drain(..end + 2).collect();
        let mut frame = Frame {
            id: None,
            event: "message".to_owned(),
            data: String::new(),
        };
        let mut has_event = false;
        for line in block.lines() {
            if line.starts_with(':') {
                self.comments.push(line.to_owned());
            } else if let Some((field, value)) = line.split_once(':') {
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "id" => frame.id = Some(value.to_owned()),
                    "event" => {
                        frame.event = value.to_owned();
                        has_event = true;
                    }
                    "data" => {
                        frame.data.push_str(value);
                        has_event = true;
                    }
                    "retry" => self.retry = value.parse().ok(),
                    _ => {}
                }
            }
        }
        Some(has_event.then_some(frame))
    }

    /// Reads the next chunk into the buffer; `false` when the stream ended.
    async fn fill(&mut self) -> anyhow::Result<bool> {
        match self.response.chunk().await? {
            Some(chunk) => {
                self.buffer.push_str(std::str::from_utf8(&chunk)?);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The next event frame (comments and `retry:`-only frames are noted and skipped);
    /// `None` when the stream ended.
    async fn next(&mut self) -> anyhow::Result<Option<Frame>> {
        loop {
            match self.block() {
                Some(Some(frame)) => return Ok(Some(frame)),
                Some(None) => continue,
                None => {}
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// Reads an idle stream until it has carried `n` comment lines in all; an event
    /// meanwhile, or the stream's end, is an error.
    async fn idle_until_comments(&mut self, n: usize) -> anyhow::Result<()> {
        loop {
            match self.block() {
                Some(Some(frame)) => bail!("an event on an idle stream: {frame:?}"),
                Some(None) => continue,
                None if self.comments.len() >= n => return Ok(()),
                None => {}
            }
            if !self.fill().await? {
                bail!("the stream ended after {:?}", self.comments);
            }
        }
    }

    /// The next `n` event frames, within [`DEADLINE`].
    async fn take(&mut self, n: usize) -> anyhow::Result<Vec<Frame>> {
        let mut frames = Vec::with_capacity(n);
        tokio::time::timeout(DEADLINE, async {
            while frames.len() < n {
                match self.next().await? {
                    Some(frame) => frames.push(frame),
                    None => bail!("the stream ended after {} frames", frames.len()),
                }
            }
            anyhow::Ok(())
        })
        .await
        .with_context(|| format!("{} of {n} frames within {DEADLINE:?}", frames.len()))??;
        Ok(frames)
    }
}

fn seqs(frames: &[Frame]) -> Vec<u64> {
    frames.iter().map(Frame::seq).collect()
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_published_through_one_gateway_reach_another_in_order_and_filtered()
-> anyhow::Result<()> {
    let cluster = TestCluster::new(SHARDS).await?;
    let _runners = runners(&cluster, 2, &[]).await?;
    let one = gateway(&cluster, &[]).await?;
    let two = gateway(&cluster, &[]).await?;
    let mut all = Sse::open(&one.http.base, "/tenants/acme/events", &[]).await?;
    let mut only_b = Sse::open(&one.http.base, "/tenants/acme/events?topics=b,c", &[]).await?;
    let mut other_tenant = Sse::open(&one.http.base, "/tenants/globex/events", &[]).await?;
    for i in 0..40 {
        let topic = if i % 2 == 0 { "a" } else { "b" };
        let seq = publish(&two.http, "acme", topic, json!({"i": i})).await?;
        ensure!(seq == i + 1, "publish {i} got seq {seq}");
    }
    publish(&two.http, "globex", "a", json!({"only": "globex"})).await?;
    let frames = all.take(40).await?;
    ensure!(
        seqs(&frames) == (1..=40).collect::<Vec<_>>(),
        "{:?}",
        seqs(&frames)
    );
    for (i, frame) in frames.iter().enumerate() {
        let data: Value = serde_json::from_str(&frame.data)?;
        ensure!(data["i"] == json!(i), "frame {i}: {frame:?}");
        ensure!(
            frame.event == if i % 2 == 0 { "a" } else { "b" },
            "{frame:?}"
        );
    }
    ensure!(all.retry == Some(2000), "retry: {:?}", all.retry);
    let filtered = only_b.take(20).await?;
    ensure!(
        filtered.iter().all(|f| f.event == "b")
            && seqs(&filtered) == (2..=40).step_by(2).collect::<Vec<_>>(),
        "{:?}",
        seqs(&filtered)
    );
    let globex = other_tenant.take(1).await?;
    ensure!(
        globex[0].seq() == 1 && globex[0].data.contains("globex"),
        "{globex:?}"
    );
    // A resend under the same key is the same event.
    let first = publish_keyed(&two.http, "acme", "a", json!({"k": 1}), Some("k-1")).await?;
    let again = publish_keyed(&one.http, "acme", "a", json!({"k": 1}), Some("k-1")).await?;
    ensure!(first == 41 && again == 41, "{first} {again}");
    let next = all.take(1).await?;
    ensure!(next[0].seq() == 41, "{next:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_resumes_with_exactly_the_missed_events() -> anyhow::Result<()> {
    let cluster = TestCluster::new(SHARDS).await?;
    let _runners = runners(&cluster, 1, &[]).await?;
    let gw = gateway(&cluster, &[]).await?;
    let mut first = Sse::open(&gw.http.base, "/tenants/t1/events", &[]).await?;
    for i in 0..10 {
        publish(&gw.http, "t1", "x", json!(i)).await?;
    }
    ensure!(seqs(&first.take(10).await?) == (1..=10).collect::<Vec<_>>());
    drop(first);
    for i in 10..20 {
        publish(&gw.http, "t1", "x", json!(i)).await?;
    }
    // The header.
    let mut header = Sse::open(
        &gw.http.base,
        "/tenants/t1/events",
        &[("last-event-id", "10")],
    )
    .await?;
    // The query, for clients that cannot set headers.
    let mut query = Sse::open(&gw.http.base, "/tenants/t1/events?last_event_id=15", &[]).await?;
    let missed = header.take(10).await?;
    ensure!(
        seqs(&missed) == (11..=20).collect::<Vec<_>>(),
        "{:?}",
        seqs(&missed)
    );
    let missed = query.take(5).await?;
    ensure!(
        seqs(&missed) == (16..=20).collect::<Vec<_>>(),
        "{:?}",
        seqs(&missed)
    );
    publish(&gw.http, "t1", "x", json!(20)).await?;
    ensure!(header.take(1).await?[0].seq() == 21);
    ensure!(query.take(1).await?[0].seq() == 21);
    // Bad input is a 400 naming the problem.
    for (path, headers, code) in [
        (
            "/tenants/t1/events",
            vec![("last-event-id", "abc")],
            "bad_last_event_id",
        ),
        ("/tenants/t1/events?topics=a%20b", vec![], "bad_query"),
        ("/tenants/bad%20tenant/events", vec![], "bad_tenant"),
        ("/tenants/t1/events?nope=1", vec![], "bad_query"),
    ] {
        let mut request = gw.http.client.get(gw.http.url(path));
        for (k, v) in headers {
            request = request.header(k, v);
        }
        let answer = gw.http.send(request).await?;
        ensure!(
            answer.status == StatusCode::BAD_REQUEST && answer.error()?.0 == code,
            "{path}: {} {}",
            answer.status,
            answer.text()
        );
    }
    let bad = gw
        .http
        .post_json(
            "/tenants/t1/events",
            &json!({"topic": "reset", "data": 1}),
            &[],
        )
        .await?;
    ensure!(
        bad.status == StatusCode::BAD_REQUEST && bad.error()?.0 == "bad_topic",
        "{}",
        bad.text()
    );
    let bad = gw
        .http
        .post_json("/tenants/t1/events", &json!({"topic": "a"}), &[])
        .await?;
    ensure!(
        bad.status == StatusCode::BAD_REQUEST && bad.text().contains("data"),
        "{}",
        bad.text()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_older_than_the_history_gets_reset_naming_the_oldest_kept() -> anyhow::Result<()> {
    let cluster = TestCluster::new(SHARDS).await?;
    let small = [
        ("SHOAL__NOTIFICATIONS__HISTORY_MAX_EVENTS", "5"),
        ("SHOAL__NOTIFICATIONS__PRUNE_EVERY", "1"),
    ];
    let _runners = runners(&cluster, 1, &small).await?;
    let gw = gateway(&cluster, &small).await?;
    for i in 0..20 {
        publish(&gw.http, "t", "x", json!(i)).await?;
    }
    let mut stream = Sse::open(
        &gw.http.base,
        "/tenants/t/events",
        &[("last-event-id", "2")],
    )
    .await?;
    let frames = stream.take(6).await?;
    ensure_expired(&frames[0], json!(16), 20, "15")?;
    ensure!(
        seqs(&frames[1..]) == (16..=20).collect::<Vec<_>>(),
        "{frames:?}"
    );
    // An id this tenant never gave: reset, then live.
    let mut stream = Sse::open(
        &gw.http.base,
        "/tenants/t/events",
        &[("last-event-id", "999")],
    )
    .await?;
    let frame = stream.take(1).await?;
    ensure!(
        frame[0].event == "reset" && frame[0].data.contains("unknown_id"),
        "{frame:?}"
    );
    publish(&gw.http, "t", "x", json!(20)).await?;
    ensure!(stream.take(1).await?[0].seq() == 21);
    Ok(())
}

/// The age the next test keeps events for: long enough that the events it publishes
/// after the first ones aged are still young when its last streams open, on a loaded
/// machine too.
const MAX_AGE: Duration = Duration::from_secs(8);

/// The tenant's events in the history table, whether served or not: (rows, all older than
/// [`MAX_AGE`] by the database's clock).
async fn stored(cluster: &TestCluster, tenant: &str) -> anyhow::Result<(i64, bool)> {
    Ok(sqlx::query_as(
        "SELECT count(*), coalesce(bool_and(published_at < now() - make_interval(secs => $3)), false)
           FROM shoal_notifications WHERE cluster = $1 AND tenant = $2",
    )
    .bind(&cluster.name)
    .bind(tenant)
    .bind(MAX_AGE.as_secs_f64())
    .fetch_one(&cluster.pool)
    .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_past_the_max_age_are_not_served_and_a_resume_before_them_is_reset()
-> anyhow::Result<()> {
    let cluster = TestCluster::new(SHARDS).await?;
    // The count bound (10000 by default) is far away: only the age removes anything.
    let max_age = format!("{}s", MAX_AGE.as_secs());
    let aging = [
        ("SHOAL__NOTIFICATIONS__HISTORY_MAX_AGE", max_age.as_str()),
        ("SHOAL__NOTIFICATIONS__PRUNE_EVERY", "1"),
    ];
    let _runners = runners(&cluster, 1, &aging).await?;
    let gw = gateway(&cluster, &aging).await?;
    for i in 0..5 {
        publish(&gw.http, "old", "x", json!(i)).await?;
    }
    wait_until(DEADLINE, "events 1-5 are past the max age", || async {
        Ok(stored(&cluster, "old").await? == (5, true))
    })
    .await?;
    // Still stored (no publish has pruned since), but no longer served: a resume from the
    // start is told that nothing it asks for is kept.
    let mut from_start = Sse::open(
        &gw.http.base,
        "/tenants/old/events",
        &[("last-event-id", "0")],
    )
    .await?;
    let reset = from_start.take(1).await?.remove(0);
    let data = ensure_expired(&reset, Value::Null, 5, "5")?;
    ensure!(data["resume_after"] == 5, "{data}");
    // The next publish prunes what is past the age.
    for i in 5..8 {
        publish(&gw.http, "old", "x", json!(i)).await?;
    }
    let (rows, _) = stored(&cluster, "old").await?;
    ensure!(rows == 3, "{rows} rows kept after the prune, not 3");
    // The stream that was reset goes on live, without another reset.
    let live = from_start.take(3).await?;
    ensure!(
        seqs(&live) == [6, 7, 8] && live.iter().all(|f| f.event == "x"),
        "{live:?}"
    );
    // A resume from before the aged events: reset naming the oldest kept, then the
    // younger events.
    let mut stale = Sse::open(
        &gw.http.base,
        "/tenants/old/events",
        &[("last-event-id", "2")],
    )
    .await?;
    let frames = stale.take(4).await?;
    ensure_expired(&frames[0], json!(6), 8, "5")?;
    ensure!(seqs(&frames[1..]) == [6, 7, 8], "{frames:?}");
    // A resume inside what is kept is served exactly, without a reset.
    let mut young = Sse::open(
        &gw.http.base,
        "/tenants/old/events",
        &[("last-event-id", "6")],
    )
    .await?;
    let frames = young.take(2).await?;
    ensure!(
        seqs(&frames) == [7, 8] && frames.iter().all(|f| f.event == "x"),
        "{frames:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_gets_a_comment_heartbeat_at_the_configured_interval() -> anyhow::Result<()>
{
    let cluster = TestCluster::new(SHARDS).await?;
    let _runners = runners(&cluster, 1, &[]).await?;
    let gw = gateway(&cluster, &[("SHOAL__NOTIFICATIONS__HEARTBEAT", "250ms")]).await?;
    let mut stream = Sse::open(&gw.http.base, "/tenants/quiet/events", &[]).await?;
    // Two heartbeats at 250 ms take half a second; at the default 15 s they would take 30.
    let within = Duration::from_secs(5);
    tokio::time::timeout(within, stream.idle_until_comments(2))
        .await
        .with_context(|| format!("2 heartbeats within {within:?}: {:?}", stream.comments))??;
    ensure!(
        stream.comments.iter().all(|c| c == ": heartbeat"),
        "{:?}",
        stream.comments
    );
    // The stream is still a working one.
    publish(&gw.http, "quiet", "x", json!(1)).await?;
    let frames = stream.take(1).await?;
    ensure!(frames[0].seq() == 1 && frames[0].event == "x", "{frames:?}");
    Ok(())
}

/// Reads `stream` until it has seen seq `last`, checking every seq once and in order.
async fn read_until(stream: &mut Sse, from: u64, last: u64) -> anyhow::Result<Vec<u64>> {
    let mut seen = Vec::new();
    let mut expected = from;
    tokio::time::timeout(DEADLINE * 2, async {
        while expected <= last {
            let Some(frame) = stream.next().await? else {
                bail!("the stream ended at {expected}");
            };
            ensure!(frame.event != "reset", "a reset at {expected}: {frame:?}");
            ensure!(
                frame.seq() == expected,
                "expected {expected}, got {frame:?}"
            );
            seen.push(frame.seq());
            expected += 1;
        }
        anyhow::Ok(())
    })
    .await
    .with_context(|| format!("seq {expected} of {last} in time"))??;
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owners_sigkill_loses_and_repeats_nothing_on_either_gateway() -> anyhow::Result<()> {
    let cluster = TestCluster::new(SHARDS).await?;
    let mut runners = runners(&cluster, 3, &[]).await?;
    let one = gateway(&cluster, &[]).await?;
    let two = gateway(&cluster, &[]).await?;
    let mut on_one = Sse::open(&one.http.base, "/tenants/kill/events", &[]).await?;
    let mut on_two = Sse::open(&two.http.base, "/tenants/kill/events", &[]).await?;
    const TOTAL: usize = 150;
    let publisher = {
        let http = two.http.clone();
        tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..TOTAL {
                let key = format!("event-{i}");
                // A resend under the same key until it answers: the key makes it one event.
                let seq = loop {
                    match publish_keyed(&http, "kill", "tick", json!({"i": i}), Some(&key)).await {
                        Ok(seq) => break seq,
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                };
                seqs.push(seq);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            seqs
        })
    };
    // Kill the tenant's owner once events flow.
    let first = on_one.take(20).await?;
    ensure!(seqs(&first) == (1..=20).collect::<Vec<_>>());
    // The notification type is internal; a shard is a function of the id alone, so the
    // public counter of the same id explains the same shard.
    let explain = one.http.get("/entities/counter/kill").await?.json()?;
    let owner = explain["owner_runner_id"].as_i64().context("an owner")?;
    let mut victim = None;
    for (i, runner) in runners.iter().enumerate() {
        if i64::from(runner.id().await?.get()) == owner {
            victim = Some(i);
        }
    }
    let victim = victim.context("the owner is one of the runners")?;
    runners[victim].kill()?;
    let published = publisher.await?;
    let unique: HashSet<u64> = published.iter().copied().collect();
    ensure!(unique.len() == TOTAL, "seqs given: {published:?}");
    let last = TOTAL as u64;
    ensure!(published.iter().max() == Some(&last), "{published:?}");
    read_until(&mut on_one, 21, last).await?;
    read_until(&mut on_two, 1, last).await?;
    // Every key's event once, in key order (publishes were sequential).
    let mut replay = Sse::open(
        &one.http.base,
        "/tenants/kill/events",
        &[("last-event-id", "0")],
    )
    .await?;
    let frames = replay.take(TOTAL).await?;
    for (i, frame) in frames.iter().enumerate() {
        let data: Value = serde_json::from_str(&frame.data)?;
        ensure!(
            data["i"] == json!(i) && frame.seq() == i as u64 + 1,
            "{i}: {frame:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateways_clients_resume_without_gap() -> anyhow::Result<()> {
    let cluster = TestCluster::new(SHARDS).await?;
    let _runners = runners(&cluster, 2, &[]).await?;
    let mut one = gateway(&cluster, &[]).await?;
    let two = gateway(&cluster, &[]).await?;
    let mut stream = Sse::open(&one.http.base, "/tenants/r/events", &[]).await?;
    for i in 0..10 {
        publish(&two.http, "r", "x", json!(i)).await?;
    }
    let seen = stream.take(10).await?;
    let last_id = seen.last().and_then(|f| f.id.clone()).context("an id")?;
    one.kill()?;
    ensure!(
        tokio::time::timeout(DEADLINE, stream.next()).await.is_ok(),
        "the stream of a killed gateway did not end"
    );
    for i in 10..25 {
        publish(&two.http, "r", "x", json!(i)).await?;
    }
    let restarted = gateway(&cluster, &[]).await?;
    let mut resumed = Sse::open(
        &restarted.http.base,
        "/tenants/r/events",
        &[("last-event-id", &last_id)],
    )
    .await?;
    read_until(&mut resumed, 11, 25).await?;
    publish(&two.http, "r", "x", json!(25)).await?;
    read_until(&mut resumed, 26, 26).await?;
    Ok(())
}

/// The channel `prefix`'s runners push on and its gateways listen to.
fn channel(prefix: &str) -> String {
    format!("{prefix}:notifications")
}

/// The seq of a push (an event as JSON) of `tenant`; `None` for another tenant's.
fn pushed_seq(payload: &str, tenant: &str) -> anyhow::Result<Option<u64>> {
    let event: Value = serde_json::from_str(payload)?;
    if event["tenant"] != tenant {
        return Ok(None);
    }
    Ok(Some(event["seq"].as_u64().context("a push without seq")?))
}

/// Publishes event `i` of tenant `lossy` and waits for the runner's push of it (its
/// payload).
async fn publish_and_tap(
    http: &Http,
    pushes: &mut (impl futures::Stream<Item = redis::Msg> + Unpin),
    i: u64,
) -> anyhow::Result<String> {
    let seq = publish(http, "lossy", "x", json!({"i": i})).await?;
    ensure!(seq == i, "publish {i} got seq {seq}");
    tokio::time::timeout(DEADLINE, async {
        loop {
            let push = pushes.next().await.context("the tap ended")?;
            let payload: String = push.get_payload()?;
            if pushed_seq(&payload, "lossy")? == Some(i) {
                return anyhow::Ok(payload);
            }
        }
    })
    .await
    .with_context(|| format!("the runner's push of {i}"))?
}

/// Publishes `payload` on `channel`, as a carrier would.
async fn relay(
    publisher: &mut redis::aio::MultiplexedConnection,
    channel: &str,
    payload: &str,
) -> anyhow::Result<()> {
    let _: i64 = redis::cmd("PUBLISH")
        .arg(channel)
        .arg(payload)
        .query_async(publisher)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_misses_pushes_catches_up_from_the_history_by_its_periodic_sync()
-> anyhow::Result<()> {
    let cluster = TestCluster::new(SHARDS).await?;
    let _runners = runners(&cluster, 1, &[]).await?;
    // The runner pushes on its prefix's channel; the gateway, under another prefix, listens
    // on a channel only this test publishes to. The test relays the runner's pushes to it
    // and withholds some: a carrier that loses pushes while the gateway's subscription
    // stays up (no resubscription, hence no catch-up of its own).
    let runner_prefix = format!("shoal-test:{}", cluster.db.name);
    let gateway_prefix = format!("{runner_prefix}:lossy");
    let gw = gateway(
        &cluster,
        &[
            ("SHOAL__REDIS__KEY_PREFIX", gateway_prefix.as_str()),
            ("SHOAL__NOTIFICATIONS__SYNC_INTERVAL", "300ms"),
        ],
    )
    .await?;
    let redis = redis::Client::open(shoal_testkit::redis::redis_url())?;
    let mut publisher = redis.get_multiplexed_async_connection().await?;
    let mut taps = redis.get_async_pubsub().await?;
    taps.subscribe(channel(&runner_prefix)).await?;
    let mut pushes = taps.into_on_message();
    let relayed = channel(&gateway_prefix);
    wait_until(DEADLINE, "the gateway listens on its channel", || {
        let mut publisher = publisher.clone();
        let relayed = relayed.clone();
        async move {
            let (_, listeners): (String, i64) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&relayed)
                .query_async(&mut publisher)
                .await?;
            Ok(listeners >= 1)
        }
    })
    .await?;
    let mut stream = Sse::open(&gw.http.base, "/tenants/lossy/events", &[]).await?;
    // 1-3 are relayed.
    for i in 1..=3 {
        let payload = publish_and_tap(&gw.http, &mut pushes, i).await?;
        relay(&mut publisher, &relayed, &payload).await?;
    }
    let relayed_frames = stream.take(3).await.context("the relayed events")?;
    ensure!(seqs(&relayed_frames) == [1, 2, 3], "{relayed_frames:?}");
    // 4-6 are lost, and nothing follows them that would show a gap: only the gateway's
    // periodic catch-up from the history can bring them.
    let mut withheld = Vec::new();
    for i in 4..=6 {
        withheld.push(publish_and_tap(&gw.http, &mut pushes, i).await?);
    }
    let caught_up = stream
        .take(3)
        .await
        .context("the lost events, from the history")?;
    ensure!(seqs(&caught_up) == [4, 5, 6], "{caught_up:?}");
    for (i, frame) in (4..).zip(&caught_up) {
        let data: Value = serde_json::from_str(&frame.data)?;
        ensure!(data["i"] == i && frame.event == "x", "{frame:?}");
    }
    // The lost pushes turn up late: nothing is delivered twice, and the next live one
    // follows without a gap.
    for payload in &withheld {
        relay(&mut publisher, &relayed, payload).await?;
    }
    let payload = publish_and_tap(&gw.http, &mut pushes, 7).await?;
    relay(&mut publisher, &relayed, &payload).await?;
    let next = stream.take(1).await?;
    ensure!(seqs(&next) == [7], "{next:?}");
    Ok(())
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

async fn metric(http: &Http, name: &str) -> anyhow::Result<f64> {
    let text = http.get("/metrics").await?.text();
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_does_not_read_is_reset_and_memory_stays_flat() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = TestCluster::new(SHARDS).await?;
    let _runners = runners(&cluster, 1, &[]).await?;
    let gw = gateway(
        &cluster,
        &[
            ("SHOAL__NOTIFICATIONS__SUBSCRIBER_BUFFER", "16"),
            ("SHOAL__NOTIFICATIONS__MAX_SUBSCRIBERS", "3"),
            // This test fills the gateway's cap with one tenant's streams.
            ("SHOAL__NOTIFICATIONS__MAX_SUBSCRIBERS_PER_TENANT", "3"),
        ],
    )
    .await?;
    let pid = gw.pid().context("gateway pid")?;
    // A client that sends its request and never reads: the kernel's buffers fill, then the
    // gateway's stream stops being polled, then its hub buffer overflows.
    let mut slow = tokio::net::TcpStream::connect(gw.addr).await?;
    let request = format!(
        "GET /tenants/slow/events HTTP/1.1\r\nhost: {}\r\naccept: text/event-stream\r\nconnection: close\r\n\r\n",
        gw.addr
    );
    slow.write_all(request.as_bytes()).await?;
    let mut fast = Sse::open(&gw.http.base, "/tenants/slow/events", &[]).await?;
    wait_until(DEADLINE, "both subscribed", || async {
        Ok(metric(&gw.http, "shoal_notify_subscribers").await? >= 2.0)
    })
    .await?;
    let before = rss_kib(pid)?;
    let blob = "x".repeat(64 * 1024);
    let reader = tokio::spawn(async move {
        let mut n = 0;
        while let Ok(Some(frame)) = fast.next().await {
            if frame.event == "reset" {
                bail!("the reading subscriber was reset: {frame:?}");
            }
            n += 1;
            if n == 400 {
                break;
            }
        }
        anyhow::Ok(n)
    });
    let mut peak = before;
    for i in 0..400 {
        publish(&gw.http, "slow", "big", json!({"i": i, "blob": blob})).await?;
        if i % 20 == 0 {
            peak = peak.max(rss_kib(pid)?);
        }
    }
    ensure!(
        reader.await?? == 400,
        "the reading subscriber missed events"
    );
    wait_until(DEADLINE, "the slow subscriber is dropped", || async {
        Ok(metric(&gw.http, "shoal_notify_slow_dropped_total").await? >= 1.0)
    })
    .await?;
    peak = peak.max(rss_kib(pid)?);
    // 400 × 64 KiB = 25 MiB went out; the slow subscriber's share is bounded by its
    // 16-event buffer and the socket buffers, not by what was published.
    ensure!(
        peak < before + 32 * 1024,
        "RSS grew from {before} KiB to {peak} KiB"
    );
    // The slow client's connection was ended: reading it to the end terminates.
    let mut sink = Vec::new();
    tokio::time::timeout(DEADLINE, slow.read_to_end(&mut sink))
        .await
        .context("the slow subscriber's connection did not end")??;
    let text = String::from_utf8_lossy(&sink);
    ensure!(
        text.contains("event: reset") && text.contains("slow_consumer"),
        "no reset frame at the end"
    );
    // The cap: 3 subscribers, the 4th is refused with 503 — and so is an extraction's
    // stream, which takes its place under the same cap.
    let body = json!({"text": "Ada Lovelace met Charles Babbage.", "ontology_id": "foaf"});
    let extraction = gw
        .http
        .post_json("/extractions?wait=true", &body, &[])
        .await?;
    ensure!(extraction.status == StatusCode::OK, "{}", extraction.text());
    let extraction = extraction.json()?["id"]
        .as_str()
        .context("an extraction id")?
        .to_owned();
    let _a = Sse::open(&gw.http.base, "/tenants/cap/events", &[]).await?;
    let _b = Sse::open(&gw.http.base, "/tenants/cap/events", &[]).await?;
    let _c = Sse::open(&gw.http.base, "/tenants/cap/events", &[]).await?;
    // Another tenant's (a fourth `cap` stream would meet its tenant's cap first).
    let refused = gw.http.get("/tenants/other/events").await?;
    ensure!(
        refused.status == StatusCode::SERVICE_UNAVAILABLE
            && refused.error()?.0 == "too_many_subscribers",
        "{} {}",
        refused.status,
        refused.text()
    );
    let refused = gw
        .http
        .get(&format!("/extractions/{extraction}/events"))
        .await?;
    ensure!(
        refused.status == StatusCode::SERVICE_UNAVAILABLE
            && refused.error()?.0 == "too_many_subscribers",
        "{} {}",
        refused.status,
        refused.text()
    );
    // Readiness does not depend on subscribers.
    ensure!(gw.http.get("/ready").await?.status == StatusCode::OK);
    ensure!(metric(&gw.http, "shoal_notify_delivered_total").await? >= 400.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_jobs_publish_their_changes_on_its_stream_and_stay_its_own() -> anyhow::Result<()>
{
    let cluster = TestCluster::new(SHARDS).await?;
    let _runners = runners(&cluster, 2, &[]).await?;
    let gw = gateway(&cluster, &[]).await?;
    let http = &gw.http;
    let mut stream = Sse::open(&http.base, "/tenants/acme/events?topics=job", &[]).await?;

    let acme = [("x-tenant-id", "acme")];
    let body = json!({"type": "diag.flaky", "payload": {"fail_times": 1}, "key": "order-1",
                      "backoff": {"first_ms": 100, "max_ms": 100}});
    let enqueued = http.post_json("/jobs", &body, &acme).await?;
    ensure!(
        enqueued.status == StatusCode::ACCEPTED,
        "{}",
        enqueued.text()
    );
    let id = enqueued.json()?["id"].as_str().context("id")?.to_owned();

    // Each committed change once, in order: enqueued, the failed attempt, the success.
    let frames = stream.take(3).await?;
    let changes: Vec<(String, u64)> = frames
        .iter()
        .map(|f| {
            let data: Value = serde_json::from_str(&f.data)?;
            ensure!(f.event == "job" && data["id"] == id.as_str(), "{f:?}");
            Ok((
                data["status"].as_str().unwrap_or_default().to_owned(),
                data["attempts"].as_u64().unwrap_or(99),
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let expected = [("queued", 0), ("retrying", 1), ("succeeded", 2)]
        .map(|(s, n)| (s.to_owned(), n))
        .to_vec();
    ensure!(changes == expected, "{changes:?}");

    // Another tenant neither sees the job nor lists it, nor shares its key.
    let globex = [("x-tenant-id", "globex")];
    let path = format!("/jobs/{id}");
    let theirs = http
        .send(
            http.client
                .get(http.url(&path))
                .header("x-tenant-id", "globex"),
        )
        .await?;
    ensure!(theirs.status == StatusCode::NOT_FOUND, "{}", theirs.text());
    let ours = http
        .send(
            http.client
                .get(http.url(&path))
                .header("x-tenant-id", "acme"),
        )
        .await?;
    ensure!(ours.status == StatusCode::OK, "{}", ours.text());
    ensure!(ours.json()?["tenant"] == "acme", "{}", ours.text());
    let listed = http
        .send(
            http.client
                .get(http.url("/jobs"))
                .header("x-tenant-id", "globex"),
        )
        .await?;
    ensure!(listed.json()?["jobs"] == json!([]), "{}", listed.text());
    let same_key = http.post_json("/jobs", &body, &globex).await?;
    let other = same_key.json()?["id"].as_str().context("id")?.to_owned();
    ensure!(other != id, "two tenants' equal keys named one job");

    // The tenant comes from the header (or the token), never from the body.
    let forged = json!({"type": "diag.noop", "payload": {}, "tenant": "acme"});
    let refused = http.post_json("/jobs", &forged, &globex).await?;
    ensure!(
        refused.status == StatusCode::BAD_REQUEST,
        "{}",
        refused.text()
    );
    ensure!(refused.text().contains("tenant"), "{}", refused.text());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extraction_reports_its_steps_on_the_requesting_tenants_stream() -> anyhow::Result<()> {
    let cluster = TestCluster::new(SHARDS).await?;
    let _runners = runners(&cluster, 2, &[]).await?;
    let gw = gateway(&cluster, &[]).await?;
    let http = &gw.http;
    let mut stream = Sse::open(&http.base, "/tenants/acme/events?topics=extraction", &[]).await?;
    let body =
        json!({"text": "Marie Curie worked at the University of Paris.", "ontology_id": "foaf"});
    let answer = http
        .post_json("/extractions", &body, &[("x-tenant-id", "acme")])
        .await?;
    ensure!(
        answer.status == StatusCode::ACCEPTED || answer.status == StatusCode::OK,
        "{} {}",
        answer.status,
        answer.text()
    );
    let id = answer.json()?["id"].as_str().context("id")?.to_owned();
    // started, one progress per stage in order, complete: each once.
    let frames = stream.take(7).await?;
    let steps: Vec<String> = frames
        .iter()
        .map(|f| {
            let data: Value = serde_json::from_str(&f.data)?;
            ensure!(
                f.event == "extraction" && data["id"] == id.as_str(),
                "{f:?}"
            );
            let kind = data["kind"].as_str().unwrap_or_default();
            Ok(match data["stage"].as_str() {
                Some(stage) => format!("{kind}:{stage}"),
                None => kind.to_owned(),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let expected = [
        "started",
        "progress:preprocess",
        "progress:entities",
        "progress:resolve",
        "progress:relations",
        "progress:persist",
        "complete",
    ];
    ensure!(steps == expected, "{steps:?}");
    Ok(())
}
