//! Messages end to end, across real `shoal runner` processes and Postgres: persisted
//! increments survive a SIGKILL with exactly one reply and exactly one state change each,
//! idempotency keys deduplicate concurrent sends, full mailboxes refuse volatile messages
//! but keep persisted ones, a panicking handler restarts and replays, the runner transport
//! demands the cluster secret, a completion under a stale epoch writes nothing, and two
//! nodes sharing a machine id (so generating the same message ids) keep their own messages.
//!
//! Numbers (elapsed times, retries, redeliveries) are printed; `--nocapture` shows them.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use common::gateway::{DEFAULT_SECRET, Gateway, GatewayOptions, Http, TestClient, sharding};
use common::{DEADLINE, RunnerOptions, TestCluster, wait_until};
use serde_json::json;
use shoal::client::{ClientError, Request};
use shoal::ids::{EntityAddress, EntityId, EntityType, MessageId, ShardId};
use shoal::message_storage::{MessageStorage, MessageStorageError, NewMessage, Reply, SaveOutcome};
use shoal::transport::DeliveryError;
use tokio::task::JoinSet;

/// Shards of the small clusters (quick to balance, light on Postgres' lock table).
const SMALL: u32 = 64;

fn address(entity_type: &str, id: &str) -> anyhow::Result<EntityAddress> {
    Ok(EntityAddress {
        entity_type: EntityType::new(entity_type)?,
        entity_id: EntityId::new(id)?,
    })
}

/// The value of an `Ok` reply, or an error naming the reply.
fn ok_value(reply: Reply) -> anyhow::Result<serde_json::Value> {
    match reply {
        Reply::Ok { value } => Ok(value),
        Reply::Err { code, message } => bail!("error reply {code}: {message}"),
    }
}

fn count_of(value: &serde_json::Value) -> anyhow::Result<i64> {
    value
        .get("count")
        .and_then(|c| c.as_i64())
        .with_context(|| format!("no count in {value}"))
}

/// A cluster of `runners` runners over `shards` shards, balanced, and a client for it.
async fn cluster_with(
    shards: u32,
    runners: usize,
) -> anyhow::Result<(TestCluster, Vec<common::Runner>, TestClient)> {
    let (cluster, started) = TestCluster::balanced(shards, runners).await?;
    let client = TestClient::connect(&cluster, DEFAULT_SECRET, 4, true).await?;
    Ok((cluster, started, client))
}

// ---------------------------------------------------------------------------------------
// SIGTERM while a persisted handler runs longer than the lock deadline
// ---------------------------------------------------------------------------------------

