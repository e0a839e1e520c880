//! The stream read by a client nobody here wrote: the browser's own `EventSource` in
//! headless Chromium (Debian's package, installed by the test set-up if missing). The
//! page is opened on the gateway's origin, so no CORS is involved. The browser receives
//! events published through another gateway, in order and filtered by topic; when its
//! gateway is killed (SIGKILL) and started again at the same address, the browser
//! reconnects by itself after the stream's `retry:` and sends `Last-Event-ID`, and gets
//! exactly the events published while it was away, then live ones.
//!
//! Cross-origin (`[gateway.cors]`): a page on an allowed origin (`http://localhost:<port>`
//! against the gateway at `http://127.0.0.1:<port>`) reads a plain `fetch`, a preflighted
//! `POST` with `Idempotency-Key`, the exposed `X-Request-Id`, and an `EventSource` (with an
//! `?access_token=` the gateway takes out of the URI); a page on an origin not listed
//! gets neither the fetch nor the stream.

mod common;

use std::time::Duration;

use anyhow::{Context, ensure};
use common::gateway::{Gateway, GatewayOptions};
use common::{DEADLINE, RunnerOptions, TestCluster, wait_until};
use serde_json::{Value, json};
use shoal_testkit::Browser;

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
        (
            "SHOAL__REDIS__API_LIMITS__ENABLED".to_owned(),
            "false".to_owned(),
        ),
        ("SHOAL__NOTIFICATIONS__RETRY".to_owned(), "500ms".to_owned()),
    ]
}

