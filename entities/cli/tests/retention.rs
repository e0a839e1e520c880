//! Retention end to end: runners with a short `retention.period` remove processed messages
//! and their replies (the `shoal-retention` singleton, on one runner), keep unprocessed
//! ones however old, honour an idempotency key inside the window, forget it after, and
//! publish the storage metrics.

mod common;

use std::time::Duration;

use anyhow::{Context, ensure};
use common::gateway::{Gateway, GatewayOptions, HttpResponse};
use common::{DEADLINE, Runner, RunnerOptions, TestCluster, wait_until};
use serde_json::json;

/// Shards of the test clusters.
const SHARDS: u32 = 64;
/// The short retention the runners run with (long enough that 30 sends on a loaded
/// machine finish well inside it).
const PERIOD: &str = "8s";

fn count_of(response: &HttpResponse) -> anyhow::Result<i64> {
    let body = response.json()?;
    body.pointer("/reply/count")
        .and_then(|c| c.as_i64())
        .with_context(|| format!("{}: no reply count in {body}", response.status))
}

async fn metric(runners: &[Runner], name: &str) -> anyhow::Result<f64> {
    let mut sum = 0.0;
    for runner in runners {
        let text = reqwest::Client::new()
            .get(format!("http://{}/metrics", runner.addr))
            .header("x-shoal-secret", shoal_testkit::process::CLUSTER_SECRET)
            .send()
            .await?
            .text()
            .await?;
        sum += text
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    Ok(sum)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processed_messages_go_after_the_period_and_unprocessed_ones_stay() -> anyhow::Result<()> {
    const SENDS: i64 = 30;
    let cluster = TestCluster::new(SHARDS).await?;
    let env = [
        ("SHOAL__RETENTION__PERIOD", PERIOD),
        ("SHOAL__RETENTION__INTERVAL", "200ms"),
        // Several batches per pass.
        ("SHOAL__RETENTION__BATCH_SIZE", "7"),
        ("SHOAL__RETENTION__BATCH_PAUSE", "10ms"),
    ];
    let options = RunnerOptions {
        env: env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..RunnerOptions::default()
    };
    let runners = vec![
        cluster.start_runner_with(options.clone()).await?,
        cluster.start_runner_with(options).await?,
    ];
    cluster
        .await_balanced(&runners.iter().collect::<Vec<_>>())
        .await?;
    let gateway = Gateway::start(&cluster, GatewayOptions::default()).await?;
    let http = &gateway.http;

    // An unprocessed message from January 2025 (snowflake time 1 ms), due tomorrow: old,
    // but never removed.
    sqlx::query(
        "INSERT INTO shoal_messages (id, cluster, shard, entity_type, entity_id, tag, payload,
                                     deliver_at)
         VALUES ($1, $2, 0, 'counter', 'later', 'increment', '{}', now() + interval '1 day')",
    )
    .bind(1_i64 << 22)
    .bind(&cluster.name)
    .execute(&cluster.pool)
    .await?;

    for i in 0..SENDS {
        let key = format!("k{i}");
        let sent = http
            .post_json(
                "/entities/counter/c/increment",
                &json!({}),
                &[("idempotency-key", &key)],
            )
            .await?;
        ensure!(count_of(&sent)? == i + 1, "send {i}: {}", sent.text());
    }
    // Inside the window the key is honoured: the stored reply, nothing counted.
    let again = http
        .post_json(
            "/entities/counter/c/increment",
            &json!({}),
            &[("idempotency-key", "k0")],
        )
        .await?;
    ensure!(count_of(&again)? == 1, "deduplicated: {}", again.text());

    let rows = |processed: bool| {
        let pool = cluster.pool.clone();
        let name = cluster.name.clone();
        async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM shoal_messages WHERE cluster = $1 AND processed = $2",
            )
            .bind(name)
            .bind(processed)
            .fetch_one(&pool)
            .await?;
            anyhow::Ok(n)
        }
    };
    ensure!(rows(true).await? == SENDS, "all kept inside the window");
    let took = wait_until(
        DEADLINE + Duration::from_secs(10),
        "processed rows are removed",
        || async {
            let replies: i64 = sqlx::query_scalar("SELECT count(*) FROM shoal_replies")
                .fetch_one(&cluster.pool)
                .await?;
            Ok(rows(true).await? == 0 && replies == 0)
        },
    )
    .await?;
    println!("processed rows removed {took:?} after the last send (period {PERIOD})");
    ensure!(
        rows(false).await? == 1,
        "the old unprocessed message is kept"
    );

    // Past the window the key is forgotten: the same send runs again.
    let late = http
        .post_json(
            "/entities/counter/c/increment",
            &json!({}),
            &[("idempotency-key", "k0")],
        )
        .await?;
    ensure!(
        count_of(&late)? == SENDS + 1,
        "a new message: {}",
        late.text()
    );

    wait_until(DEADLINE, "the metrics are published", || async {
        Ok(
            metric(&runners, "shoal_retention_purged_total").await? >= SENDS as f64
                && metric(&runners, "shoal_storage_oldest_kept_age_seconds").await? > 3600.0,
        )
    })
    .await?;
    Ok(())
}
