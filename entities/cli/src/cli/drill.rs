//! `shoal drill failover`: drive a steady load of persisted messages through a gateway, kill
//! a runner with SIGKILL (or freeze it with SIGSTOP for `--freeze SECONDS`, then SIGCONT),
//! keep the load going, and report what the users of the cluster
//! would see: time to full ownership, time to the first message processed on a moved shard,
//! and whether anything acknowledged was lost or committed twice. Against a running cluster
//! (`--gateway URL`) or one it starts itself (`--runners N`). Progress on stderr, one JSON
//! object on stdout.

mod cluster;
mod load;
mod observe;
mod report;

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::Utc;
use clap::{Args, Subcommand};
use nix::sys::signal::Signal;
use shoal::config::{ConfigLoader, ShoalConfig};
use shoal::ids::{RunnerId, ShardId};
use shoal::runner_storage::postgres::{LockSessionSettings, PgRunnerStorage};
use shoal::sharding::assign;

use super::{ClusterArgs, DatabaseArgs};

use cluster::{Cluster, wait_ready};
use observe::{await_takeover, counts, first_processed, lock_session_pid, settle, wait_for};
use report::{DrillRun, report};

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
