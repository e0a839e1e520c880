//! Handlers that call other entities, across real `shoal runner` processes and Postgres:
//! a probe's `remind` (a durable timer to itself) arrives once and on time, also when its
//! runner is SIGKILLed before it is due; a probe's `forward` (state change + send, through
//! the transactional outbox) delivers each message exactly once, exactly when the sender's
//! state change committed, with runners killed at random points under load.
//!
//! Numbers (lateness, kills, replays) are printed; `--nocapture` shows them.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use common::gateway::{DEFAULT_SECRET, TestClient, sharding};
use common::{DEADLINE, TestCluster, wait_until};
use serde_json::json;
use shoal::client::{Request, ShoalClient};
use shoal::ids::{EntityAddress, EntityId, EntityType, RunnerId};
use shoal::message_storage::Reply;
use tokio::task::JoinSet;

/// Shards of these clusters (quick to balance).
const SHARDS: u32 = 64;
/// The runners' `scan-interval` (the default): a due message waits at most about this.
const SCAN_TICK: Duration = Duration::from_secs(1);

fn probe(id: &str) -> anyhow::Result<EntityAddress> {
    Ok(EntityAddress {
        entity_type: EntityType::new("probe")?,
        entity_id: EntityId::new(id)?,
    })
}

/// Asks until a reply comes, resending with the same key on retryable errors.
async fn ask_until_replied(client: &ShoalClient, request: Request) -> anyhow::Result<Reply> {
    let started = Instant::now();
    loop {
        match client.ask(request.clone()).await {
            Ok(reply) => return Ok(reply),
            Err(error) if error.is_retryable() && started.elapsed() < Duration::from_secs(90) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => bail!("{}: {error}", request.address),
        }
    }
}

/// What a probe's committed state has recorded.
async fn recorded(cluster: &TestCluster, id: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let state: Option<serde_json::Value> = sqlx::query_scalar(
        "SELECT state->'recorded' FROM shoal_entity_state
          WHERE cluster = $1 AND entity_type = 'probe' AND entity_id = $2",
    )
    .bind(&cluster.name)
    .bind(id)
    .fetch_optional(&cluster.pool)
    .await?;
    Ok(match state {
        Some(serde_json::Value::Array(values)) => values,
        _ => Vec::new(),
    })
}

/// An entity id whose shard `owner` owns.
async fn entity_on(cluster: &TestCluster, owner: RunnerId, prefix: &str) -> anyhow::Result<String> {
    let owners = cluster.snapshot().await?.owners;
    let sharding = sharding(SHARDS)?;
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|id| {
            EntityId::new(id).is_ok_and(|e| owners.get(&sharding.shard_of(&e)) == Some(&owner))
        })
        .context("an entity on that runner")
}

/// Schedules `record` 2 s ahead on `id` and checks it ran once, not before its time and
/// within a scan tick (plus `slack`) of it. Returns how late it ran.
async fn remind_and_check(
    cluster: &TestCluster,
    client: &ShoalClient,
    id: &str,
    after_kill: impl AsyncFnOnce() -> anyhow::Result<()>,
    slack: Duration,
) -> anyhow::Result<Duration> {
    let request = Request::persisted(probe(id)?, "remind", json!({"after_ms": 2000, "value": id}))
        .with_key(format!("remind-{id}"));
    let reply = ask_until_replied(client, request).await?;
    ensure!(matches!(reply, Reply::Ok { .. }), "remind: {reply:?}");
    after_kill().await?;
    wait_until(DEADLINE, "the reminder is recorded", || async {
        Ok(!recorded(cluster, id).await?.is_empty())
    })
    .await?;
    // Only processed rows: the time it ran, against the time it was due.
    let rows: Vec<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT deliver_at, processed_at FROM shoal_messages
              WHERE cluster = $1 AND entity_id = $2 AND tag = 'record'",
    )
    .bind(&cluster.name)
    .bind(id)
    .fetch_all(&cluster.pool)
    .await?;
    ensure!(rows.len() == 1, "{} record messages stored", rows.len());
    let (due, ran) = rows[0];
    let late = (ran - due).to_std().context("ran before it was due")?;
    ensure!(late <= SCAN_TICK + slack, "ran {late:?} after it was due");
    // No scan or push runs it again.
    tokio::time::sleep(SCAN_TICK * 2).await;
    ensure!(
        recorded(cluster, id).await? == vec![json!(id)],
        "recorded once"
    );
    Ok(late)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reminder_arrives_once_on_time_also_when_its_runner_is_killed() -> anyhow::Result<()> {
    let (cluster, mut runners) = TestCluster::balanced(SHARDS, 2).await?;
    let client = TestClient::connect(&cluster, DEFAULT_SECRET, 4, true).await?;

    let id = entity_on(&cluster, runners[0].id().await?, "timer").await?;
    let late = remind_and_check(&cluster, &client, &id, async || Ok(()), Duration::ZERO).await?;
    eprintln!("reminder ran {late:?} after its instant");

    // Scheduled on runner 0, which is killed before the instant: runner 1 takes the shard
    // over and runs it (failover takes about a second, well inside the 2 s).
    let victim = runners[0].id().await?;
    let id = entity_on(&cluster, victim, "timer-killed").await?;
    let killed = &mut runners[0];
    let late = remind_and_check(
        &cluster,
        &client,
        &id,
        async || killed.kill(),
        Duration::from_millis(500),
    )
    .await?;
    eprintln!("reminder scheduled on killed runner {victim} ran {late:?} after its instant");
    drop(runners);
    Ok(())
}

