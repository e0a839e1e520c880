//! One caller's bad data stays its own, through a real gateway and real runners: persisted
//! bodies storage cannot hold (a NUL character) are refused with a 400 naming the field
//! while the requests batched beside them commit, and a handler result storage cannot hold
//! completes its message once with the error reply `unstorable_reply`.

mod common;

use std::collections::BTreeMap;

use anyhow::{Context, ensure};
use common::gateway::{Gateway, GatewayOptions, HttpResponse};
use common::{Runner, TestCluster};
use serde_json::json;
use tokio::task::JoinSet;

/// Shards of the test clusters.
const SHARDS: u32 = 64;

async fn cluster_with(runners: usize) -> anyhow::Result<(TestCluster, Vec<Runner>)> {
    TestCluster::balanced(SHARDS, runners).await
}

fn count_of(response: &HttpResponse) -> anyhow::Result<i64> {
    let body = response.json()?;
    body.pointer("/reply/count")
        .and_then(|c| c.as_i64())
        .with_context(|| format!("{}: no reply count in {body}", response.status))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_bodies_are_refused_alone_while_their_neighbours_commit() -> anyhow::Result<()> {
    const REQUESTS: usize = 300;
    const COUNTERS: usize = 10;
    let (cluster, _runners) = cluster_with(2).await?;
    let gateway = Gateway::start(&cluster, GatewayOptions::default()).await?;

    // Every fifteenth request (20 of 300) is a persisted probe record whose body holds a
    // NUL; the others increment one of ten counters. All are in flight at once.
    let bad = |i: usize| i % 15 == 7;
    let mut requests = JoinSet::new();
    for i in 0..REQUESTS {
        let http = gateway.http.clone();
        requests.spawn(async move {
            let key = format!("inc-{i}");
            let response = if bad(i) {
                let body = json!({ "value": { "list": ["fine", format!("a\u{0}b{i}")] } });
                http.post_json(&format!("/entities/probe/p{i}/record"), &body, &[])
                    .await
            } else {
                let path = format!("/entities/counter/c{}/increment", i % COUNTERS);
                http.post_json(&path, &json!({}), &[("idempotency-key", &key)])
                    .await
            };
            (i, response)
        });
    }
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    while let Some(joined) = requests.join_next().await {
        let (i, response) = joined?;
        let response = response?;
        *statuses.entry(response.status.as_u16()).or_default() += 1;
        if bad(i) {
            ensure!(
                response.status == 400,
                "bad {i}: {} {}",
                response.status,
                response.text()
            );
            let (code, retryable) = response.error()?;
            ensure!(
                code == "unstorable_body" && !retryable,
                "bad {i}: {}",
                response.text()
            );
            let message = response.json()?["error"]["message"].to_string();
            ensure!(
                message.contains("/value/list/1"),
                "bad {i} names the field: {message}"
            );
        } else {
            ensure!(
                response.status == 200,
                "good {i}: {} {}",
                response.status,
                response.text()
            );
        }
    }
    println!("{REQUESTS} requests: {statuses:?}");

    // Every good increment counted once, none of the bad ones stored.
    for c in 0..COUNTERS {
        let got = gateway
            .http
            .post_json(&format!("/entities/counter/c{c}/get"), &json!({}), &[])
            .await?;
        let expected = (0..REQUESTS)
            .filter(|i| !bad(*i) && i % COUNTERS == c)
            .count();
        ensure!(
            count_of(&got)? == expected as i64,
            "counter c{c}: {}",
            got.text()
        );
    }
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM shoal_messages WHERE entity_type = 'probe'")
            .fetch_one(&cluster.pool)
            .await?;
    ensure!(stored == 0, "{stored} bad bodies were stored");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unstorable_result_completes_once_while_its_neighbours_commit() -> anyhow::Result<()> {
    const REQUESTS: usize = 200;
    let (cluster, _runners) = cluster_with(2).await?;
    let gateway = Gateway::start(&cluster, GatewayOptions::default()).await?;

    // Every tenth request makes its probe produce a reply (or, alternately, a state) that
    // holds a NUL; the others record a value. All are in flight at once.
    let bad = |i: usize| i % 10 == 3;
    let mut requests = JoinSet::new();
    for i in 0..REQUESTS {
        let http = gateway.http.clone();
        requests.spawn(async move {
            let (path, body) = if bad(i) {
                let part = if i % 20 == 3 { "reply" } else { "state" };
                (
                    format!("/entities/probe/u{i}/unstorable"),
                    json!({ "part": part }),
                )
            } else {
                (
                    format!("/entities/probe/r{i}/record"),
                    json!({ "value": i }),
                )
            };
            let key = format!("req-{i}");
            let response = http
                .post_json(&path, &body, &[("idempotency-key", &key)])
                .await;
            (i, path, body, response)
        });
    }
    let mut unstorable = Vec::new();
    while let Some(joined) = requests.join_next().await {
        let (i, path, body, response) = joined?;
        let response = response?;
        if bad(i) {
            ensure!(
                response.status == 422,
                "bad {i}: {} {}",
                response.status,
                response.text()
            );
            let (code, retryable) = response.error()?;
            ensure!(
                code == "unstorable_reply" && !retryable,
                "bad {i}: {}",
                response.text()
            );
            unstorable.push((i, path, body));
        } else {
            ensure!(
                response.status == 200,
                "good {i}: {} {}",
                response.status,
                response.text()
            );
            ensure!(
                response.json()?["reply"] == json!({ "recorded": [i] }),
                "good {i}: {}",
                response.text()
            );
        }
    }

    // Completed once: processed, never redelivered, and a resend gets the stored reply.
    let rows: Vec<(bool, i32)> =
        sqlx::query_as("SELECT processed, attempts FROM shoal_messages WHERE entity_id LIKE 'u%'")
            .fetch_all(&cluster.pool)
            .await?;
    ensure!(
        rows.len() == unstorable.len(),
        "{} rows for {} messages",
        rows.len(),
        unstorable.len()
    );
    ensure!(
        rows.iter().all(|r| *r == (true, 0)),
        "processed once, no redelivery: {rows:?}"
    );
    for (i, path, body) in &unstorable {
        let key = format!("req-{i}");
        let again = gateway
            .http
            .post_json(path, body, &[("idempotency-key", &key)])
            .await?;
        ensure!(again.status == 422, "resend {i}: {}", again.text());
        ensure!(
            again.error()?.0 == "unstorable_reply",
            "resend {i}: {}",
            again.text()
        );
    }
    // A state that could not be stored was not kept in memory either.
    let state_case = unstorable
        .iter()
        .find(|(_, _, b)| b["part"] == "state")
        .context("a state case")?;
    let next = gateway
        .http
        .post_json(
            &format!("/entities/probe/u{}/record", state_case.0),
            &json!({ "value": "x" }),
            &[],
        )
        .await?;
    ensure!(
        next.json()?["reply"] == json!({ "recorded": ["x"] }),
        "{}",
        next.text()
    );
    Ok(())
}
