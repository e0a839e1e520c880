//! The typed client across processes: `client.entity::<Counter>(id)` against real
//! `shoal runner` processes over the HTTP/2 transport and Postgres, with the same types the
//! runners host (`shoal-cli`).

mod common;

use anyhow::{Context, ensure};
use common::gateway::{DEFAULT_SECRET, TestClient};
use common::{DEADLINE, TestCluster, wait_until};
use serde_json::json;
use shoal::client::ClientError;
use shoal_cli::counter::{Counter, CounterMessage, CounterReply};
use shoal_cli::probe::{Probe, ProbeMessage};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_asks_and_sends_reach_counters_on_real_runners() -> anyhow::Result<()> {
    let (cluster, _runners) = TestCluster::balanced(64, 2).await?;
    let client = TestClient::connect(&cluster, DEFAULT_SECRET, 4, true).await?;

    // Persisted ask: stored, run on its owner, the reply decoded.
    let counter = client.entity::<Counter>("typed-1");
    let reply = counter.ask(CounterMessage::Increment { by: 2 }).await?;
    ensure!(reply == CounterReply { count: 2 }, "reply {reply:?}");

    // Persisted send: the id of the stored message, whose reply is stored once it ran.
    let id = counter.send(CounterMessage::Increment { by: 3 }).await?;
    wait_until(DEADLINE, "the sent increment ran", || async {
        Ok(client.reply_of(id).await?.is_some())
    })
    .await?;

    // Volatile ask: read from the entity's memory.
    let read = counter.ask(CounterMessage::Get {}).await?;
    ensure!(read.count == 5, "count {}", read.count);
    let stored: i64 = sqlx::query_scalar(
        "SELECT (state->>'count')::int8 FROM shoal_entity_state
          WHERE cluster = $1 AND entity_type = 'counter' AND entity_id = 'typed-1'",
    )
    .bind(&cluster.name)
    .fetch_one(&cluster.pool)
    .await?;
    ensure!(stored == 5, "stored count {stored}");

    // A key deduplicates across the two asks: one increment.
    let keyed = counter.clone().with_key("typed-once");
    let first = keyed.ask(CounterMessage::Increment { by: 10 }).await?;
    let second = keyed.ask(CounterMessage::Increment { by: 10 }).await?;
    ensure!(
        first.count == 15 && second.count == 15,
        "{first:?} {second:?}"
    );

    // The handler's final error reply is a typed client error.
    let overflow = counter
        .ask(CounterMessage::Increment { by: i64::MAX })
        .await
        .err()
        .context("an overflowing increment is refused")?;
    ensure!(
        matches!(&overflow, ClientError::ErrorReply { code, .. } if code == "overflow"),
        "{overflow:?}"
    );

    // A second type through the same client: probe's volatile echo.
    let echoed = client
        .entity::<Probe>("typed-probe")
        .ask(ProbeMessage::Echo {
            value: json!({"hello": [1, 2]}),
        })
        .await?;
    ensure!(echoed == json!({"hello": [1, 2]}), "echo {echoed}");
    Ok(())
}
