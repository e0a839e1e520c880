//! `shoal drill failover`: drive a steady load of persisted messages through a gateway, kill
//! a runner with SIGKILL (or freeze it with SIGSTOP for `--freeze SECONDS`, then SIGCONT),
//! keep the load going, and report what the users of the cluster
//! would see: time to full ownership, time to the first message processed on a moved shard,
//! and whether anything acknowledged was lost or committed twice. Against a running cluster
//! (`--gateway URL`) or one it starts itself (`--runners N`). Progress on stderr, one JSON
//! object on stdout.

mod load;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use nix::sys::signal::Signal;
use serde::Serialize;
use shoal::config::{ConfigLoader, ShoalConfig};
use shoal::ids::{RunnerId, ShardId};
use shoal::runner_storage::postgres::{LockNamespaces, LockSessionSettings, PgRunnerStorage};
use shoal::runner_storage::{ClusterSnapshot, RunnerStorage};
use shoal::sharding::assign;
use sqlx::Row;

use super::children::{self, ShoalChild, free_port};
use super::{ClusterArgs, DatabaseArgs};

#[derive(Debug, Subcommand)]
pub(crate) enum DrillCommand {
    /// Kill a runner with SIGKILL under load and report ownership time, loss and duplicates.
    Failover(FailoverArgs),
}

#[derive(Debug, Args)]
pub(crate) struct FailoverArgs {
    #[command(flatten)]
    db: DatabaseArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Gateway of a running cluster; without it the drill starts its own cluster.
    #[arg(long, env = "SHOAL_DRILL_GATEWAY")]
    gateway: Option<String>,
    /// Runners of the drill's own cluster.
    #[arg(long, default_value_t = 3, env = "SHOAL_DRILL_RUNNERS")]
    runners: usize,
    /// Runner to kill (default: the one owning the most shards).
    #[arg(long, env = "SHOAL_DRILL_RUNNER")]
    runner: Option<i32>,
    /// Persisted messages per second.
    #[arg(long, default_value_t = 500, env = "SHOAL_DRILL_RATE")]
    rate: u32,
    /// Counter entities the load is spread over.
    #[arg(long, default_value_t = 100, env = "SHOAL_DRILL_ENTITIES")]
    entities: usize,
    /// Freeze the victim with SIGSTOP for this many seconds (then SIGCONT) instead of
    /// killing it: a hung runner, whose sessions stay open.
    #[arg(long, value_name = "SECONDS", env = "SHOAL_DRILL_FREEZE")]
    freeze: Option<f64>,
    /// Drills to run; with more than one, p50/p99 are reported.
    #[arg(long, default_value_t = 1, env = "SHOAL_DRILL_REPEAT")]
    repeat: usize,
    /// Print JSON only (the default output is JSON too; kept for scripts).
    #[arg(long)]
    json: bool,
}

impl DrillCommand {
    pub(crate) fn apply(&self, loader: ConfigLoader) -> ConfigLoader {
        match self {
            Self::Failover(args) => loader
                .set("database.url", args.db.database_url.clone())
                .set("cluster.name", args.cluster.cluster.clone()),
        }
    }

    pub(crate) async fn run(&self, config: ShoalConfig) -> anyhow::Result<()> {
        match self {
            Self::Failover(args) => failover(args, config).await,
        }
    }
}

/// One drill's result.
#[derive(Debug, Clone, Serialize)]
struct DrillRun {
    runners: usize,
    /// `kill` (SIGKILL) or `freeze` (SIGSTOP, then SIGCONT).
    mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    frozen_s: Option<f64>,
    killed_runner: RunnerId,
    shards_moved: usize,
    ownership_ms: f64,
    first_processed_ms: Option<f64>,
    sent: usize,
    acknowledged: usize,
    processed: usize,
    lost: usize,
    duplicated: usize,
    reexecuted: i64,
    failed_requests: usize,
}

