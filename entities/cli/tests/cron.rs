//! Cluster cron, end to end: real `shoal runner` processes with `[[cron]]` schedules in a
//! config file, a `probe` entity recording every instant it is sent, runners killed
//! (SIGKILL) and the whole cluster stopped (SIGTERM) while schedules are due.
//!
//! What is checked: the `shoal-cron` singleton runs on at most one runner at a time; an
//! instant is stored and handled at most once (one `shoal_messages` row per key, no
//! duplicate in the probe's state); the missed-run policies fire what they promise across
//! failovers and a whole-cluster stop; bad schedules stop `shoal runner` with one `error:`
//! line; `shoal cron list` names the driving runner.
//!
//! Timings are printed (`--nocapture` shows them), never asserted.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use common::{DEADLINE, Runner, RunnerOptions, TestCluster, wait_until};
use serde::Deserialize;
use shoal::ids::RunnerId;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Small, so the tests run side by side without crowding Postgres' lock table.
const SHARDS: u32 = 64;
/// The singleton driving every schedule.
const DRIVER: &str = "shoal-cron";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Wall-clock seconds since the epoch (cron instants are wall-clock).
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// One `[[cron]]` entry sending `record {value = "{{instant}}"}` to probe `probe_id`.
fn schedule(name: &str, expression: &str, policy: &str, probe_id: &str) -> String {
    format!(
        "[[cron]]\nname = \"{name}\"\nexpression = \"{expression}\"\npolicy = \"{policy}\"\n\
         target = {{ entity-type = \"probe\", entity-id = \"{probe_id}\", message = \"record\", \
         payload = {{ value = \"{{{{instant}}}}\" }} }}\n\n"
    )
}

/// Writes `toml` as a config file in the cluster's directory.
fn write_config(cluster: &TestCluster, file: &str, toml: &str) -> anyhow::Result<PathBuf> {
    let path = cluster.dir.join(file);
    std::fs::write(&path, toml).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Runner options that load `config` (`SHOAL_CONFIG`).
fn with_config(config: &std::path::Path) -> RunnerOptions {
    RunnerOptions {
        env: vec![("SHOAL_CONFIG".to_owned(), config.display().to_string())],
        ..RunnerOptions::default()
    }
}

/// The part of `GET /status` these tests read.
#[derive(Debug, Deserialize)]
struct SingletonStatus {
    runner_id: Option<RunnerId>,
    singletons: Vec<String>,
}

fn http() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(2))
        .build()?)
}

async fn singleton_status(
    http: &reqwest::Client,
    addr: SocketAddr,
) -> anyhow::Result<SingletonStatus> {
    let response = http
        .get(format!("http://{addr}/status"))
        .header("x-shoal-secret", shoal_testkit::process::CLUSTER_SECRET)
        .send()
        .await?
        .error_for_status()?;
    Ok(response.json().await?)
}

/// Which of `runners` list the driver singleton now (unreachable ones count as not).
async fn drivers(http: &reqwest::Client, runners: &[Runner]) -> Vec<usize> {
    let mut found = Vec::new();
    for (i, runner) in runners.iter().enumerate() {
        if let Ok(status) = singleton_status(http, runner.addr).await
            && status.singletons.iter().any(|s| s == DRIVER)
        {
            found.push(i);
        }
    }
    found
}

/// Waits until exactly one of `runners` runs the driver; returns its index and the wait.
async fn await_one_driver(
    http: &reqwest::Client,
    runners: &[Runner],
) -> anyhow::Result<(usize, Duration)> {
    let took = wait_until(DEADLINE, "exactly one runner runs shoal-cron", || async {
        Ok(drivers(http, runners).await.len() == 1)
    })
    .await?;
    let found = drivers(http, runners).await;
    ensure!(found.len() == 1, "drivers changed under us: {found:?}");
    Ok((found[0], took))
}

/// SIGKILLs the runner driving the schedules and waits until one of the others runs the
/// driver; returns the victim (keep it: its log is printed if the test fails), the unix
/// time of the kill and of the moment a survivor was seen driving, and the failover time.
async fn kill_driver(
    http: &reqwest::Client,
    runners: &mut Vec<Runner>,
) -> anyhow::Result<(Runner, f64, f64, Duration)> {
    let (index, _) = await_one_driver(http, runners).await?;
    let mut victim = runners.remove(index);
    let killed_at = unix_now();
    let started = Instant::now();
    victim.kill()?;
    let survivors: &[Runner] = &runners[..];
    wait_until(DEADLINE, "a survivor runs shoal-cron", || async {
        Ok(!drivers(http, survivors).await.is_empty())
    })
    .await?;
    let took = started.elapsed();
    let back_at = unix_now();
    victim.wait_exit(DEADLINE).await?;
    Ok((victim, killed_at, back_at, took))
}

