//! `shoal drill failover`: start a cluster of runner processes, kill one with SIGKILL, and
//! measure how long the survivors take to own every shard. Progress goes to stderr, one
//! JSON object to stdout.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde::Serialize;
use shoal::config::{ConfigLoader, ShoalConfig};
use shoal::ids::RunnerId;
use shoal::runner_storage::postgres::{LockSessionSettings, PgRunnerStorage};
use shoal::runner_storage::{ClusterSnapshot, RunnerStorage};
use tokio::process::{Child, Command};

use super::DatabaseArgs;

#[derive(Debug, Subcommand)]
pub(crate) enum DrillCommand {
    /// Kill a runner with SIGKILL and measure the time until its shards are owned again.
    Failover(FailoverArgs),
}

#[derive(Debug, Args)]
pub(crate) struct FailoverArgs {
    #[command(flatten)]
    db: DatabaseArgs,
    /// Runner processes to start.
    #[arg(long, default_value_t = 3, env = "SHOAL_DRILL_RUNNERS")]
    runners: usize,
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
            Self::Failover(args) => loader.set("database.url", args.db.database_url.clone()),
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
    shards: u32,
    killed_runner: RunnerId,
    shards_moved: usize,
    ownership_ms: f64,
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
}

async fn failover(args: &FailoverArgs, config: ShoalConfig) -> anyhow::Result<()> {
    if args.runners < 2 {
        bail!("--runners must be at least 2 (one to kill, one to take over)");
    }
    let pool = super::connect(&config).await?;
    shoal::MIGRATOR
        .run(&pool)
        .await
        .context("applying migrations")?;
    let mut runs = Vec::new();
    for round in 0..args.repeat.max(1) {
        let run = drill_once(args, &config, &pool).await?;
        eprintln!(
            "drill {}/{}: killed runner {} ({} shards); survivors owned every shard after {:.0} ms",
            round + 1,
            args.repeat.max(1),
            run.killed_runner,
            run.shards_moved,
            run.ownership_ms
        );
        runs.push(run);
    }
    pool.close().await;
    let report = if runs.len() == 1 {
        DrillReport {
            last: runs.remove(0),
            runs: Vec::new(),
            ownership_ms_p50: None,
            ownership_ms_p99: None,
        }
    } else {
        let mut times: Vec<f64> = runs.iter().map(|r| r.ownership_ms).collect();
        times.sort_by(f64::total_cmp);
        DrillReport {
            last: runs.last().cloned().context("at least one run")?,
            ownership_ms_p50: Some(percentile(&times, 0.50)),
            ownership_ms_p99: Some(percentile(&times, 0.99)),
            runs,
        }
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

struct Spawned {
    child: Child,
    address: String,
}

async fn drill_once(
    args: &FailoverArgs,
    config: &ShoalConfig,
    pool: &sqlx::PgPool,
) -> anyhow::Result<DrillRun> {
    let cluster = shoal::ClusterName::new(format!("drill-{}", uuid::Uuid::now_v7().simple()))?;
    let storage = PgRunnerStorage::new(
        pool.clone(),
        &config.database.url,
        cluster.clone(),
        LockSessionSettings::default(),
    )?;
    let shards = config.cluster.shards_per_group.get();
    let mut children = Vec::new();
    for _ in 0..args.runners {
        children.push(spawn_runner(config, &cluster)?);
    }
    let result = measure(&storage, &mut children, shards, args.runners).await;
    for spawned in &mut children {
        stop(&mut spawned.child).await;
    }
    result
}

async fn measure(
    storage: &PgRunnerStorage,
    children: &mut [Spawned],
    shards: u32,
    runners: usize,
) -> anyhow::Result<DrillRun> {
    let cap = (shards as usize).div_ceil(runners);
    let ready = wait_for(storage, Duration::from_secs(60), |s| {
        let alive = s.runners.iter().filter(|r| r.alive).count();
        alive == runners
            && s.owners.len() == shards as usize
            && s.runners.iter().all(|r| r.shards <= cap)
    })
    .await
    .context("the cluster did not settle")?;
    let victim = ready
        .runners
        .iter()
        .filter(|r| r.alive)
        .max_by_key(|r| r.shards)
        .context("no live runner")?
        .clone();
    let child = children
        .iter_mut()
        .find(|c| c.address == victim.address)
        .context("victim is not one of ours")?;
    let killed_at = Instant::now();
    child.child.start_kill().context("sending SIGKILL")?;
    wait_for(storage, Duration::from_secs(60), |s| {
        s.owners.len() == shards as usize && s.owners.values().all(|r| *r != victim.id)
    })
    .await
    .context("the survivors did not take over")?;
    Ok(DrillRun {
        runners,
        shards,
        killed_runner: victim.id,
        shards_moved: victim.shards,
        ownership_ms: killed_at.elapsed().as_secs_f64() * 1000.0,
    })
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

fn spawn_runner(config: &ShoalConfig, cluster: &shoal::ClusterName) -> anyhow::Result<Spawned> {
    let port = free_port()?;
    let address = format!("127.0.0.1:{port}");
    let exe: PathBuf = std::env::current_exe().context("locating the shoal binary")?;
    let child = Command::new(exe)
        .args(["runner", "--database-url", &config.database.url])
        .args(["--listen", &address, "--cluster", cluster.as_str()])
        .env(
            "SHOAL__CLUSTER__SHARDS_PER_GROUP",
            config.cluster.shards_per_group.to_string(),
        )
        .env("SHOAL__LOG__FILTER", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting a runner")?;
    Ok(Spawned { child, address })
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

async fn stop(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .is_err()
    {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}