#[derive(Debug, Serialize)]
struct DrillReport {
    #[serde(flatten)]
    last: DrillRun,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    runs: Vec<DrillRun>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ownership_ms_p50: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ownership_ms_p99: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_processed_ms_p50: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_processed_ms_p99: Option<f64>,
}

async fn failover(args: &FailoverArgs, config: ShoalConfig) -> anyhow::Result<()> {
    if args.gateway.is_none() && args.runners < 2 {
        bail!("--runners must be at least 2 (one to kill, one to take over)");
    }
    // A cluster of its own gets a random secret; an existing one needs its own.
    let config = match &args.gateway {
        Some(_) => config,
        None => super::children::with_local_secret(config),
    };
    let pool = super::connect(&config).await?;
    shoal::MIGRATOR
        .run(&pool)
        .await
        .context("applying migrations")?;
    let mut runs = Vec::new();
    for round in 1..=args.repeat.max(1) {
        let mut cluster = match &args.gateway {
            Some(url) => Cluster::Existing {
                config: config.clone(),
                url: url.trim_end_matches('/').to_owned(),
            },
            None => Cluster::start(args, &config).await?,
        };
        let result = drill_once(args, &config, &pool, &mut cluster).await;
        cluster.stop().await;
        let run = result?;
        eprintln!(
            "drill {round}/{}: {} runner {} ({} shards): owned again after {:.0} ms, first processed after {:?} ms, lost {}, duplicated {}",
            args.repeat.max(1),
            if run.mode == "kill" {
                "killed"
            } else {
                "froze"
            },
            run.killed_runner,
            run.shards_moved,
            run.ownership_ms,
            run.first_processed_ms.map(|v| v.round()),
            run.lost,
            run.duplicated
        );
        runs.push(run);
    }
    pool.close().await;
    println!("{}", serde_json::to_string(&report(runs)?)?);
    Ok(())
}