/// RFC 3339 instant (`2027-01-15T08:00:05.000Z`) → unix seconds, read by Postgres.
async fn epoch_of(cluster: &TestCluster, stamp: &str) -> anyhow::Result<f64> {
    let (seconds,): (f64,) = sqlx::query_as("SELECT extract(epoch FROM $1::timestamptz)::float8")
        .bind(stamp)
        .fetch_one(&cluster.pool)
        .await
        .with_context(|| format!("parsing instant {stamp:?}"))?;
    Ok(seconds)
}

/// One consistent snapshot (a single statement) of what a schedule did to its probe.
#[derive(Debug)]
struct Snapshot {
    /// The probe's `recorded` list, in handling order, as unix seconds.
    recorded: Vec<i64>,
    /// Instants of processed messages keyed `cron:<name>:…`.
    processed: BTreeSet<i64>,
    /// Instants of every message keyed `cron:<name>:…`.
    sent: BTreeSet<i64>,
    /// Rows keyed `cron:<name>:…`, and distinct keys among them.
    rows: i64,
    keys: i64,
}

async fn snapshot(cluster: &TestCluster, name: &str, probe: &str) -> anyhow::Result<Snapshot> {
    let prefix = format!("cron:{name}:");
    let (recorded, processed, sent, rows, keys): (Vec<String>, Vec<String>, Vec<String>, i64, i64) =
        sqlx::query_as(
            "SELECT
            (SELECT coalesce(array_agg(x.v ORDER BY x.n), '{}')
               FROM shoal_entity_state s,
                    jsonb_array_elements_text(s.state->'recorded') WITH ORDINALITY AS x(v, n)
              WHERE s.cluster = $1 AND s.entity_type = 'probe' AND s.entity_id = $2),
            (SELECT coalesce(array_agg(substr(idempotency_key, length($3) + 1)), '{}')
               FROM shoal_messages
              WHERE cluster = $1 AND left(idempotency_key, length($3)) = $3 AND processed),
            (SELECT coalesce(array_agg(substr(idempotency_key, length($3) + 1)), '{}')
               FROM shoal_messages
              WHERE cluster = $1 AND left(idempotency_key, length($3)) = $3),
            (SELECT count(*) FROM shoal_messages
              WHERE cluster = $1 AND left(idempotency_key, length($3)) = $3),
            (SELECT count(DISTINCT idempotency_key) FROM shoal_messages
              WHERE cluster = $1 AND left(idempotency_key, length($3)) = $3)",
        )
        .bind(&cluster.name)
        .bind(probe)
        .bind(&prefix)
        .fetch_one(&cluster.pool)
        .await?;
    Ok(Snapshot {
        recorded: whole_seconds(cluster, &recorded).await?,
        processed: whole_seconds(cluster, &processed)
            .await?
            .into_iter()
            .collect(),
        sent: whole_seconds(cluster, &sent).await?.into_iter().collect(),
        rows,
        keys,
    })
}

/// Instants as unix seconds; each must be a whole second written with milliseconds.
async fn whole_seconds(cluster: &TestCluster, stamps: &[String]) -> anyhow::Result<Vec<i64>> {
    if stamps.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<(String, f64)> = sqlx::query_as(
        "SELECT x.v, extract(epoch FROM x.v::timestamptz)::float8
           FROM unnest($1::text[]) WITH ORDINALITY AS x(v, n) ORDER BY x.n",
    )
    .bind(stamps)
    .fetch_all(&cluster.pool)
    .await?;
    rows.into_iter()
        .map(|(stamp, seconds)| {
            ensure!(
                stamp.ends_with(".000Z") && seconds.fract() == 0.0,
                "instant {stamp:?} is not a whole second in RFC 3339 with milliseconds"
            );
            Ok(seconds as i64)
        })
        .collect()
}

impl Snapshot {
    /// Exactly once: one row per key, no duplicate in the state, and the state holds exactly
    /// the instants whose messages were processed (they commit together).
    fn check_exactly_once(&self, what: &str) -> anyhow::Result<()> {
        ensure!(
            self.rows == self.keys,
            "{what}: {} message rows for {} keys",
            self.rows,
            self.keys
        );
        let unique: BTreeSet<i64> = self.recorded.iter().copied().collect();
        ensure!(
            unique.len() == self.recorded.len(),
            "{what}: duplicates recorded: {:?}",
            duplicates(&self.recorded)
        );
        ensure!(
            unique == self.processed,
            "{what}: recorded and processed differ: recorded only {:?}, processed only {:?}",
            unique.difference(&self.processed).collect::<Vec<_>>(),
            self.processed.difference(&unique).collect::<Vec<_>>()
        );
        // The driver waits for each instant before storing the next: handled in order.
        ensure!(
            self.recorded.windows(2).all(|w| w[0] < w[1]),
            "{what}: instants handled out of order: {:?}",
            self.recorded
        );
        Ok(())
    }