/// A random number below `n` (std's randomly keyed hasher: no extra dependency).
fn random_below(n: usize) -> usize {
    use std::hash::BuildHasher;
    let random = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    (random % n.max(1) as u64) as usize
}

/// Forwarding probes and the probes they forward to.
const SENDERS: usize = 12;
const SINKS: usize = 4;
/// Forwards per sender.
const FORWARDS: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_arrive_exactly_once_exactly_when_the_sender_committed_under_kills()
-> anyhow::Result<()> {
    let (cluster, mut runners) = TestCluster::balanced(SHARDS, 3).await?;
    let client = TestClient::connect(&cluster, DEFAULT_SECRET, 4, true).await?;
    let answered = Arc::new(AtomicUsize::new(0));
    let mut senders = JoinSet::new();
    for s in 0..SENDERS {
        let (client, answered) = (client.client.clone(), answered.clone());
        senders.spawn(async move {
            for k in 0..FORWARDS {
                let value = format!("s{s}-{k}");
                let to = format!("sink-{}", (s + k) % SINKS);
                // Holding the sender after its send widens the window a kill can hit
                // between the send and the commit.
                let body = json!({"to": to, "value": value, "hold_ms": 20});
                let request = Request::persisted(probe(&format!("fwd-{s}"))?, "forward", body)
                    .with_key(value.clone())
                    .with_timeout(Duration::from_secs(20));
                let reply = ask_until_replied(&client, request).await?;
                ensure!(matches!(reply, Reply::Ok { .. }), "{value}: {reply:?}");
                answered.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }

    // Kill a runner at a random point of each third, and start a new one in its place.
    let total = SENDERS * FORWARDS;
    let mut kills = Vec::new();
    for third in 1..=2 {
        let at = total * third / 3 - random_below(total / 6);
        wait_until(Duration::from_secs(120), "forwards answered", || async {
            Ok(answered.load(Ordering::Relaxed) >= at)
        })
        .await?;
        let mut victim = runners.remove(random_below(runners.len()));
        kills.push((victim.id().await?, answered.load(Ordering::Relaxed)));
        victim.kill()?;
        runners.push(cluster.start_runner().await?);
    }
    while let Some(joined) = senders.join_next().await {
        joined??;
    }
    eprintln!("{total} forwards; killed (runner, answered so far): {kills:?}");

    // Every sender's committed entries, and every sink's, once all sinks caught up.
    let mut sent: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for s in 0..SENDERS {
        for entry in recorded(&cluster, &format!("fwd-{s}")).await? {
            let value = entry["value"].as_str().context("a value")?.to_owned();
            ensure!(
                sent.insert(value.clone(), entry).is_none(),
                "{value} committed twice"
            );
        }
    }
    ensure!(
        sent.len() == total,
        "{} of {total} forwards committed",
        sent.len()
    );
    wait_until(
        DEADLINE,
        "every forward is recorded by its sink",
        || async {
            let mut n = 0;
            for sink in 0..SINKS {
                n += recorded(&cluster, &format!("sink-{sink}")).await?.len();
            }
            Ok(n >= total)
        },
    )
    .await?;
    let mut received: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for sink in 0..SINKS {
        for entry in recorded(&cluster, &format!("sink-{sink}")).await? {
            let value = entry["value"].as_str().context("a value")?.to_owned();
            ensure!(
                received.insert(value.clone(), entry).is_none(),
                "{value} received twice"
            );
        }
    }
    // Exactly the committed entries: each names the runner whose handling committed, so a
    // send from a handling that died before its commit would show up as a mismatch.
    ensure!(
        received.len() == total,
        "{} of {total} received",
        received.len()
    );
    for (value, entry) in &sent {
        ensure!(
            received.get(value) == Some(entry),
            "{value}: sender committed {entry}, sink got {:?}",
            received.get(value)
        );
    }
    let (replayed,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM shoal_messages
          WHERE cluster = $1 AND tag = 'forward' AND attempts > 0",
    )
    .bind(&cluster.name)
    .fetch_one(&cluster.pool)
    .await?;
    eprintln!("{replayed} forwards redelivered by a scan after a kill");
    drop(runners);
    Ok(())
}