fn report(mut runs: Vec<DrillRun>) -> anyhow::Result<DrillReport> {
    let last = runs.last().cloned().context("at least one run")?;
    if runs.len() == 1 {
        runs.clear();
        return Ok(DrillReport {
            last,
            runs,
            ownership_ms_p50: None,
            ownership_ms_p99: None,
            first_processed_ms_p50: None,
            first_processed_ms_p99: None,
        });
    }
    let sorted = |values: Vec<f64>| {
        let mut values = values;
        values.sort_by(f64::total_cmp);
        values
    };
    let ownership = sorted(runs.iter().map(|r| r.ownership_ms).collect());
    let first = sorted(runs.iter().filter_map(|r| r.first_processed_ms).collect());
    Ok(DrillReport {
        last,
        ownership_ms_p50: Some(percentile(&ownership, 0.50)),
        ownership_ms_p99: Some(percentile(&ownership, 0.99)),
        first_processed_ms_p50: (!first.is_empty()).then(|| percentile(&first, 0.50)),
        first_processed_ms_p99: (!first.is_empty()).then(|| percentile(&first, 0.99)),
        runs,
    })
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The cluster under drill: one the drill started (children it can kill) or a running one.
enum Cluster {
    Own {
        config: ShoalConfig,
        runners: Vec<ShoalChild>,
        gateway: Box<ShoalChild>,
        url: String,
    },
    Existing {
        config: ShoalConfig,
        url: String,
    },
}

impl Cluster {
    async fn start(args: &FailoverArgs, config: &ShoalConfig) -> anyhow::Result<Self> {
        let mut config = config.clone();
        config.cluster.name =
            shoal::ClusterName::new(format!("drill-{}", uuid::Uuid::now_v7().simple()))?;
        // Runners bind a port of their own choosing and register the address they got, so
        // no other process can take it between picking and binding.
        let mut runners = Vec::new();
        for n in 1..=args.runners {
            let name = format!("runner {n}");
            runners.push(spawn(
                name,
                &config,
                &["runner", "--listen", "127.0.0.1:0"],
            )?);
        }
        let (gateway, gateway_listen) = spawn_gateway(&config).await?;
        Ok(Self::Own {
            config,
            runners,
            gateway: Box::new(gateway),
            url: format!("http://{gateway_listen}"),
        })
    }

    fn config(&self) -> &ShoalConfig {
        match self {
            Self::Own { config, .. } | Self::Existing { config, .. } => config,
        }
    }

    fn url(&self) -> &str {
        match self {
            Self::Own { url, .. } | Self::Existing { url, .. } => url,
        }
    }

    /// The pid of the runner at `address`, as its `/status` reports it (so it must run on
    /// this machine).
    async fn pid_of(&self, address: &str) -> anyhow::Result<nix::unistd::Pid> {
        let (Self::Own { config, .. } | Self::Existing { config, .. }) = self;
        let status: serde_json::Value = reqwest::Client::new()
            .get(format!("http://{address}/status"))
            .header(
                shoal::transport::http::SECRET_HEADER,
                &config.cluster.secret,
            )
            .send()
            .await?
            .error_for_status()
            .context("the runner's /status (is cluster.secret the cluster's?)")?
            .json()
            .await?;
        let pid = status["pid"]
            .as_i64()
            .context("the runner did not report its pid")?;
        if let Self::Own { runners, .. } = self {
            runners
                .iter()
                .find(|child| child.id().map(i64::from) == Some(pid))
                .context("the victim is not one of the drill's runners")?;
        }
        Ok(nix::unistd::Pid::from_raw(i32::try_from(pid)?))
    }

    async fn stop(&mut self) {
        if let Self::Own {
            runners, gateway, ..
        } = self
        {
            gateway.stop().await;
            for child in runners.iter_mut() {
                child.stop().await;
            }
        }
    }
}

async fn drill_once(
    args: &FailoverArgs,
    base: &ShoalConfig,
    pool: &sqlx::PgPool,
    cluster: &mut Cluster,
) -> anyhow::Result<DrillRun> {
    let config = cluster.config().clone();
    let storage = PgRunnerStorage::new(
        pool.clone(),
        &base.database.url,
        config.cluster.name.clone(),
        LockSessionSettings::default(),
    )?;
    let shards = config.cluster.shards_per_group.get() as usize;
    // The drill's own cluster must have all its runners; a running one at least two.
    let expected = match cluster {
        Cluster::Own { runners, .. } => runners.len(),
        Cluster::Existing { .. } => 2,
    };
    let settled = wait_for(&storage, Duration::from_secs(60), |s| {
        let alive: Vec<RunnerId> = s.runners.iter().filter(|r| r.alive).map(|r| r.id).collect();
        let assignment = assign(config.sharding(), &alive);
        alive.len() >= expected
            && s.owners.len() == shards
            && s.owners
                .iter()
                .all(|(shard, r)| assignment.owner(*shard) == Some(*r))
    })
    .await
    .context("the cluster did not settle (needs at least 2 live runners owning every shard)")?;
    wait_ready(cluster.url()).await?;
    let runners = settled.runners.iter().filter(|r| r.alive).count();
    let victim = match args.runner {
        Some(id) => settled.runners.iter().find(|r| r.alive && r.id.get() == id),
        None => settled
            .runners
            .iter()
            .filter(|r| r.alive)
            .max_by_key(|r| r.shards),
    }
    .context("no such live runner")?
    .clone();
    let moved: Vec<ShardId> = settled
        .owners
        .iter()
        .filter(|(_, owner)| **owner == victim.id)
        .map(|(shard, _)| *shard)
        .collect();

    let tag = format!("drill-{}", uuid::Uuid::now_v7().simple());
    let load = load::Load::start(
        cluster.url().to_owned(),
        tag.clone(),
        args.rate,
        args.entities,
    );
    let pid = cluster.pid_of(&victim.address).await?;
    let victim_session = lock_session_pid(pool, storage.namespaces(), victim.id).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_utc = Utc::now();
    let killed_at = Instant::now();
    let signal = match args.freeze {
        Some(_) => Signal::SIGSTOP,
        None => Signal::SIGKILL,
    };
    nix::sys::signal::kill(pid, signal).with_context(|| format!("sending {signal}"))?;
    let taken_over = await_takeover(pool, storage.namespaces(), victim_session, shards)
        .await
        .context("the survivors did not take over");
    let ownership_ms = killed_at.elapsed().as_secs_f64() * 1000.0;
    if let Some(seconds) = args.freeze {
        let thaw_at = killed_at + Duration::from_secs_f64(seconds.max(0.0));
        tokio::time::sleep_until(thaw_at.into()).await;
        nix::sys::signal::kill(pid, Signal::SIGCONT).context("sending SIGCONT")?;
    }
    taken_over?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let outcome = load.stop().await;
    let settled = settle(pool, &config, &tag, Duration::from_secs(60)).await?;
    let first_processed_ms = first_processed(pool, &config, &moved, killed_utc).await?;
    let sent_per_entity = outcome.sent_per_entity();
    let counts = counts(pool, &config, &tag).await?;
    let duplicated = sent_per_entity
        .iter()
        .map(|(entity, sent)| {
            counts
                .get(entity)
                .copied()
                .unwrap_or(0)
                .saturating_sub(*sent)
        })
        .sum();
    let lost = outcome
        .acknowledged
        .iter()
        .filter(|key| !settled.processed_keys.contains(*key))
        .count();
    Ok(DrillRun {
        runners,
        mode: if args.freeze.is_some() {
            "freeze"
        } else {
            "kill"
        },
        frozen_s: args.freeze,
        killed_runner: victim.id,
        shards_moved: moved.len(),
        ownership_ms,
        first_processed_ms,
        sent: outcome.sent,
        acknowledged: outcome.acknowledged.len(),
        processed: settled.processed_keys.len(),
        lost,
        duplicated,
        reexecuted: settled.attempts,
        failed_requests: outcome.failed,
    })
}

async fn wait_ready(url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(response) = reqwest::get(format!("{url}/ready")).await
            && response.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the gateway at {url} was not ready within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Settled {
    processed_keys: BTreeSet<String>,
    attempts: i64,
}

/// Waits until every message of the drill is processed (or `limit`), then reads them.
async fn settle(
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
async fn counts(
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
async fn first_processed(
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
async fn lock_session_pid(
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
async fn await_takeover(
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

async fn wait_for(
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

fn spawn(name: String, config: &ShoalConfig, args: &[&str]) -> anyhow::Result<ShoalChild> {
    let mut command = children::shoal_command(args)?;
    command
        .args(["--database-url", &config.database.url])
        .args(["--cluster", config.cluster.name.as_str()])
        .env(
            "SHOAL__CLUSTER__SHARDS_PER_GROUP",
            config.cluster.shards_per_group.to_string(),
        )
        .env("SHOAL__CLUSTER__SECRET", &config.cluster.secret)
        // The drill's own output is the JSON; its children log errors only, unless asked.
        .env(
            "SHOAL__LOG__FILTER",
            std::env::var("SHOAL_DRILL_LOG_FILTER").unwrap_or_else(|_| "error".to_owned()),
        );
    ShoalChild::spawn(name, &mut command)
}

/// Starts the drill's gateway on a free port; another process can take the port between
/// picking and binding, so a gateway that exits at once is started again on another.
async fn spawn_gateway(config: &ShoalConfig) -> anyhow::Result<(ShoalChild, String)> {
    for _ in 0..5 {
        let listen = format!("127.0.0.1:{}", free_port()?);
        let name = format!("gateway ({listen})");
        let mut gateway = spawn(name, config, &["gateway", "--listen", &listen])?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::time::Instant::now() < deadline {
            if gateway.exited()?.is_some() {
                break;
            }
            if reqwest::get(format!("http://{listen}/health"))
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok((gateway, listen));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        gateway.stop().await;
    }
    anyhow::bail!("the drill's gateway did not start (5 attempts)")
}