    /// Whole seconds between the first and last recorded instant that are missing.
    fn gaps(&self) -> Vec<i64> {
        let have: BTreeSet<i64> = self.recorded.iter().copied().collect();
        match (have.first(), have.last()) {
            (Some(first), Some(last)) => (*first..=*last).filter(|t| !have.contains(t)).collect(),
            _ => Vec::new(),
        }
    }

    fn last(&self) -> Option<i64> {
        self.recorded.iter().copied().max()
    }
}

fn duplicates(values: &[i64]) -> Vec<i64> {
    let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
    for v in values {
        *counts.entry(*v).or_default() += 1;
    }
    counts
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(v, _)| v)
        .collect()
}

/// Waits until probe `probe` has recorded an instant at or after `at` (unix seconds).
async fn await_recorded_through(
    cluster: &TestCluster,
    name: &str,
    probe: &str,
    at: f64,
) -> anyhow::Result<Snapshot> {
    let what = format!("probe {probe} records an instant at or after {at:.0}");
    wait_until(DEADLINE, &what, || async {
        let snap = snapshot(cluster, name, probe).await?;
        Ok(snap.last().is_some_and(|last| last as f64 >= at))
    })
    .await?;
    snapshot(cluster, name, probe).await
}

/// Runs `shoal` with `args` to its end; returns its status, stdout and stderr.
async fn shoal(
    cluster: &TestCluster,
    args: &[&str],
) -> anyhow::Result<(std::process::ExitStatus, String, String)> {
    let mut command = common::shoal_command(&cluster.dir);
    command
        .args(args)
        .env("SHOAL__CLUSTER__SHARDS_PER_GROUP", SHARDS.to_string());
    let output = shoal_testkit::process::output_within(&mut command, DEADLINE).await?;
    Ok((
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

// ---------------------------------------------------------------------------------------
// 1. The driver singleton runs on exactly one runner and fails over quickly
// ---------------------------------------------------------------------------------------

/// Samples every known runner's `/status` (concurrently) every 50 ms and remembers any
/// moment at which more than one listed the driver.
struct Sampler {
    addrs: Arc<Mutex<Vec<SocketAddr>>>,
    violations: Arc<Mutex<Vec<String>>>,
    samples: Arc<std::sync::atomic::AtomicUsize>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(http: reqwest::Client) -> Self {
        let addrs: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let violations: Arc<Mutex<Vec<String>>> = Arc::default();
        let samples = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (addrs, violations, samples, stop) = (
                addrs.clone(),
                violations.clone(),
                samples.clone(),
                stop.clone(),
            );
            async move {
                let mut tick = tokio::time::interval(Duration::from_millis(50));
                while !stop.is_cancelled() {
                    tick.tick().await;
                    let targets = addrs.lock().map(|a| a.clone()).unwrap_or_default();
                    let mut set = JoinSet::new();
                    for addr in targets {
                        let http = http.clone();
                        set.spawn(async move { (addr, singleton_status(&http, addr).await) });
                    }
                    let mut running = Vec::new();
                    while let Some(Ok((addr, status))) = set.join_next().await {
                        if let Ok(status) = status
                            && status.singletons.iter().any(|s| s == DRIVER)
                        {
                            running.push((addr, status.runner_id));
                        }
                    }
                    samples.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if running.len() > 1
                        && let Ok(mut v) = violations.lock()
                    {
                        v.push(format!("{running:?}"));
                    }
                }
            }
        });
        Self {
            addrs,
            violations,
            samples,
            stop,
            task,
        }
    }

    fn watch(&self, runner: &Runner) {
        // A new runner may get a dead one's port: watch each address once.
        if let Ok(mut addrs) = self.addrs.lock()
            && !addrs.contains(&runner.addr)
        {
            addrs.push(runner.addr);
        }
    }

    async fn finish(self) -> anyhow::Result<usize> {
        self.stop.cancel();
        self.task.await?;
        let violations = self
            .violations
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default();
        ensure!(
            violations.is_empty(),
            "shoal-cron ran on several runners at once: {violations:?}"
        );
        Ok(self.samples.load(std::sync::atomic::Ordering::Relaxed))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cron_singleton_runs_on_exactly_one_runner() -> anyhow::Result<()> {
    let cluster = TestCluster::new(SHARDS).await?;
    let config = write_config(
        &cluster,
        "cron.toml",
        &schedule("tick", "* * * * * *", "skip", "singleton-tick"),
    )?;
    let http = http()?;
    // Sampled from the first start on: the driver moves while runners join.
    let sampler = Sampler::start(http.clone());
    let mut runners = Vec::new();
    for _ in 0..3 {
        let runner = cluster.start_runner_with(with_config(&config)).await?;
        sampler.watch(&runner);
        runners.push(runner);
    }
    cluster
        .await_balanced(&runners.iter().collect::<Vec<_>>())
        .await?;
    let mut registered = BTreeSet::new();
    for runner in &runners {
        registered.extend(runner.status().await?.runner_id.map(|id| id.get()));
    }
    let (first, _) = await_one_driver(&http, &runners).await?;
    // A few seconds of steady state.
    let settled = Instant::now();
    wait_until(DEADLINE, "3 s of sampling", || async {
        Ok(settled.elapsed() > Duration::from_secs(3))
    })
    .await?;
    let (still, _) = await_one_driver(&http, &runners).await?;
    ensure!(
        still == first,
        "the driver moved in a balanced cluster: {} then {}",
        runners[first].name,
        runners[still].name
    );

    let mut graveyard = Vec::new();
    for round in 1..=2 {
        let (victim, _, _, took) = kill_driver(&http, &mut runners).await?;
        eprintln!(
            "shoal-cron failover after SIGKILL of {} (round {round}): {took:?}",
            victim.name
        );
        graveyard.push(victim);
        let (driver, _) = await_one_driver(&http, &runners).await?;
        let view = singleton_status(&http, runners[driver].addr).await?;
        ensure!(view.runner_id.is_some(), "{view:?}");
        // Back to three runners for the next round.
        let runner = cluster.start_runner_with(with_config(&config)).await?;
        sampler.watch(&runner);
        runners.push(runner);
        cluster
            .await_balanced(&runners.iter().collect::<Vec<_>>())
            .await?;
        let newest = runners.last().context("a runner was just started")?;
        registered.extend(newest.status().await?.runner_id.map(|id| id.get()));
        await_one_driver(&http, &runners).await?;
    }
    let samples = sampler.finish().await?;
    eprintln!("{samples} samples of every runner's /status: never more than one driver");
    ensure!(samples > 20, "only {samples} samples");
    // The driver did its work too.
    let snap = await_recorded_through(&cluster, "tick", "singleton-tick", unix_now()).await?;
    snap.check_exactly_once("tick")?;
    // The drivers' message ids carry their runner ids as machine ids (snowflake bits 12-21).
    let machines: Vec<i64> = sqlx::query_scalar(
        "SELECT DISTINCT (id >> 12) & 1023 FROM shoal_messages
          WHERE cluster = $1 AND idempotency_key LIKE 'cron:tick:%'",
    )
    .bind(&cluster.name)
    .fetch_all(&cluster.pool)
    .await?;
    let expected: BTreeSet<i64> = registered.iter().map(|id| i64::from(*id) & 1023).collect();
    ensure!(
        !machines.is_empty() && machines.iter().all(|m| expected.contains(m)),
        "cron message machine ids {machines:?}, registered runners {registered:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 2, 3. Failovers under run-all and skip
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_all_fires_every_instant_once_across_kills() -> anyhow::Result<()> {
    let cluster = TestCluster::new(SHARDS).await?;
    let config = write_config(
        &cluster,
        "cron.toml",
        &schedule("every-second", "* * * * * *", "run-all", "cron-run-all"),
    )?;
    let http = http()?;
    let mut runners = Vec::new();
    for _ in 0..3 {
        runners.push(cluster.start_runner_with(with_config(&config)).await?);
    }
    let started = unix_now();
    let mut graveyard = Vec::new();
    let mut outages = Vec::new();
    for at in [8.0, 18.0] {
        // Run until the schedule has fired for a while, then kill whoever drives it.
        await_recorded_through(&cluster, "every-second", "cron-run-all", started + at).await?;
        let (victim, killed_at, back_at, took) = kill_driver(&http, &mut runners).await?;
        eprintln!(
            "run-all: shoal-cron back {took:?} after SIGKILL of {}",
            victim.name
        );
        outages.push((killed_at, back_at));
        graveyard.push(victim);
        runners.push(cluster.start_runner_with(with_config(&config)).await?);
    }
    // Run to ~30 s, then let the backlog drain up to now.
    let end = (started + 30.0).max(unix_now() + 3.0);
    let snap = await_recorded_through(&cluster, "every-second", "cron-run-all", end).await?;
    snap.check_exactly_once("run-all")?;
    let gaps = snap.gaps();
    ensure!(gaps.is_empty(), "run-all left gaps: {gaps:?}");
    let (first, last) = (snap.recorded[0], snap.last().unwrap_or_default());
    for (killed_at, back_at) in &outages {
        ensure!(
            (first as f64) < *killed_at && (last as f64) > *back_at,
            "the recorded span {first}..{last} does not cover the outage {killed_at}..{back_at}"
        );
    }
    eprintln!(
        "run-all: {} instants over {} s, 2 kills, no gap, no duplicate",
        snap.recorded.len(),
        last - first + 1
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_misses_only_instants_inside_the_outage() -> anyhow::Result<()> {
    let cluster = TestCluster::new(SHARDS).await?;
    let config = write_config(
        &cluster,
        "cron.toml",
        &schedule("every-second", "* * * * * *", "skip", "cron-skip"),
    )?;
    let http = http()?;
    let mut runners = Vec::new();
    for _ in 0..3 {
        runners.push(cluster.start_runner_with(with_config(&config)).await?);
    }
    let started = unix_now();
    await_recorded_through(&cluster, "every-second", "cron-skip", started + 6.0).await?;
    let (victim, killed_at, back_at, took) = kill_driver(&http, &mut runners).await?;
    eprintln!(
        "skip: shoal-cron back {took:?} after SIGKILL of {}",
        victim.name
    );
    runners.push(cluster.start_runner_with(with_config(&config)).await?);
    let snap =
        await_recorded_through(&cluster, "every-second", "cron-skip", unix_now() + 5.0).await?;
    snap.check_exactly_once("skip")?;
    let gaps = snap.gaps();
    // An instant is on time up to 1 s late, and under load the dying driver may itself run
    // up to ~1 s behind (each instant waits for the previous one's reply): an instant it had
    // not stored yet is rightly skipped. So the window opens 2 s before the kill.
    let (from, to) = (killed_at - 2.0, back_at + 1.0);
    let outside: Vec<i64> = gaps
        .iter()
        .copied()
        .filter(|t| (*t as f64) < from || (*t as f64) > to)
        .collect();
    ensure!(
        outside.is_empty(),
        "skip missed {outside:?} outside the outage {killed_at:.3}..{back_at:.3} (-2 s, +1 s)"
    );
    ensure!(
        (snap.recorded[0] as f64) < killed_at,
        "nothing recorded before the kill"
    );
    eprintln!(
        "skip: {} instants recorded, {} missed, all inside the outage",
        snap.recorded.len(),
        gaps.len()
    );
    drop(victim);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 4. A whole-cluster stop
// ---------------------------------------------------------------------------------------

/// Runs `every` (each second) and `sparse` (each 10 s) under `policy` on two runners, stops
/// both (SIGTERM) for at least 5 s, and starts two again 2 s after a multiple of 10 s, so
/// the latest `sparse` instant is 2 s late (beyond on-time) when the driver starts.
struct StopOutcome {
    /// Newest `every` instant sent before the stop.
    every_before: i64,
    /// `every` after the restart was checked exactly once.
    every: Snapshot,
    /// `sparse` instants that fell in the outage (after everything sent or handled before).
    sparse_outage: Vec<i64>,
    /// `sparse` after the restart.
    sparse: Snapshot,
    /// Unix time just before the new runners were spawned.
    spawned_at: f64,
    /// Unix time the new driver was seen running.
    driving_at: f64,
}

async fn whole_cluster_stop(policy: &str) -> anyhow::Result<StopOutcome> {
    let cluster = TestCluster::new(SHARDS).await?;
    let every_probe = format!("stop-every-{policy}");
    let sparse_probe = format!("stop-sparse-{policy}");
    let config = write_config(
        &cluster,
        "cron.toml",
        &format!(
            "{}{}",
            schedule("every", "* * * * * *", policy, &every_probe),
            schedule("sparse", "*/10 * * * * *", policy, &sparse_probe)
        ),
    )?;
    let http = http()?;
    let mut runners = vec![
        cluster.start_runner_with(with_config(&config)).await?,
        cluster.start_runner_with(with_config(&config)).await?,
    ];
    await_one_driver(&http, &runners).await?;
    await_recorded_through(&cluster, "every", &every_probe, unix_now() + 3.0).await?;

    for runner in &runners {
        runner.terminate()?;
    }
    for runner in &mut runners {
        let status = runner.wait_exit(DEADLINE).await?;
        ensure!(status.success(), "{} exited with {status}", runner.name);
    }
    let stopped_at = unix_now();
    let every_before = snapshot(&cluster, "every", &every_probe)
        .await?
        .sent
        .last()
        .copied()
        .context("nothing sent before the stop")?;
    // Everything of `sparse` before the outage: sent, or handled (the schedule's start).
    let sparse_sent = snapshot(&cluster, "sparse", &sparse_probe).await?.sent;
    let (handled,): (f64,) = sqlx::query_as(
        "SELECT extract(epoch FROM last_fired)::float8 FROM shoal_cron_state
          WHERE cluster = $1 AND name = 'sparse'",
    )
    .bind(&cluster.name)
    .fetch_one(&cluster.pool)
    .await?;
    let sparse_before = sparse_sent
        .last()
        .map_or(handled, |s| (*s as f64).max(handled));

    // At least 5 s down, and back 2 s after a multiple of 10 s.
    let restart_at = ((stopped_at + 5.0 - 2.0) / 10.0).ceil() * 10.0 + 2.0;
    let wait = Duration::from_secs_f64((restart_at - unix_now()).max(0.0));
    tokio::time::sleep(wait).await;
    let spawned_at = unix_now();
    let restarted = vec![
        cluster.start_runner_with(with_config(&config)).await?,
        cluster.start_runner_with(with_config(&config)).await?,
    ];
    wait_until(DEADLINE, "a runner drives the schedules again", || async {
        Ok(!drivers(&http, &restarted).await.is_empty())
    })
    .await?;
    let driving_at = unix_now();
    let latest_sparse = (spawned_at / 10.0).floor() * 10.0;
    ensure!(
        driving_at < latest_sparse + 9.5,
        "the driver took until {driving_at:.3} to start, past the next sparse instant \
         after {latest_sparse}: the test's timing premise does not hold"
    );
    let sparse_outage: Vec<i64> = (0..)
        .map(|k| latest_sparse as i64 - 10 * k)
        .take_while(|t| *t as f64 > sparse_before)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    ensure!(
        !sparse_outage.is_empty(),
        "no sparse instant in the outage ({sparse_before}..{latest_sparse})"
    );

    let every = await_recorded_through(&cluster, "every", &every_probe, driving_at + 3.0).await?;
    every.check_exactly_once(&format!("{policy} every"))?;
    // The driver handled `sparse` at its start; let what it sent be processed.
    wait_until(DEADLINE, "every sparse message is processed", || async {
        let sparse = snapshot(&cluster, "sparse", &sparse_probe).await?;
        Ok(sparse.sent == sparse.processed)
    })
    .await?;
    let sparse = snapshot(&cluster, "sparse", &sparse_probe).await?;
    sparse.check_exactly_once(&format!("{policy} sparse"))?;
    eprintln!(
        "{policy}: stopped at {stopped_at:.3} (every sent through {every_before}), respawned at \
         {spawned_at:.3}, driving at {driving_at:.3} ({:.3} s after spawn); sparse outage \
         instants {sparse_outage:?}",
        driving_at - spawned_at
    );
    drop(runners);
    drop(restarted);
    Ok(StopOutcome {
        every_before,
        every,
        sparse_outage,
        sparse,
        spawned_at,
        driving_at,
    })
}

impl StopOutcome {
    /// `every` instants recorded after the stop, sorted: contiguous from the first one on.
    fn every_after(&self) -> anyhow::Result<Vec<i64>> {
        let mut after: Vec<i64> = self
            .every
            .recorded
            .iter()
            .copied()
            .filter(|t| *t > self.every_before)
            .collect();
        after.sort_unstable();
        ensure!(!after.is_empty(), "nothing recorded after the restart");
        ensure!(
            after.windows(2).all(|w| w[1] == w[0] + 1),
            "gaps after the restart: {after:?}"
        );
        // The instants before the stop have no gaps either (the cluster was healthy).
        let mut before: Vec<i64> = self
            .every
            .recorded
            .iter()
            .copied()
            .filter(|t| *t <= self.every_before)
            .collect();
        before.sort_unstable();
        ensure!(
            before.windows(2).all(|w| w[1] == w[0] + 1),
            "gaps before the stop: {before:?}"
        );
        Ok(after)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_stop_run_all_fires_every_missed_instant() -> anyhow::Result<()> {
    let outcome = whole_cluster_stop("run-all").await?;
    let after = outcome.every_after()?;
    ensure!(
        after[0] == outcome.every_before + 1,
        "run-all resumed at {} after {}: the outage's instants are missing",
        after[0],
        outcome.every_before
    );
    ensure!(
        outcome.spawned_at - outcome.every_before as f64 >= 4.0,
        "the outage was too short to mean anything"
    );
    let gaps = outcome.every.gaps();
    ensure!(gaps.is_empty(), "run-all left gaps: {gaps:?}");
    let fired: BTreeSet<i64> = outcome.sparse.recorded.iter().copied().collect();
    for t in &outcome.sparse_outage {
        ensure!(fired.contains(t), "run-all did not fire sparse instant {t}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_stop_run_once_fires_only_the_latest_missed_instant() -> anyhow::Result<()> {
    let outcome = whole_cluster_stop("run-once").await?;
    let after = outcome.every_after()?;
    // The first instant after the restart is the latest due when the driver started; every
    // instant between the stop and it is missing.
    let first = after[0];
    ensure!(
        first as f64 >= outcome.spawned_at.floor() && first as f64 <= outcome.driving_at,
        "run-once resumed at {first}, not the latest instant due at the driver's start \
         ({:.3}..{:.3})",
        outcome.spawned_at,
        outcome.driving_at
    );
    ensure!(
        first - outcome.every_before >= 4,
        "run-once resumed at {first} right after {}: no outage instants were missed",
        outcome.every_before
    );
    // `sparse`: its latest outage instant was 2 s late at the restart, beyond on-time; it is
    // fired anyway, once, and the older ones are not.
    let (latest, older) = outcome
        .sparse_outage
        .split_last()
        .context("sparse outage instants")?;
    let fired: BTreeSet<i64> = outcome.sparse.recorded.iter().copied().collect();
    ensure!(
        fired.contains(latest),
        "run-once did not fire the latest missed sparse instant {latest}: {fired:?}"
    );
    for t in older {
        ensure!(
            !fired.contains(t),
            "run-once fired older sparse instant {t}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_stop_skip_fires_no_missed_instant() -> anyhow::Result<()> {
    let outcome = whole_cluster_stop("skip").await?;
    let after = outcome.every_after()?;
    // Only an instant at most 1 s late when the driver started (which is after the spawn).
    ensure!(
        after[0] as f64 >= outcome.spawned_at - 1.0,
        "skip fired {} after the restart at {:.3}: an instant more than 1 s late",
        after[0],
        outcome.spawned_at
    );
    ensure!(
        after[0] - outcome.every_before >= 4,
        "skip resumed at {} right after {}: no outage instants were missed",
        after[0],
        outcome.every_before
    );
    let fired: BTreeSet<i64> = outcome.sparse.sent.clone();
    for t in &outcome.sparse_outage {
        ensure!(
            !fired.contains(t),
            "skip fired sparse instant {t}, 2 s late at the restart"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 5. Bad schedules stop the runner
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misconfigured_schedules_refuse_to_start() -> anyhow::Result<()> {
    let cluster = TestCluster::new(SHARDS).await?;
    let target = |entity_type: &str, message: &str, payload: &str| {
        format!(
            "target = {{ entity-type = \"{entity_type}\", entity-id = \"x\", \
             message = \"{message}\", payload = {payload} }}\n"
        )
    };
    let cases = [
        (
            "bad-expression",
            format!(
                "[[cron]]\nname = \"bad-expression\"\nexpression = \"every full moon\"\n{}",
                target("probe", "record", "{ value = 1 }")
            ),
            "does not parse",
        ),
        (
            "bad-zone",
            format!(
                "[[cron]]\nname = \"bad-zone\"\nexpression = \"* * * * * *\"\n\
                 time-zone = \"Mars/Olympus_Mons\"\n{}",
                target("probe", "record", "{ value = 1 }")
            ),
            "time zone",
        ),
        (
            "bad-type",
            format!(
                "[[cron]]\nname = \"bad-type\"\nexpression = \"* * * * * *\"\n{}",
                target("no-such-type", "record", "{ value = 1 }")
            ),
            "no-such-type",
        ),
        (
            "bad-message",
            format!(
                "[[cron]]\nname = \"bad-message\"\nexpression = \"* * * * * *\"\n{}",
                target("probe", "no_such_message", "{ value = 1 }")
            ),
            "bad-message",
        ),
        (
            "volatile",
            format!(
                "[[cron]]\nname = \"volatile\"\nexpression = \"* * * * * *\"\n{}",
                target("probe", "echo", "{ value = 1 }")
            ),
            "volatile",
        ),
    ];
    for (name, toml, expected) in &cases {
        let config = write_config(&cluster, &format!("{name}.toml"), toml)?;
        let config = config.display().to_string();
        let (status, stdout, stderr) = shoal(
            &cluster,
            &[
                "--config",
                &config,
                "runner",
                "--database-url",
                &cluster.db.url,
                "--listen",
                "127.0.0.1:0",
                "--cluster",
                &cluster.name,
            ],
        )
        .await?;
        let output = format!("{stdout}{stderr}");
        ensure!(!status.success(), "{name}: the runner started:\n{output}");
        ensure!(
            !output.contains("panicked"),
            "{name}: the runner panicked:\n{output}"
        );
        let errors: Vec<&str> = output.lines().filter(|l| l.contains("error:")).collect();
        ensure!(
            errors.len() == 1,
            "{name}: expected one error line, got:\n{output}"
        );
        let line = errors[0];
        ensure!(
            line.starts_with("error:")
                && line.contains(&format!("`{name}`"))
                && line.contains(expected),
            "{name}: the error line does not name the schedule and the problem ({expected}): \
             {line}"
        );
        eprintln!("{name}: {status}: {line}");
    }
    // None of them registered.
    let snapshot = cluster.snapshot().await?;
    ensure!(
        snapshot.runners.is_empty(),
        "runners registered: {:?}",
        snapshot.runners
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 6. `shoal cron list`
// ---------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct Listing {
    schedules: Vec<ListedSchedule>,
}

#[derive(Debug, Deserialize)]
struct ListedSchedule {
    name: String,
    expression: String,
    policy: String,
    last_fired: Option<String>,
    next: Option<String>,
    runner: Option<RunnerId>,
}

async fn cron_list(cluster: &TestCluster, config: &std::path::Path) -> anyhow::Result<Listing> {
    let config = config.display().to_string();
    let (status, stdout, stderr) = shoal(
        cluster,
        &[
            "--config",
            &config,
            "cron",
            "list",
            "--database-url",
            &cluster.db.url,
            "--cluster",
            &cluster.name,
        ],
    )
    .await?;
    ensure!(
        status.success(),
        "shoal cron list failed ({status}): {stderr}"
    );
    serde_json::from_str(&stdout).with_context(|| format!("parsing {stdout:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cron_list_names_the_driving_runner() -> anyhow::Result<()> {
    let cluster = TestCluster::new(SHARDS).await?;
    let config = write_config(
        &cluster,
        "cron.toml",
        &format!(
            "{}{}",
            schedule("listed", "* * * * * *", "run-once", "cron-listed"),
            schedule("hourly", "0 0 * * * *", "run-all", "cron-hourly")
        ),
    )?;
    let http = http()?;
    let mut runners = vec![
        cluster.start_runner_with(with_config(&config)).await?,
        cluster.start_runner_with(with_config(&config)).await?,
    ];
    let mut graveyard = Vec::new();
    for round in 0..2 {
        cluster
            .await_balanced(&runners.iter().collect::<Vec<_>>())
            .await?;
        let (driver, _) = await_one_driver(&http, &runners).await?;
        let driver_id = singleton_status(&http, runners[driver].addr)
            .await?
            .runner_id
            .context("the driver has an id")?;
        let snap = await_recorded_through(&cluster, "listed", "cron-listed", unix_now()).await?;
        let newest = snap.last().context("recorded")?;
        // The driver records an instant as handled just after its message is processed, so
        // the listing may trail the probe by a moment: await it (bounded).
        let deadline = Instant::now() + Duration::from_secs(5);
        let listing = loop {
            let listing = cron_list(&cluster, &config).await?;
            let listed_at = listing
                .schedules
                .iter()
                .find(|s| s.name == "listed")
                .and_then(|s| s.last_fired.clone());
            let caught_up = match listed_at {
                Some(at) => epoch_of(&cluster, &at).await? >= newest as f64,
                None => false,
            };
            if caught_up || Instant::now() > deadline {
                break listing;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        ensure!(listing.schedules.len() == 2, "{listing:?}");
        let listed = listing
            .schedules
            .iter()
            .find(|s| s.name == "listed")
            .context("`listed` is listed")?;
        ensure!(
            listed.expression == "* * * * * *" && listed.policy == "run-once",
            "{listed:?}"
        );
        ensure!(
            listed.runner == Some(driver_id),
            "cron list names runner {:?}; {} (id {driver_id}) runs shoal-cron",
            listed.runner,
            runners[driver].name
        );
        let last_fired = epoch_of(
            &cluster,
            listed.last_fired.as_deref().context("last_fired")?,
        )
        .await?;
        let next = epoch_of(&cluster, listed.next.as_deref().context("next")?).await?;
        ensure!(
            last_fired >= newest as f64 && last_fired <= unix_now(),
            "last_fired {last_fired} is not at or after the newest recorded instant {newest}"
        );
        ensure!(
            next > last_fired && next <= unix_now() + 1.0 && next.fract() == 0.0,
            "next {next} is not the coming second (last fired {last_fired})"
        );
        let hourly = listing
            .schedules
            .iter()
            .find(|s| s.name == "hourly")
            .context("`hourly` is listed")?;
        let hourly_next = epoch_of(&cluster, hourly.next.as_deref().context("next")?).await?;
        ensure!(
            hourly.policy == "run-all"
                && hourly.runner == Some(driver_id)
                && hourly_next % 3600.0 == 0.0
                && hourly_next > unix_now(),
            "{hourly:?}"
        );
        eprintln!("round {round}: cron list {listed:?}");
        if round == 0 {
            // The listing follows the driver to a survivor.
            let (victim, _, _, took) = kill_driver(&http, &mut runners).await?;
            eprintln!("cron list: shoal-cron back {took:?} after SIGKILL");
            graveyard.push(victim);
        }
    }
    if graveyard.is_empty() {
        bail!("no failover happened");
    }
    Ok(())
}
