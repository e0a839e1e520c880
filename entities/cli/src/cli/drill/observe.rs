//! What a drill reads from the database to judge a failover: shard ownership settling,
//! message counts, the first message processed on a moved shard, lock sessions.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use shoal::config::ShoalConfig;
use shoal::ids::{RunnerId, ShardId};
use shoal::runner_storage::postgres::{LockNamespaces, PgRunnerStorage};
use shoal::runner_storage::{ClusterSnapshot, RunnerStorage};
use sqlx::Row;

pub(super) struct Settled {
    pub(super) processed_keys: BTreeSet<String>,
    pub(super) attempts: i64,
}

/// Waits until every message of the drill is processed (or `limit`), then reads them.
pub(super) async fn settle(
    pool: &sqlx::PgPool,
    config: &ShoalConfig,
    tag: &str,
    limit: Duration,
) -> anyhow::Result<Settled> {
    let like = format!("{tag}-%");
    let deadline = Instant::now() + limit;
    loop {
        let pending: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM shoal_messages
              WHERE cluster = $1 AND idempotency_key LIKE $2 AND NOT processed",
        )
        .bind(config.cluster.name.as_str())
        .bind(&like)
        .fetch_one(pool)
        .await?;
        if pending == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rows = sqlx::query(
        "SELECT idempotency_key, attempts FROM shoal_messages
          WHERE cluster = $1 AND idempotency_key LIKE $2 AND processed",
    )
    .bind(config.cluster.name.as_str())
    .bind(&like)
    .fetch_all(pool)
    .await?;
    let mut settled = Settled {
        processed_keys: BTreeSet::new(),
        attempts: 0,
    };
    for row in rows {
        settled
            .processed_keys
            .insert(row.try_get("idempotency_key")?);
        settled.attempts += i64::from(row.try_get::<i32, _>("attempts")?);
    }
    Ok(settled)
}

/// Each drill counter's committed count.
pub(super) async fn counts(
    pool: &sqlx::PgPool,
    config: &ShoalConfig,
    tag: &str,
) -> anyhow::Result<HashMap<String, usize>> {
    let rows = sqlx::query(
        "SELECT entity_id, (state->>'count')::int8 AS count FROM shoal_entity_state
          WHERE cluster = $1 AND entity_type = 'counter' AND entity_id LIKE $2",
    )
    .bind(config.cluster.name.as_str())
    .bind(format!("{tag}-%"))
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|row| {
            let count: i64 = row.try_get("count")?;
            Ok((row.try_get("entity_id")?, count.max(0) as usize))
        })
        .collect()
}

/// Milliseconds from the kill to the first message processed on a shard that moved.
pub(super) async fn first_processed(
    pool: &sqlx::PgPool,
    config: &ShoalConfig,
    moved: &[ShardId],
    killed: DateTime<Utc>,
) -> anyhow::Result<Option<f64>> {
    let first: Option<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT min(processed_at) FROM shoal_messages
          WHERE cluster = $1 AND shard = ANY($2) AND processed AND processed_at > $3",
    )
    .bind(config.cluster.name.as_str())
    .bind(moved.iter().map(|s| s.get() as i32).collect::<Vec<_>>())
    .bind(killed)
    .fetch_one(pool)
    .await?;
    Ok(first.map(|t| (t - killed).num_microseconds().unwrap_or(0) as f64 / 1000.0))
}

/// The backend pid of `runner`'s lock session (the holder of its liveness lock).
pub(super) async fn lock_session_pid(
    pool: &sqlx::PgPool,
    namespaces: LockNamespaces,
    runner: RunnerId,
) -> anyhow::Result<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_locks
          WHERE locktype = 'advisory' AND objsubid = 2 AND granted AND mode = 'ExclusiveLock'
            AND classid::int8 = $1 AND objid::int8 = $2",
    )
    .bind(i64::from(namespaces.runners))
    .bind(i64::from(runner.get()))
    .fetch_optional(pool)
    .await?
    .context("the victim holds no liveness lock")
}

/// Waits until every shard lock is held by a session other than the victim's. One light
/// `pg_locks` count every 2 ms: the measurement must cost far less than what it measures
/// (the full snapshot query takes tens of milliseconds on a loaded machine).
pub(super) async fn await_takeover(
    pool: &sqlx::PgPool,
    namespaces: LockNamespaces,
    victim_session: i32,
    shards: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let held: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks
              WHERE locktype = 'advisory' AND objsubid = 2 AND granted
                AND classid::int8 = $1 AND pid <> $2
                AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .bind(i64::from(namespaces.shards))
        .bind(victim_session)
        .fetch_one(pool)
        .await?;
        if held as usize >= shards {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("gave up after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub(super) async fn wait_for(
    storage: &PgRunnerStorage,
    limit: Duration,
    done: impl Fn(&ClusterSnapshot) -> bool,
) -> anyhow::Result<ClusterSnapshot> {
    let deadline = Instant::now() + limit;
    loop {
        let snapshot = storage.snapshot().await?;
        if done(&snapshot) {
            return Ok(snapshot);
        }
        if Instant::now() > deadline {
            bail!("gave up after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
