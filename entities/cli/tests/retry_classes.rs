//! Retry classes end to end: a real `shoal gateway` in front of a real runner. Each failure
//! answers `{"error": {"code", "message", "retryable", "retry"}}` with the class that says
//! what a resend can do, and the class holds: a stored message resent with its key runs
//! once; a volatile message whose runner died mid-handler says it may have run; a request
//! that reached no runner says resending is safe.

mod common;

use anyhow::{Context, ensure};
use common::gateway::{Gateway, GatewayOptions, Http, HttpResponse};
use common::{DEADLINE, TestCluster, wait_until};
use reqwest::StatusCode;
use serde_json::json;

/// Shards of the test cluster.
const SHARDS: u32 = 16;

/// The body's `(code, retry, retryable)`; fails unless `retryable` agrees with `retry`.
fn retry_of(response: &HttpResponse) -> anyhow::Result<(String, String)> {
    let (code, retryable) = response.error()?;
    let body = response.json()?;
    let retry = body
        .pointer("/error/retry")
        .and_then(|v| v.as_str())
        .with_context(|| format!("no string `error.retry` in {body}"))?
        .to_owned();
    ensure!(
        retryable == (retry != "never"),
        "retryable {retryable} disagrees with retry `{retry}`: {body}"
    );
    Ok((code, retry))
}

fn expect(
    response: &HttpResponse,
    status: StatusCode,
    retry: &str,
    what: &str,
) -> anyhow::Result<String> {
    let (code, class) = retry_of(response)?;
    ensure!(
        response.status == status && class == retry,
        "{what}: wanted {status} `{retry}`, got {} `{class}`: {}",
        response.status,
        response.text()
    );
    Ok(code)
}

/// Holds `probe/{id}` busy with a volatile sleep (in the background) until its mailbox
/// shows `depth` unfinished requests.
async fn hold(http: &Http, id: &str, ms: u64, depth: u64) -> anyhow::Result<()> {
    for _ in 0..depth {
        let http = http.clone();
        let path = format!("/entities/probe/{id}/sleep");
        tokio::spawn(async move { http.post_json(&path, &json!({"ms": ms}), &[]).await });
    }
    wait_until(DEADLINE, &format!("probe/{id} holds {depth}"), || async {
        let explain = http.get(&format!("/entities/probe/{id}")).await?.json()?;
        Ok(explain["mailbox_depth"].as_u64() >= Some(depth))
    })
    .await?;
    Ok(())
}

fn recorded(response: &HttpResponse) -> anyhow::Result<serde_json::Value> {
    ensure!(
        response.status == 200,
        "{} {}",
        response.status,
        response.text()
    );
    Ok(response.json()?["reply"]["recorded"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_carry_the_retry_class_that_holds() -> anyhow::Result<()> {
    let cluster = TestCluster::new(SHARDS).await?;
    let mut runner = cluster.start_runner().await?;
    cluster.await_balanced(&[&runner]).await?;
    let gateway = Gateway::start(&cluster, GatewayOptions::default()).await?;
    let http = &gateway.http;

    // Bad input and unknown types are final.
    let bad = http
        .post_raw("/entities/counter/c/increment", b"[1]".to_vec(), &[])
        .await?;
    expect(
        &bad,
        StatusCode::BAD_REQUEST,
        "never",
        "a body that is not an object",
    )?;
    let unknown = http
        .post_json("/entities/nobody/c/increment", &json!({}), &[])
        .await?;
    expect(&unknown, StatusCode::NOT_FOUND, "never", "an unknown type")?;

    // A full mailbox admitted nothing.
    hold(http, "full", 1500, 4).await?;
    let full = http
        .post_json("/entities/probe/full/echo", &json!({"value": 1}), &[])
        .await?;
    let code = expect(
        &full,
        StatusCode::TOO_MANY_REQUESTS,
        "safe",
        "a full mailbox",
    )?;
    ensure!(code == "mailbox_full", "{code}");

    // A stored message past its deadline runs; resent with its key it runs once.
    hold(http, "slow", 1500, 1).await?;
    let short = [("idempotency-key", "k1"), ("x-request-timeout", "200")];
    let late = http
        .post_json("/entities/probe/slow/record", &json!({"value": 1}), &short)
        .await?;
    expect(
        &late,
        StatusCode::GATEWAY_TIMEOUT,
        "safe_with_same_key",
        "a persisted message past its deadline",
    )?;
    // The same without a key: the caller cannot name the stored message again.
    let unkeyed = http
        .post_json(
            "/entities/probe/slow/record",
            &json!({"value": 2}),
            &[("x-request-timeout", "200")],
        )
        .await?;
    expect(
        &unkeyed,
        StatusCode::GATEWAY_TIMEOUT,
        "may_run_twice",
        "a persisted message without a key past its deadline",
    )?;
    let resent = http
        .post_json(
            "/entities/probe/slow/record",
            &json!({"value": 1}),
            &[("idempotency-key", "k1")],
        )
        .await?;
    ensure!(
        recorded(&resent)? == json!([1]),
        "the resend with the key is the stored message's reply: {}",
        resent.text()
    );
    let after = http
        .post_json(
            "/entities/probe/slow/record",
            &json!({"value": 3}),
            &[("idempotency-key", "k3")],
        )
        .await?;
    ensure!(
        recorded(&after)? == json!([1, 2, 3]),
        "value 1 ran once, before the unkeyed 2: {}",
        after.text()
    );

    // A volatile message whose runner is killed mid-handler may have run.
    let victim = {
        let http = http.clone();
        tokio::spawn(async move {
            http.post_json("/entities/probe/victim/sleep", &json!({"ms": 20_000}), &[])
                .await
        })
    };
    wait_until(DEADLINE, "probe/victim is handling its sleep", || async {
        let explain = http.get("/entities/probe/victim").await?.json()?;
        Ok(explain["mailbox_depth"].as_u64() >= Some(1))
    })
    .await?;
    runner.kill()?;
    let lost = victim.await??;
    let code = expect(
        &lost,
        StatusCode::SERVICE_UNAVAILABLE,
        "may_run_twice",
        "a volatile message whose runner died mid-handler",
    )?;
    ensure!(code == "owner_lost", "{code}");

    // With no runner left a volatile message reaches no handler: resending is safe
    // (503 no runners, or 504 after attempts that found nobody).
    let nobody = http
        .post_json(
            "/entities/probe/other/echo",
            &json!({"value": 1}),
            &[("x-request-timeout", "1000")],
        )
        .await?;
    let (code, retry) = retry_of(&nobody)?;
    ensure!(
        matches!(
            nobody.status,
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
        ) && retry == "safe",
        "no runner: {} {code} `{retry}`: {}",
        nobody.status,
        nobody.text()
    );
    Ok(())
}