/// A graceful drain longer than `lock-deadline` (2 s) keeps confirming the locks: no
/// fence frees them under the running handler, it runs once, and its reply is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_long_handler_without_fencing() -> anyhow::Result<()> {
    let (cluster, mut runners, client) = cluster_with(SMALL, 2).await?;
    let leaving = runners[0].id().await?;
    let owners = cluster.snapshot().await?.owners;
    let sharding = sharding(SMALL)?;
    let entity = (0..)
        .map(|i| format!("slow-{i}"))
        .find(|id| {
            EntityId::new(id).is_ok_and(|e| owners.get(&sharding.shard_of(&e)) == Some(&leaving))
        })
        .context("an entity on the leaving runner")?;
    let target = address("probe", &entity)?;
    let ask = tokio::spawn({
        let client = client.client.clone();
        let target = target.clone();
        async move {
            let request = Request::persisted(
                target,
                "record_slowly",
                json!({"value": "once", "ms": 4000}),
            )
            .with_timeout(Duration::from_secs(60));
            client.ask(request).await
        }
    });
    wait_until(DEADLINE, "the slow handler runs", || async {
        Ok(client.entity_status(&target).await?.mailbox_depth >= 1)
    })
    .await?;
    let stopped_at = Instant::now();
    runners[0].terminate()?;
    let status = runners[0].wait_exit(DEADLINE).await?;
    eprintln!(
        "SIGTERM → exit with a 4 s handler: {:?}",
        stopped_at.elapsed()
    );
    ensure!(status.success(), "graceful shutdown exited with {status}");
    let log = runners[0].log();
    ensure!(!log.contains("fencing"), "the drain fenced:\n{log}");
    ensure!(
        log.contains("released every shard and unregistered"),
        "the runner logs its clean exit:\n{log}"
    );
    let registered: i64 = sqlx::query_scalar("SELECT count(*) FROM shoal_runners WHERE id = $1")
        .bind(leaving.get())
        .fetch_one(&cluster.pool)
        .await?;
    ensure!(registered == 0, "the registration row is gone");

    let reply = ok_value(ask.await??)?;
    ensure!(reply == json!({"recorded": ["once"]}), "reply {reply}");
    let (replies, attempts, state): (i64, i32, serde_json::Value) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM shoal_replies r WHERE r.message_id = m.id),
                m.attempts,
                (SELECT s.state FROM shoal_entity_state s
                  WHERE s.cluster = m.cluster AND s.entity_type = m.entity_type
                    AND s.entity_id = m.entity_id)
           FROM shoal_messages m WHERE m.cluster = $1 AND m.entity_id = $2 AND m.processed",
    )
    .bind(&cluster.name)
    .bind(&entity)
    .fetch_one(&cluster.pool)
    .await?;
    ensure!(replies == 1, "{replies} stored replies");
    ensure!(
        state == json!({"recorded": ["once"]}),
        "the handler ran once: state {state} (attempts {attempts})"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 20,000 persisted increments, one runner killed in the middle
// ---------------------------------------------------------------------------------------

const BIG_SHARDS: u32 = 128;
const ENTITIES: usize = 1_000;
const SENDERS: usize = 50;
/// Each sender sends to a window of this many consecutive entities; windows start every
/// `ENTITIES / SENDERS` entities, so every entity is shared by two senders.
const WINDOW: usize = 2 * ENTITIES / SENDERS;
/// Rounds over the window by default: each sender sends WINDOW × rounds messages, each
/// entity gets 2 × rounds. A debug build on a 2-core machine does 180–300 persisted asks a
/// second (three runners, the test and Postgres share the cores), so the default is 5
/// rounds: 10,000 messages in 35–55 s. `SHOAL_TEST_INCREMENT_ROUNDS=10` sends the full
/// 20,000 (65 s here).
const DEFAULT_ROUNDS: usize = 5;

fn rounds() -> anyhow::Result<usize> {
    match std::env::var("SHOAL_TEST_INCREMENT_ROUNDS") {
        Ok(value) => value
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .with_context(|| format!("SHOAL_TEST_INCREMENT_ROUNDS={value}: a positive integer")),
        Err(_) => Ok(DEFAULT_ROUNDS),
    }
}

#[derive(Debug, Default)]
struct SenderReport {
    /// (entity, count replied), in send order.
    counts: Vec<(usize, i64)>,
    /// Asks that failed and were sent again with the same key.
    retries: usize,
    /// The slowest ask, retries included.
    slowest: Duration,
}

/// Sends `increment` with `key` until a reply comes (the same key each time) and returns
/// the count; the retries it took are added to `retries`.
async fn increment_until_replied(
    client: &shoal::client::ShoalClient,
    entity: &EntityAddress,
    key: &str,
    retries: &mut usize,
) -> anyhow::Result<i64> {
    let started = Instant::now();
    loop {
        let request = Request::persisted(entity.clone(), "increment", json!({}))
            .with_key(key)
            .with_timeout(Duration::from_secs(20));
        match client.ask(request).await {
            Ok(reply) => return count_of(&ok_value(reply)?),
            Err(error) if error.is_retryable() && started.elapsed() < Duration::from_secs(90) => {
                *retries += 1;
                if *retries <= 3 {
                    eprintln!("{entity} `{key}`: {error}; sending again with the same key");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => bail!("{entity} `{key}`: {error}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn increments_from_many_senders_survive_a_kill_9_exactly_once() -> anyhow::Result<()> {
    let rounds = rounds()?;
    let total = SENDERS * WINDOW * rounds;
    let per_entity = 2 * rounds as i64;
    let (cluster, mut runners, client) = cluster_with(BIG_SHARDS, 3).await?;
    let entity = |e: usize| address("counter", &format!("c-{e}"));
    let sent = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut senders = JoinSet::new();
    for s in 0..SENDERS {
        let client = client.client.clone();
        let sent = sent.clone();
        let entities: Vec<(usize, EntityAddress)> = (0..WINDOW)
            .map(|j| {
                let e = (s * (ENTITIES / SENDERS) + j) % ENTITIES;
                entity(e).map(|a| (e, a))
            })
            .collect::<anyhow::Result<_>>()?;
        senders.spawn(async move {
            let mut report = SenderReport::default();
            let mut last: HashMap<usize, i64> = HashMap::new();
            for round in 0..rounds {
                for (e, address) in &entities {
                    let key = format!("s{s}-r{round}-e{e}");
                    let asked = Instant::now();
                    let count =
                        increment_until_replied(&client, address, &key, &mut report.retries)
                            .await?;
                    report.slowest = report.slowest.max(asked.elapsed());
                    // One sender's messages to one entity are sequential: its counts rise.
                    let before = last.insert(*e, count).unwrap_or(0);
                    ensure!(
                        count > before,
                        "sender {s}: {address} answered {count} after {before}"
                    );
                    report.counts.push((*e, count));
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            anyhow::Ok(report)
        });
    }

    // Kill one runner once about a third has been answered.
    let third = total / 3;
    let reached = wait_until(Duration::from_secs(120), "a third is answered", || async {
        Ok(sent.load(Ordering::Relaxed) >= third)
    })
    .await?;
    let victim = runners[1].id().await?;
    let killed_at = Instant::now();
    runners[1].kill()?;
    eprintln!(
        "killed runner {victim} after {} answers ({reached:?} in)",
        sent.load(Ordering::Relaxed)
    );

    let mut reports = Vec::new();
    while let Some(joined) = senders.join_next().await {
        reports.push(joined??);
    }
    let elapsed = started.elapsed();
    let after_kill = killed_at.elapsed();
    let retries: usize = reports.iter().map(|r| r.retries).sum();
    let slowest = reports.iter().map(|r| r.slowest).max().unwrap_or_default();
    eprintln!(
        "{total} increments to {ENTITIES} counters from {SENDERS} senders: {elapsed:?} \
         ({:.0}/s), {after_kill:?} after the kill; {retries} retried asks, slowest ask {slowest:?}",
        total as f64 / elapsed.as_secs_f64()
    );

    // Every entity's counts, across senders, are exactly 1..=per_entity: each message
    // counted once, each reply that of its own increment.
    let mut answered: BTreeMap<usize, Vec<i64>> = BTreeMap::new();
    for report in &reports {
        for (e, count) in &report.counts {
            answered.entry(*e).or_default().push(*count);
        }
    }
    ensure!(answered.len() == ENTITIES, "{} entities", answered.len());
    let expected: Vec<i64> = (1..=per_entity).collect();
    for (e, counts) in &mut answered {
        counts.sort_unstable();
        ensure!(*counts == expected, "counter c-{e} answered {counts:?}");
    }

    // The rows: one message per key, every one processed with exactly one (ok) reply.
    let (messages, processed, keys, attempts, redelivered): (i64, i64, i64, i64, i64) =
        sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE processed), count(DISTINCT idempotency_key),
                    coalesce(sum(attempts), 0)::int8, count(*) FILTER (WHERE attempts > 0)
               FROM shoal_messages WHERE cluster = $1",
        )
        .bind(&cluster.name)
        .fetch_one(&cluster.pool)
        .await?;
    let (replies, ok_replies, replied_messages): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE r.ok), count(DISTINCT r.message_id)
           FROM shoal_replies r JOIN shoal_messages m ON m.id = r.message_id
          WHERE m.cluster = $1",
    )
    .bind(&cluster.name)
    .fetch_one(&cluster.pool)
    .await?;
    eprintln!(
        "rows: {messages} messages ({processed} processed, {keys} keys), {replies} replies; \
         {redelivered} messages redelivered by a scan, {attempts} attempts counted"
    );
    let total = total as i64;
    ensure!(
        messages == total,
        "{messages} message rows for {total} sends"
    );
    ensure!(keys == total, "{keys} distinct keys");
    ensure!(processed == total, "{} unprocessed", messages - processed);
    ensure!(
        replies == total && replied_messages == total && ok_replies == total,
        "{replies} replies ({ok_replies} ok) for {replied_messages} messages"
    );

    // The state rows, and what each counter answers now.
    let states: Vec<(String, i64)> = sqlx::query_as(
        "SELECT entity_id, (state->>'count')::int8 FROM shoal_entity_state
          WHERE cluster = $1 AND entity_type = 'counter'",
    )
    .bind(&cluster.name)
    .fetch_all(&cluster.pool)
    .await?;
    ensure!(states.len() == ENTITIES, "{} state rows", states.len());
    for (id, count) in &states {
        ensure!(*count == per_entity, "state of {id}: {count}");
    }
    let next = Arc::new(AtomicUsize::new(0));
    let mut getters = JoinSet::new();
    for _ in 0..20 {
        let (client, next) = (client.client.clone(), next.clone());
        getters.spawn(async move {
            loop {
                let e = next.fetch_add(1, Ordering::Relaxed);
                if e >= ENTITIES {
                    return anyhow::Ok(());
                }
                let address = address("counter", &format!("c-{e}"))?;
                let reply = client
                    .ask(Request::volatile(address.clone(), "get", json!({})))
                    .await
                    .with_context(|| format!("get {address}"))?;
                let count = count_of(&ok_value(reply)?)?;
                ensure!(count == per_entity, "get {address}: {count}");
            }
        });
    }
    while let Some(joined) = getters.join_next().await {
        joined??;
    }
    drop(runners);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Idempotency
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_sent_ten_times_at_once_runs_once() -> anyhow::Result<()> {
    let (cluster, _runners, client) = cluster_with(SMALL, 1).await?;
    let entity = address("counter", "idem")?;
    let mut asks = JoinSet::new();
    for _ in 0..10 {
        let (client, entity) = (client.client.clone(), entity.clone());
        asks.spawn(async move {
            client
                .ask(Request::persisted(entity, "increment", json!({"by": 7})).with_key("the-key"))
                .await
        });
    }
    let mut replies = Vec::new();
    while let Some(joined) = asks.join_next().await {
        replies.push(ok_value(joined??)?);
    }
    ensure!(
        replies.iter().all(|r| *r == json!({"count": 7})),
        "replies: {replies:?}"
    );

    let (rows, processed): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE processed) FROM shoal_messages
          WHERE cluster = $1 AND entity_id = 'idem'",
    )
    .bind(&cluster.name)
    .fetch_one(&cluster.pool)
    .await?;
    ensure!(
        rows == 1 && processed == 1,
        "{rows} rows, {processed} processed"
    );
    let replies: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM shoal_replies r JOIN shoal_messages m ON m.id = r.message_id
          WHERE m.cluster = $1 AND m.entity_id = 'idem'",
    )
    .bind(&cluster.name)
    .fetch_one(&cluster.pool)
    .await?;
    ensure!(replies == 1, "{replies} reply rows");
    let state: serde_json::Value = sqlx::query_scalar(
        "SELECT state FROM shoal_entity_state WHERE cluster = $1 AND entity_id = 'idem'",
    )
    .bind(&cluster.name)
    .fetch_one(&cluster.pool)
    .await?;
    ensure!(count_of(&state)? == 7, "state {state}");
    let now = ok_value(
        client
            .ask(Request::volatile(entity.clone(), "get", json!({})))
            .await?,
    )?;
    ensure!(count_of(&now)? == 7, "get: {now}");

    // The same key once more, later: the stored reply, nothing new.
    let again = ok_value(
        client
            .ask(Request::persisted(entity, "increment", json!({"by": 7})).with_key("the-key"))
            .await?,
    )?;
    ensure!(again == json!({"count": 7}), "resent: {again}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Full mailboxes
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_mailbox_refuses_volatile_and_keeps_persisted() -> anyhow::Result<()> {
    let (cluster, _runners, client) = cluster_with(SMALL, 1).await?;
    let probe = address("probe", "full")?;
    let started = Instant::now();
    // probe's mailbox holds 4: one sleeping, three waiting.
    let mut sleeps = JoinSet::new();
    for _ in 0..4 {
        let (client, probe) = (client.client.clone(), probe.clone());
        sleeps.spawn(async move {
            let reply = client
                .ask(Request::volatile(probe, "sleep", json!({"ms": 2000})))
                .await;
            (reply, started.elapsed())
        });
    }
    wait_until(DEADLINE, "the probe's mailbox holds 4", || async {
        Ok(client.entity_status(&probe).await?.mailbox_depth == 4)
    })
    .await?;

    let echo = client
        .ask(Request::volatile(
            probe.clone(),
            "echo",
            json!({"value": 1}),
        ))
        .await;
    ensure!(
        matches!(
            echo,
            Err(ClientError::Delivery(DeliveryError::MailboxFull(_)))
        ),
        "echo to a full mailbox: {echo:?}"
    );
    ensure!(
        started.elapsed() < Duration::from_millis(2000),
        "the mailbox was checked too late ({:?}) to be sure it was full",
        started.elapsed()
    );

    // A persisted message is not refused: it waits in storage until room frees.
    let record = {
        let (client, probe) = (client.client.clone(), probe.clone());
        tokio::spawn(async move {
            let reply = client
                .ask(
                    Request::persisted(probe, "record", json!({"value": "while-full"}))
                        .with_timeout(Duration::from_secs(60)),
                )
                .await;
            (reply, started.elapsed())
        })
    };
    wait_until(DEADLINE, "the record is stored", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM shoal_messages WHERE cluster = $1 AND entity_id = 'full'",
        )
        .bind(&cluster.name)
        .fetch_one(&cluster.pool)
        .await?;
        Ok(n == 1)
    })
    .await?;
    let unprocessed_while_full: bool = sqlx::query_scalar(
        "SELECT NOT processed FROM shoal_messages WHERE cluster = $1 AND entity_id = 'full'",
    )
    .bind(&cluster.name)
    .fetch_one(&cluster.pool)
    .await?;
    let checked_at = started.elapsed();

    let mut first_sleep_done = Duration::MAX;
    while let Some(joined) = sleeps.join_next().await {
        let (reply, at) = joined?;
        ensure!(
            ok_value(reply?)? == json!({"slept_ms": 2000}),
            "a sleep failed"
        );
        first_sleep_done = first_sleep_done.min(at);
    }
    let (reply, record_done) = record.await?;
    let value = ok_value(reply?)?;
    ensure!(
        value == json!({"recorded": ["while-full"]}),
        "record: {value}"
    );
    eprintln!(
        "mailbox full: echo refused; record stored at {checked_at:?} (unprocessed: \
         {unprocessed_while_full}), first sleep done {first_sleep_done:?}, record done \
         {record_done:?}"
    );
    if checked_at < first_sleep_done {
        ensure!(
            unprocessed_while_full,
            "the record was processed while the mailbox was full"
        );
    }
    ensure!(
        record_done >= first_sleep_done,
        "the record ran ({record_done:?}) before room freed ({first_sleep_done:?})"
    );
    let (processed, replies): (bool, i64) = sqlx::query_as(
        "SELECT m.processed, (SELECT count(*) FROM shoal_replies r WHERE r.message_id = m.id)
           FROM shoal_messages m WHERE m.cluster = $1 AND m.entity_id = 'full'",
    )
    .bind(&cluster.name)
    .fetch_one(&cluster.pool)
    .await?;
    ensure!(
        processed && replies == 1,
        "processed {processed}, {replies} replies"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// A panicking handler
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_handler_restarts_and_replays() -> anyhow::Result<()> {
    let (cluster, runners, client) = cluster_with(SMALL, 1).await?;
    let probe = address("probe", "flaky")?;
    let started = Instant::now();
    let reply = client
        .ask(
            Request::persisted(probe.clone(), "fail_until", json!({"attempts": 2}))
                .with_timeout(Duration::from_secs(60)),
        )
        .await?;
    let value = ok_value(reply)?;
    let attempt = value
        .get("succeeded_on_attempt")
        .and_then(|v| v.as_i64())
        .with_context(|| format!("reply {value}"))?;
    ensure!(attempt >= 2, "succeeded on attempt {attempt}");
    let panics = runners[0]
        .log()
        .lines()
        .filter(|l| l.contains("entity failed; restarting") && l.contains("probe/flaky"))
        .count();
    eprintln!(
        "fail_until 2: replied {value} after {:?}; {panics} restarts logged",
        started.elapsed()
    );
    ensure!(panics == 2, "{panics} restarts logged for probe/flaky");

    // The next message to the same entity is handled by the restarted actor.
    let next = ok_value(
        client
            .ask(Request::persisted(
                probe.clone(),
                "record",
                json!({"value": "after"}),
            ))
            .await?,
    )?;
    ensure!(next == json!({"recorded": ["after"]}), "next: {next}");
    let echo = ok_value(
        client
            .ask(Request::volatile(
                probe.clone(),
                "echo",
                json!({"value": 42}),
            ))
            .await?,
    )?;
    ensure!(echo == json!(42), "echo: {echo}");

    // One reply each; the runner still runs, with the panic as the entity's last error.
    let rows: Vec<(String, bool, i32, i64)> = sqlx::query_as(
        "SELECT m.tag, m.processed, m.attempts,
                (SELECT count(*) FROM shoal_replies r WHERE r.message_id = m.id)
           FROM shoal_messages m WHERE m.cluster = $1 AND m.entity_id = 'flaky' ORDER BY m.id",
    )
    .bind(&cluster.name)
    .fetch_all(&cluster.pool)
    .await?;
    ensure!(
        rows.len() == 2 && rows.iter().all(|(_, p, _, r)| *p && *r == 1),
        "rows: {rows:?}"
    );
    eprintln!("rows (tag, processed, attempts, replies): {rows:?}");
    let view = runners[0].status().await?;
    ensure!(view.phase == "active", "runner is {}", view.phase);
    let status = client.entity_status(&probe).await?;
    ensure!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("probe failing")),
        "last error: {:?}",
        status.last_error
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The cluster secret
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_transport_demands_the_cluster_secret() -> anyhow::Result<()> {
    const SECRET: &str = "the-right-secret";
    let cluster = TestCluster::new(SMALL).await?;
    let runner = cluster
        .start_runner_with(RunnerOptions {
            env: vec![("SHOAL__CLUSTER__SECRET".to_owned(), SECRET.to_owned())],
            ..RunnerOptions::default()
        })
        .await?;
    cluster.await_balanced(&[&runner]).await?;

    // Straight at the runner's delivery route.
    let http = Http::new(format!("http://{}", runner.addr))?;
    let envelope = json!({
        "version": 1, "entity_type": "probe", "entity_id": "secret",
        "tag": "echo", "payload": {"value": "hi"},
    });
    for (case, headers) in [
        ("no secret", vec![]),
        (
            "a wrong secret",
            vec![("x-shoal-secret", "the-wrong-secret")],
        ),
        ("an empty secret", vec![("x-shoal-secret", "")]),
        (
            "a prefix of the secret",
            vec![("x-shoal-secret", "the-right")],
        ),
    ] {
        let response = http
            .post_json("/_shoal/v1/deliver", &envelope, &headers)
            .await?;
        ensure!(
            response.status == 401,
            "{case}: {} {}",
            response.status,
            response.text()
        );
    }
    let response = http
        .post_json(
            "/_shoal/v1/deliver",
            &envelope,
            &[("x-shoal-secret", SECRET)],
        )
        .await?;
    ensure!(
        response.status == 200 && response.json()? == json!({"outcome": "ok", "value": "hi"}),
        "the right secret: {} {}",
        response.status,
        response.text()
    );

    // A client node with another secret gets `Unauthorized`; with the right one, replies.
    let wrong = TestClient::connect(&cluster, "the-wrong-secret", 2, true).await?;
    let echo = Request::volatile(address("probe", "secret")?, "echo", json!({"value": 1}));
    let refused = wrong.ask(echo.clone()).await;
    ensure!(
        matches!(refused, Err(ClientError::Unauthorized)),
        "wrong secret: {refused:?}"
    );
    let increment = Request::persisted(address("counter", "secret")?, "increment", json!({}));
    let refused = wrong.ask(increment).await;
    ensure!(
        matches!(refused, Err(ClientError::Unauthorized)),
        "wrong secret, persisted: {refused:?}"
    );
    let right = TestClient::connect(&cluster, SECRET, 2, true).await?;
    ensure!(
        ok_value(right.ask(echo).await?)? == json!(1),
        "right secret"
    );

    // A gateway with another secret answers errors, never a reply.
    let gateway = Gateway::start(
        &cluster,
        GatewayOptions {
            env: vec![(
                "SHOAL__CLUSTER__SECRET".to_owned(),
                "the-gateways-secret".to_owned(),
            )],
            ..GatewayOptions::default()
        },
    )
    .await?;
    for (path, body) in [
        ("/entities/probe/secret/echo", json!({"value": 1})),
        ("/entities/counter/gw-secret/increment", json!({})),
        ("/entities/counter/gw-secret/get", json!({})),
    ] {
        let response = gateway.http.post_json(path, &body, &[]).await?;
        let (code, retryable) = response.error()?;
        ensure!(
            !response.status.is_success() && response.json()?.get("reply").is_none(),
            "{path}: {} {}",
            response.status,
            response.text()
        );
        eprintln!(
            "gateway with a wrong secret, {path}: {} {code} (retryable {retryable})",
            response.status
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Fencing at the row level
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_restarted_at_its_address_is_reached_again() -> anyhow::Result<()> {
    let cluster = TestCluster::new(SMALL).await?;
    let mut first = cluster.start_runner().await?;
    cluster.await_balanced(&[&first]).await?;
    let client = TestClient::connect(&cluster, DEFAULT_SECRET, 4, true).await?;
    let entity = EntityAddress {
        entity_type: EntityType::new("counter")?,
        entity_id: EntityId::new("restarted")?,
    };
    let increment = || {
        Request::persisted(entity.clone(), "increment", json!({}))
            .with_timeout(Duration::from_secs(20))
    };
    // The client now holds a pooled HTTP/2 connection to the runner.
    ensure!(count_of(&ok_value(client.ask(increment()).await?)?)? == 1);
    let old_id = first.status().await?.runner_id;

    first.kill()?;
    first.wait_exit(DEADLINE).await?;
    let second = cluster
        .start_runner_with(RunnerOptions {
            listen: Some(first.addr),
            ..RunnerOptions::default()
        })
        .await?;
    cluster.await_balanced(&[&second]).await?;
    let new_id = second.status().await?.runner_id;
    ensure!(
        new_id.is_some() && new_id != old_id,
        "{old_id:?} then {new_id:?}"
    );

    // Same address, new process: the dead connection is replaced, nothing is lost.
    ensure!(count_of(&ok_value(client.ask(increment()).await?)?)? == 2);
    let get =
        Request::volatile(entity.clone(), "get", json!({})).with_timeout(Duration::from_secs(20));
    ensure!(count_of(&ok_value(client.ask(get).await?)?)? == 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_under_a_stale_epoch_writes_nothing() -> anyhow::Result<()> {
    let (cluster, mut runners, client) = cluster_with(SMALL, 1).await?;
    let probe = address("probe", "fenced")?;
    let shard = sharding(cluster.shards)?.shard_of(&probe.entity_id);

    // The shard's next owner bumps its epoch (as an acquiring runner does); the runner
    // that still believes it owns the shard holds the old epoch.
    let (old, bumped): (i64, i64) = sqlx::query_as(
        "UPDATE shoal_shards SET epoch = epoch + 1 WHERE cluster = $1 AND shard = $2
         RETURNING epoch - 1, epoch",
    )
    .bind(&cluster.name)
    .bind(shard.lock_key())
    .fetch_one(&cluster.pool)
    .await?;
    let held = runners[0].status().await?.owned.get(&shard).copied();
    ensure!(
        held.map(|e| e.get()) == Some(old),
        "the runner holds shard {shard} under {held:?}, not {old}"
    );

    let id = client
        .send(Request::persisted(
            probe.clone(),
            "record",
            json!({"value": "stale"}),
        ))
        .await?;
    wait_until(DEADLINE, "the stale owner tried to complete", || async {
        Ok(runners[0]
            .log()
            .contains("completion refused: epoch moved on"))
    })
    .await?;
    let (processed, epoch, processed_at): (bool, Option<i64>, Option<String>) = sqlx::query_as(
        "SELECT processed, epoch, processed_at::text FROM shoal_messages
          WHERE cluster = $1 AND id = $2",
    )
    .bind(&cluster.name)
    .bind(id.get())
    .fetch_one(&cluster.pool)
    .await?;
    let replies: i64 =
        sqlx::query_scalar("SELECT count(*) FROM shoal_replies WHERE message_id = $1")
            .bind(id.get())
            .fetch_one(&cluster.pool)
            .await?;
    let states: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM shoal_entity_state WHERE cluster = $1 AND entity_id = 'fenced'",
    )
    .bind(&cluster.name)
    .fetch_one(&cluster.pool)
    .await?;
    ensure!(
        !processed && epoch.is_none() && processed_at.is_none(),
        "stale completion marked the message: processed {processed}, epoch {epoch:?}"
    );
    ensure!(replies == 0, "stale completion stored {replies} replies");
    ensure!(states == 0, "stale completion wrote entity state");

    // The message is not lost: the next real owner runs it once, under its own epoch.
    let successor = cluster.start_runner().await?;
    runners[0].kill()?;
    let reply = wait_until(DEADLINE, "the new owner replied", || async {
        Ok(client.reply_of(id).await?.is_some())
    })
    .await?;
    let (processed, epoch): (bool, Option<i64>) = sqlx::query_as(
        "SELECT processed, epoch FROM shoal_messages WHERE cluster = $1 AND id = $2",
    )
    .bind(&cluster.name)
    .bind(id.get())
    .fetch_one(&cluster.pool)
    .await?;
    ensure!(
        processed && epoch.is_some_and(|e| e > bumped),
        "processed {processed} under epoch {epoch:?} (bumped to {bumped})"
    );
    let state: serde_json::Value = sqlx::query_scalar(
        "SELECT state FROM shoal_entity_state WHERE cluster = $1 AND entity_id = 'fenced'",
    )
    .bind(&cluster.name)
    .fetch_one(&cluster.pool)
    .await?;
    ensure!(
        state == json!({"recorded": ["stale"]}),
        "state after the new owner: {state}"
    );
    eprintln!(
        "stale epoch {old} (current {bumped}): nothing written; the new owner completed it \
         under epoch {epoch:?} {reply:?} after the kill"
    );
    drop(successor);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Message ids from two nodes with one machine id
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_with_one_machine_id_keep_their_own_messages() -> anyhow::Result<()> {
    const PER_NODE: usize = 20;
    const SENDS: usize = 10;
    let (cluster, _runners, first) = cluster_with(SMALL, 1).await?;
    // Same process, so the same machine id (as every container's PID 1 would have).
    let second = TestClient::connect(&cluster, DEFAULT_SECRET, 4, true).await?;
    let mut senders = JoinSet::new();
    for (node, client) in [(0, first.client.clone()), (1, second.client.clone())] {
        for s in 0..PER_NODE {
            let client = client.clone();
            senders.spawn(async move {
                let entity = address("counter", &format!("n{node}-s{s}"))?;
                let mut replies = Vec::new();
                let mut collisions = 0;
                while replies.len() < SENDS {
                    match client
                        .ask(Request::persisted(entity.clone(), "increment", json!({})))
                        .await
                    {
                        Ok(reply) => replies.push(count_of(&ok_value(reply)?)?),
                        Err(error) if error.is_retryable() => collisions += 1,
                        Err(error) => bail!("{entity}: {error}"),
                    }
                }
                anyhow::Ok((entity, replies, collisions))
            });
        }
    }
    let expected: Vec<i64> = (1..=SENDS as i64).collect();
    let mut wrong = Vec::new();
    let mut collisions = 0;
    while let Some(joined) = senders.join_next().await {
        let (entity, replies, n) = joined??;
        collisions += n;
        if replies != expected {
            wrong.push(format!("{entity}: {replies:?}"));
        }
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM shoal_messages WHERE cluster = $1")
        .bind(&cluster.name)
        .fetch_one(&cluster.pool)
        .await?;
    eprintln!(
        "{rows} message rows for {} sends; {collisions} retried",
        2 * PER_NODE * SENDS
    );
    ensure!(
        wrong.is_empty(),
        "replies that were not the sender's own:\n{}",
        wrong.join("\n")
    );
    ensure!(rows == (2 * PER_NODE * SENDS) as i64, "{rows} message rows");

    // At the storage API: a different message under a taken id is refused, the same one
    // saved again is stored (a retried save).
    let (id, shard, entity_id): (i64, i32, String) = sqlx::query_as(
        "SELECT id, shard, entity_id FROM shoal_messages WHERE cluster = $1 LIMIT 1",
    )
    .bind(&cluster.name)
    .fetch_one(&cluster.pool)
    .await?;
    let same = NewMessage {
        id: MessageId::new(id),
        shard: ShardId::new(u32::try_from(shard)?),
        address: address("counter", &entity_id)?,
        tag: "increment".to_owned(),
        payload: json!({}),
        idempotency_key: None,
        deliver_at: None,
    };
    let other = NewMessage {
        address: address("counter", "another")?,
        ..same.clone()
    };
    let taken = first.messages.save(other).await;
    ensure!(
        matches!(taken, Err(MessageStorageError::IdTaken(_))),
        "another message under a taken id: {taken:?}"
    );
    let again = first.messages.save(same).await?;
    ensure!(
        again == SaveOutcome::Stored(MessageId::new(id)),
        "the same message saved again: {again:?}"
    );
    Ok(())
}
