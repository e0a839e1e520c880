//! The stream read by a client nobody here wrote: the browser's own `EventSource` in
//! headless Chromium (Debian's package, installed by the test set-up if missing). The
//! page is opened on the gateway's origin, so no CORS is involved. The browser receives
//! events published through another gateway, in order and filtered by topic; when its
//! gateway is killed (SIGKILL) and started again at the same address, the browser
//! reconnects by itself after the stream's `retry:` and sends `Last-Event-ID`, and gets
//! exactly the events published while it was away, then live ones.

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
    let answer = http
        .post_json(
            "/tenants/browser/events",
            &json!({"topic": topic, "data": {"i": i}}),
            &[],
        )
        .await?;
    ensure!(
        answer.status == 201,
        "publish: {} {}",
        answer.status,
        answer.text()
    );
    Ok(())
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