async fn gateway(
    cluster: &TestCluster,
    listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<Gateway> {
    Gateway::start(
        cluster,
        GatewayOptions {
            env: redis_env(cluster),
            redis_url: Some(shoal_testkit::redis::redis_url()),
            listen,
        },
    )
    .await
}

const SUBSCRIBE: &str = r#"
    window.seen = []; window.errors = 0; window.opened = 0;
    const source = new EventSource('/tenants/browser/events?topics=tick');
    source.addEventListener('tick', e => window.seen.push({id: e.lastEventId, data: JSON.parse(e.data)}));
    source.addEventListener('reset', e => window.seen.push({id: e.lastEventId, reset: e.data}));
    source.addEventListener('open', () => { window.opened += 1; });
    source.onerror = () => { window.errors += 1; };
    window.source = source;
    return true;
"#;

async fn seen(browser: &Browser) -> anyhow::Result<Vec<Value>> {
    let value = browser.execute("return window.seen;").await?;
    Ok(value.as_array().cloned().unwrap_or_default())
}

async fn publish(http: &common::gateway::Http, topic: &str, i: u64) -> anyhow::Result<()> {
    publish_on(http, "browser", topic, json!({"i": i}))
        .await
        .map(drop)
}

/// Publishes on `tenant`'s stream; the event's seq.
async fn publish_on(
    http: &common::gateway::Http,
    tenant: &str,
    topic: &str,
    data: Value,
) -> anyhow::Result<Value> {
    let answer = http
        .post_json(
            &format!("/tenants/{tenant}/events"),
            &json!({"topic": topic, "data": data}),
            &[],
        )
        .await?;
    ensure!(
        answer.status == 201,
        "publish: {} {}",
        answer.status,
        answer.text()
    );
    Ok(answer.json()?["seq"].clone())
}

fn ids(seen: &[Value]) -> Vec<String> {
    seen.iter()
        .map(|e| e["id"].as_str().unwrap_or("?").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromiums_event_source_reads_resumes_and_reconnects_by_itself() -> anyhow::Result<()> {
    let browser = Browser::start().await?;
    let cluster = TestCluster::new(16).await?;
    let runner = cluster
        .start_runner_with(RunnerOptions {
            env: redis_env(&cluster),
            ..RunnerOptions::default()
        })
        .await?;
    cluster.await_balanced(&[&runner]).await?;
    let mut near = gateway(&cluster, None).await?;
    let far = gateway(&cluster, None).await?;
    let addr = near.addr;
    browser.goto(&format!("http://{addr}/health")).await?;
    browser.execute(SUBSCRIBE).await?;
    wait_until(DEADLINE, "the EventSource is open", || async {
        Ok(browser.execute("return window.opened;").await? == json!(1))
    })
    .await?;
    // Published through the other gateway; `other` is filtered out.
    for i in 1..=6 {
        publish(&far.http, if i % 3 == 0 { "other" } else { "tick" }, i).await?;
    }
    wait_until(DEADLINE, "4 events in the browser", || async {
        Ok(seen(&browser).await?.len() >= 4)
    })
    .await?;
    let first = seen(&browser).await?;
    ensure!(ids(&first) == ["1", "2", "4", "5"], "{first:?}");
    // The browser's gateway dies; events go on through the other one.
    near.kill()?;
    wait_until(DEADLINE, "the browser saw the connection drop", || async {
        Ok(browser
            .execute("return window.errors;")
            .await?
            .as_u64()
            .unwrap_or(0)
            >= 1)
    })
    .await?;
    for i in 7..=12 {
        publish(&far.http, if i % 3 == 0 { "other" } else { "tick" }, i).await?;
    }
    let _restarted = gateway(&cluster, Some(addr)).await?;
    wait_until(DEADLINE, "the browser reconnected by itself", || async {
        Ok(browser
            .execute("return window.opened;")
            .await?
            .as_u64()
            .unwrap_or(0)
            >= 2)
    })
    .await?;
    publish(&far.http, "tick", 13).await?;
    wait_until(DEADLINE, "every event in the browser", || async {
        Ok(seen(&browser).await?.len() >= 9)
    })
    .await
    .with_context(|| "the browser missed events after reconnecting")?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let all = seen(&browser).await?;
    // Exactly the missed ones (7, 8, 10, 11 published while it was away), then 13: no
    // gap, no duplicate, no reset.
    ensure!(
        ids(&all) == ["1", "2", "4", "5", "7", "8", "10", "11", "13"],
        "{all:?}"
    );
    for event in &all {
        ensure!(
            event["data"]["i"]
                .as_u64()
                .map(|i| i.to_string())
                .as_deref()
                == event["id"].as_str(),
            "{event}"
        );
    }
    Ok(())
}

/// Runs `script` (which sets `window.done` when it is over) and waits for `window.done`.
async fn run_async(browser: &Browser, what: &str, script: &str) -> anyhow::Result<Value> {
    browser
        .execute(&format!("window.done = undefined; {script}; return true;"))
        .await?;
    wait_until(DEADLINE, what, || async {
        Ok(!browser.execute("return window.done;").await?.is_null())
    })
    .await?;
    browser.execute("return window.done;").await
}

const CROSS_ORIGIN_CALLS: &str = r#"
    const api = '{api}';
    (async () => {
        const out = {};
        try {
            const health = await fetch(api + '/cluster');
            out.get = health.status;
            out.request_id = health.headers.get('x-request-id');
            const posted = await fetch(api + '/tenants/web/events', {
                method: 'POST',
                headers: {'Content-Type': 'application/json', 'Idempotency-Key': 'web-1'},
                body: JSON.stringify({topic: 'tick', data: {from: 'browser'}}),
            });
            out.post = posted.status;
            out.seq = (await posted.json()).seq;
        } catch (e) {
            out.blocked = String(e);
        }
        window.done = out;
    })()
"#;

const CROSS_ORIGIN_STREAM: &str = r#"
    window.streamed = []; window.stream_errors = 0; window.stream_open = 0;
    const stream = new EventSource('{api}/tenants/web/events?topics=tick&access_token=unused-with-auth-off');
    stream.addEventListener('tick', e => window.streamed.push(e.lastEventId));
    stream.onopen = () => { window.stream_open += 1; };
    stream.onerror = () => { window.stream_errors += 1; };
    window.stream = stream;
    return true;
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_on_an_allowed_origin_calls_and_streams_and_another_is_blocked() -> anyhow::Result<()>
{
    let browser = Browser::start().await?;
    let cluster = TestCluster::new(16).await?;
    let runner = cluster
        .start_runner_with(RunnerOptions {
            env: redis_env(&cluster),
            ..RunnerOptions::default()
        })
        .await?;
    cluster.await_balanced(&[&runner]).await?;
    let port = shoal_testkit::free_port()?;
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let mut env = redis_env(&cluster);
    env.push((
        "SHOAL__GATEWAY__CORS__ALLOWED_ORIGINS".to_owned(),
        format!("[\"http://localhost:{port}\"]"),
    ));
    let _allowing = Gateway::start(
        &cluster,
        GatewayOptions {
            env,
            redis_url: Some(shoal_testkit::redis::redis_url()),
            listen: Some(addr),
        },
    )
    .await?;
    let other = gateway(&cluster, None).await?;
    let api = format!("http://127.0.0.1:{port}");

    // The allowed origin: same host, other name, so every call is cross-origin.
    browser
        .goto(&format!("http://localhost:{port}/health"))
        .await?;
    let calls = run_async(
        &browser,
        "the allowed page's calls",
        &CROSS_ORIGIN_CALLS.replace("{api}", &api),
    )
    .await?;
    ensure!(
        calls["get"] == 200 && calls["post"] == 201 && calls["seq"] == 1,
        "{calls}"
    );
    ensure!(
        calls["request_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty()),
        "X-Request-Id is exposed: {calls}"
    );
    browser
        .execute(&CROSS_ORIGIN_STREAM.replace("{api}", &api))
        .await?;
    wait_until(DEADLINE, "the cross-origin EventSource is open", || async {
        Ok(browser.execute("return window.stream_open;").await? == json!(1))
    })
    .await?;
    ensure!(publish_on(&other.http, "web", "tick", json!({})).await? == 2);
    wait_until(DEADLINE, "the event in the cross-origin stream", || async {
        Ok(browser.execute("return window.streamed;").await? == json!(["2"]))
    })
    .await?;

    // An origin not listed (the other gateway's): the browser withholds both.
    browser
        .goto(&format!("http://{}/health", other.addr))
        .await?;
    let calls = run_async(
        &browser,
        "the other page's calls",
        &CROSS_ORIGIN_CALLS.replace("{api}", &api),
    )
    .await?;
    ensure!(
        calls["blocked"]
            .as_str()
            .is_some_and(|e| e.contains("TypeError"))
            && calls.get("get").is_none(),
        "{calls}"
    );
    browser
        .execute(&CROSS_ORIGIN_STREAM.replace("{api}", &api))
        .await?;
    wait_until(DEADLINE, "the blocked EventSource fails", || async {
        Ok(browser
            .execute("return window.stream_errors;")
            .await?
            .as_u64()
            .unwrap_or(0)
            >= 1)
    })
    .await?;
    ensure!(publish_on(&other.http, "web", "tick", json!({})).await? == 3);
    ensure!(
        browser
            .execute("return [window.stream_open, window.streamed];")
            .await?
            == json!([0, []]),
        "the blocked page read nothing"
    );
    Ok(())
}
