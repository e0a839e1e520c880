//! The cluster core, end to end: real `shoal runner` processes sharing shards through one
//! Postgres database. Runners are split, killed (SIGKILL), stopped (SIGTERM), partitioned
//! from the database (fencing), misconfigured, and run as two clusters in one database.
//!
//! Timings are printed (`--nocapture` shows them), never asserted: the drill measures them.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use common::{
    DEADLINE, Proxy, Runner, RunnerOptions, TestCluster, run_shoal_in, server_addr, wait_until,
    with_host_port,
};
use shoal::ids::{Epoch, RunnerId, ShardId};
use shoal::sharding::{Sharding, assign};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

/// The default shard count; the tests that measure or check the split use it.
const FULL: u32 = 1024;
/// A smaller count for tests about other things, to keep Postgres' lock table (about
/// 6,400 entries by default) comfortable while the tests run in parallel.
const SMALL: u32 = 256;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_runners_split_the_shards() -> anyhow::Result<()> {
    let cluster = TestCluster::new(FULL).await?;
    let runners = [
        cluster.start_runner().await?,
        cluster.start_runner().await?,
        cluster.start_runner().await?,
    ];
    let refs: Vec<&Runner> = runners.iter().collect();
    let took = cluster.await_balanced(&refs).await?;
    eprintln!("three runners balanced {FULL} shards in {took:?}");

    // Each runner's own view: disjoint, together every shard, each what the assignment gives
    // it, none far from a third.
    let live = [
        runners[0].id().await?,
        runners[1].id().await?,
        runners[2].id().await?,
    ];
    let assignment = assign(Sharding::default(), &live);
    let mut seen = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for runner in &runners {
        let view = runner.status().await?;
        ensure!(view.phase == "active", "{} is {}", runner.name, view.phase);
        let id = view.runner_id.context("registered")?;
        ensure!(
            view.owned.keys().copied().eq(assignment.shards_of(id)),
            "{} owns {} shards, not its assigned {}",
            runner.name,
            view.owned.len(),
            assignment.shards_of(id).count()
        );
        ensure!(
            (300..=380).contains(&view.owned.len()),
            "{} owns {}",
            runner.name,
            view.owned.len()
        );
        for shard in view.owned.keys() {
            ensure!(seen.insert(*shard), "shard {shard} believed owned twice");
        }
        ids.insert(id);
    }
    ensure!(
        seen.len() == FULL as usize,
        "views cover {} shards",
        seen.len()
    );

    // And `shoal status --json` agrees.
    let status = cluster.cluster_status().await?;
    ensure!(status.cluster == cluster.name, "{status:?}");
    ensure!(
        status.shards_total == FULL && status.unowned == 0,
        "{status:?}"
    );
    ensure!(status.runners.len() == 3, "{status:?}");
    ensure!(status.runners.iter().all(|r| r.alive), "{status:?}");
    let total: usize = status.runners.iter().map(|r| r.shards).sum();
    ensure!(total == FULL as usize, "shard counts sum to {total}");
    let listed: BTreeSet<RunnerId> = status.runners.iter().map(|r| r.id).collect();
    ensure!(
        listed == ids,
        "status lists {listed:?}, runners are {ids:?}"
    );
    for runner in &runners {
        let view = runner.status().await?;
        let line = status
            .runners
            .iter()
            .find(|r| Some(r.id) == view.runner_id)
            .context("runner listed")?;
        ensure!(line.address == runner.addr.to_string(), "{line:?}");
        ensure!(
            line.shards == view.owned.len(),
            "{line:?} vs {}",
            view.owned.len()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_survivors_take_every_shard_safely() -> anyhow::Result<()> {
    let cluster = TestCluster::new(FULL).await?;
    // The sampler watches from the first runner on: start-up hand-offs count too.
    let sampler = Sampler::start(&cluster)?;
    let mut runners = Vec::new();
    for _ in 0..3 {
        let runner = cluster.start_runner().await?;
        sampler.watch(&runner);
        runners.push(runner);
    }
    cluster
        .await_balanced(&runners.iter().collect::<Vec<_>>())
        .await?;
    // At least one whole sample of the balanced cluster before the kill.
    sampler.await_more_samples(2).await?;
    let before = cluster.snapshot().await?;

    let victim = runners[0].id().await?;
    let survivors = [runners[1].id().await?, runners[2].id().await?];
    let killed_at = Instant::now();
    runners[0].kill()?;
    let took = wait_until(DEADLINE, "the survivors own every shard", || {
        cluster.all_owned_by(&survivors)
    })
    .await?;
    eprintln!(
        "kill -9 → every shard owned by the survivors: {:?}",
        killed_at.elapsed()
    );
    let status = runners[0].wait_exit(DEADLINE).await?;
    ensure!(!status.success(), "killed runner exited with {status}");

    // The survivors' own views come to agree too.
    let (a, b) = (&runners[1], &runners[2]);
    wait_until(
        DEADLINE,
        "the survivors' views cover every shard",
        || async {
            let (va, vb) = (a.status().await?, b.status().await?);
            let covered: BTreeSet<ShardId> =
                va.owned.keys().chain(vb.owned.keys()).copied().collect();
            Ok(covered.len() == FULL as usize && va.owned.len() + vb.owned.len() == FULL as usize)
        },
    )
    .await?;
    // Once still, each survivor holds every shard it held before the kill under the same
    // epoch: only the victim's shards moved (none waited for a drain on a survivor).
    cluster.await_balanced(&[a, b]).await?;
    let snapshot = cluster.snapshot().await?;
    for (shard, owner) in before.owners.iter().filter(|(_, r)| survivors.contains(r)) {
        ensure!(
            snapshot.owners.get(shard) == Some(owner)
                && snapshot.epochs.get(shard) == before.epochs.get(shard),
            "shard {shard} moved between survivors: {owner}@{:?} → {:?}@{:?}",
            before.epochs.get(shard),
            snapshot.owners.get(shard),
            snapshot.epochs.get(shard)
        );
    }
    ensure!(
        snapshot.runners.iter().any(|r| r.id == victim && !r.alive),
        "the victim stays registered but dead: {:?}",
        snapshot.runners
    );

    let report = sampler.stop().await?;
    eprintln!(
        "sampler: {} samples, {} (shard, epoch) beliefs; ownership {took:?}",
        report.samples,
        report.beliefs.len()
    );
    let mut per_runner: BTreeMap<RunnerId, usize> = BTreeMap::new();
    for owners in report.beliefs.values() {
        for r in owners {
            *per_runner.entry(*r).or_default() += 1;
        }
    }
    ensure!(
        per_runner.get(&victim).is_some_and(|n| *n > 0),
        "the sampler saw the victim's beliefs before the kill: {per_runner:?}"
    );
    ensure!(
        report.samples >= 5,
        "the sampler ran only {} times",
        report.samples
    );
    ensure!(
        report.violations.is_empty(),
        "violations: {:#?}",
        report.violations
    );
    let doubles: Vec<_> = report
        .beliefs
        .iter()
        .filter(|(_, owners)| owners.len() > 1)
        .collect();
    ensure!(
        doubles.is_empty(),
        "(shard, epoch) believed owned by two runners: {doubles:?}"
    );
    // Every shard the victim owned is now believed owned by a survivor, under a later epoch.
    for ((shard, epoch), owners) in &report.beliefs {
        if owners.contains(&victim) {
            let later = report.beliefs.iter().any(|((s, e), o)| {
                s == shard && e > epoch && o.iter().all(|r| survivors.contains(r))
            });
            ensure!(
                later,
                "shard {shard} was not taken over after epoch {epoch}"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioned_runner_fences_before_losing_its_locks() -> anyhow::Result<()> {
    let cluster = TestCluster::new(SMALL).await?;
    let proxy = Proxy::start(server_addr(&cluster.db.url)?).await?;
    // This test is about fencing before the server frees the locks; the survivors' hang
    // detection (which would end the partitioned session at 3 s) is pushed out of its way.
    let patient = || RunnerOptions {
        env: vec![("SHOAL__RUNNER__HANG_TIMEOUT".to_owned(), "60s".to_owned())],
        ..RunnerOptions::default()
    };
    let partitioned = cluster
        .start_runner_with(RunnerOptions {
            database_url: Some(with_host_port(&cluster.db.url, proxy.addr)?),
            ..patient()
        })
        .await?;
    let others = [
        cluster.start_runner_with(patient()).await?,
        cluster.start_runner_with(patient()).await?,
    ];
    cluster
        .await_balanced(&[&partitioned, &others[0], &others[1]])
        .await?;

    let victim = partitioned.id().await?;
    let other_ids = [others[0].id().await?, others[1].id().await?];
    let before = partitioned.status().await?;
    let (pid, held) = cluster
        .lock_session(victim)
        .await?
        .context("the victim's lock session")?;
    ensure!(
        held == before.owned.len() as i64 && held > 0,
        "pg_locks shows {held} shard locks, the victim believes {}",
        before.owned.len()
    );

    proxy.freeze();
    let frozen_at = Instant::now();
    let fenced_after = wait_until(DEADLINE, "the partitioned runner fences", || async {
        let view = partitioned.status().await?;
        Ok(view.owned.is_empty() && view.fenced_count >= 1)
    })
    .await?;
    // Right now the server still believes the session alive: its locks are all held, so
    // nobody else could have taken those shards before the victim stopped.
    let still = cluster.lock_session(victim).await?;
    eprintln!(
        "freeze → fence: {:?} (lock-deadline 2s); victim's session still holds {still:?}",
        frozen_at.elapsed()
    );
    ensure!(
        still == Some((pid, held)),
        "at fencing time the victim's session (pid {pid}) should still hold its {held} \
         locks, pg_locks shows {still:?}"
    );
    for other in &others {
        let view = other.status().await?;
        let overlap: Vec<_> = view
            .owned
            .keys()
            .filter(|s| before.owned.contains_key(s))
            .collect();
        ensure!(
            overlap.is_empty(),
            "{} owns the victim's {overlap:?}",
            other.name
        );
    }

    // The server notices the dead peer (here: its sockets close) and frees the locks.
    proxy.sever();
    let severed_at = Instant::now();
    wait_until(DEADLINE, "the two others own every shard", || async {
        let snapshot = cluster.snapshot().await?;
        let victim_holds = snapshot.owners.values().any(|r| *r == victim);
        Ok(!victim_holds && cluster.all_owned_by(&other_ids).await?)
    })
    .await?;
    eprintln!(
        "sever → the others own every shard: {:?} (freeze → fence {fenced_after:?})",
        severed_at.elapsed()
    );

    // The victim's old incarnation never owns anything again: it is dead to the others,
    // no shard row names it, and the victim (unable to reach the database) owns nothing.
    let observe_until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < observe_until {
        let snapshot = cluster.snapshot().await?;
        ensure!(
            snapshot.owners.values().all(|r| *r != victim),
            "the fenced runner's old id owns a shard again"
        );
        ensure!(partitioned.status().await?.owned.is_empty(), "victim owns");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM shoal_shards WHERE cluster = $1 AND runner_id = $2",
    )
    .bind(&cluster.name)
    .bind(victim.get())
    .fetch_one(&cluster.pool)
    .await?;
    ensure!(rows == 0, "{rows} shard rows still name the fenced runner");
    for other in &others {
        let view = other.status().await?;
        ensure!(
            view.live_runners.iter().all(|r| r.id != victim),
            "{} still sees the fenced runner alive",
            other.name
        );
    }
    let view = partitioned.status().await?;
    ensure!(
        view.phase == "fenced",
        "the victim keeps trying to rejoin: {}",
        view.phase
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_and_unregisters() -> anyhow::Result<()> {
    let cluster = TestCluster::new(SMALL).await?;
    let mut runners = [
        cluster.start_runner().await?,
        cluster.start_runner().await?,
        cluster.start_runner().await?,
    ];
    cluster
        .await_balanced(&runners.iter().collect::<Vec<_>>())
        .await?;
    let leaving = runners[0].id().await?;
    let survivors = [runners[1].id().await?, runners[2].id().await?];

    let stopped_at = Instant::now();
    runners[0].terminate()?;
    let status = runners[0].wait_exit(DEADLINE).await?;
    eprintln!("SIGTERM → exit: {:?}", stopped_at.elapsed());
    ensure!(status.success(), "graceful shutdown exited with {status}");
    let registered: i64 = sqlx::query_scalar("SELECT count(*) FROM shoal_runners WHERE id = $1")
        .bind(leaving.get())
        .fetch_one(&cluster.pool)
        .await?;
    ensure!(registered == 0, "the registration row is gone");
    ensure!(
        cluster.lock_session(leaving).await?.is_none(),
        "no liveness lock left"
    );
    wait_until(DEADLINE, "the survivors own every shard", || {
        cluster.all_owned_by(&survivors)
    })
    .await?;
    eprintln!(
        "SIGTERM → survivors own every shard: {:?}",
        stopped_at.elapsed()
    );
    let log = runners[0].log();
    ensure!(
        log.contains("released every shard and unregistered"),
        "the runner logs its clean exit:\n{log}"
    );
    Ok(())
}

/// Checks a start-up failure: non-zero exit, one `error:` line naming `expected`, no panic.
fn check_start_up_error(
    status: std::process::ExitStatus,
    stderr: &str,
    expected: &[&str],
) -> anyhow::Result<()> {
    ensure!(!status.success(), "exited with {status}; stderr:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    ensure!(
        lines.len() == 1,
        "expected one line on stderr, got:\n{stderr}"
    );
    ensure!(lines[0].starts_with("error:"), "stderr: {stderr}");
    ensure!(!stderr.contains("panicked"), "stderr: {stderr}");
    let lower = lines[0].to_lowercase();
    ensure!(
        expected.iter().any(|e| lower.contains(&e.to_lowercase())),
        "stderr should mention one of {expected:?}: {stderr}"
    );
    Ok(())
}

#[tokio::test]
async fn bad_config_value_is_one_clear_line() -> anyhow::Result<()> {
    let dir = std::env::temp_dir();
    let (status, stderr) = run_shoal_in(
        &dir,
        &[
            "runner",
            "--database-url",
            "postgres://postgres@127.0.0.1:5432/postgres",
            "--listen",
            "127.0.0.1:0",
        ],
        &[("SHOAL__RUNNER__LOCK_DEADLINE", "banana")],
    )
    .await?;
    eprintln!("bad value: {}", stderr.trim());
    check_start_up_error(status, &stderr, &["runner.lock-deadline"])
}

#[tokio::test]
async fn unreachable_database_is_one_clear_line() -> anyhow::Result<()> {
    let dir = std::env::temp_dir();
    let (status, stderr) = run_shoal_in(
        &dir,
        &[
            "runner",
            "--database-url",
            "postgres://postgres@127.0.0.1:1/nope",
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    )
    .await?;
    eprintln!("unreachable: {}", stderr.trim());
    check_start_up_error(status, &stderr, &["refused", "127.0.0.1:1"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_with_other_shard_count_refuses_to_start() -> anyhow::Result<()> {
    let cluster = TestCluster::new(64).await?;
    let first = cluster.start_runner().await?;
    let mut second = cluster.spawn_runner(&RunnerOptions {
        shards: Some(128),
        ..RunnerOptions::default()
    })?;
    let status = second.wait_exit(DEADLINE).await?;
    let log = second.log();
    eprintln!("shard count mismatch: {}", log.trim());
    check_start_up_error(status, &log, &["shards-per-group"])?;
    ensure!(
        log.contains("64") && log.contains("128"),
        "both counts named: {log}"
    );
    // The first runner is unaffected.
    wait_until(DEADLINE, "the first runner owns every shard", || async {
        Ok(first.status().await?.owned.len() == 64)
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_share_one_database() -> anyhow::Result<()> {
    let cluster = TestCluster::new(SMALL).await?;
    let alpha = cluster
        .start_runner_with(RunnerOptions {
            cluster: Some("alpha".to_owned()),
            ..RunnerOptions::default()
        })
        .await?;
    let beta = cluster
        .start_runner_with(RunnerOptions {
            cluster: Some("beta".to_owned()),
            ..RunnerOptions::default()
        })
        .await?;
    wait_until(DEADLINE, "both clusters own all their shards", || async {
        let (a, b) = (alpha.status().await?, beta.status().await?);
        Ok(a.owned.len() == SMALL as usize && b.owned.len() == SMALL as usize)
    })
    .await?;
    // At the same time, as the database sees it, and neither sees the other's runner.
    let (a, b) = (alpha.status().await?, beta.status().await?);
    ensure!(a.owned.len() == SMALL as usize && b.owned.len() == SMALL as usize);
    ensure!(
        a.live_runners.len() == 1 && b.live_runners.len() == 1,
        "{a:?} {b:?}"
    );
    for (name, view) in [("alpha", &a), ("beta", &b)] {
        let status = cluster.cluster_status_of(name).await?;
        let id = view.runner_id.context("registered")?;
        ensure!(status.unowned == 0, "{status:?}");
        ensure!(status.runners.len() == 1, "{status:?}");
        ensure!(
            status.runners[0].id == id && status.runners[0].shards == SMALL as usize,
            "{status:?}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The safety sampler
// ---------------------------------------------------------------------------------------

/// What the sampler saw.
#[derive(Debug, Default)]
struct SamplerReport {
    samples: usize,
    /// (shard, epoch) → every runner that ever reported owning the shard under that epoch.
    beliefs: BTreeMap<(ShardId, Epoch), BTreeSet<RunnerId>>,
    /// Broken invariants, as they were seen.
    violations: Vec<String>,
}

/// Polls every ~20 ms: shard locks in `pg_locks`, epochs in `shoal_shards`, and the
/// `/status` of every runner it was told to watch.
struct Sampler {
    stop: CancellationToken,
    urls_tx: watch::Sender<Vec<String>>,
    samples_rx: watch::Receiver<usize>,
    join: JoinHandle<anyhow::Result<SamplerReport>>,
}

impl Sampler {
    fn start(cluster: &TestCluster) -> anyhow::Result<Self> {
        let pool = cluster.pool.clone();
        let name = cluster.name.clone();
        let shard_ns = i64::from(cluster.namespaces()?.shards);
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_millis(500))
            .build()?;
        let stop = CancellationToken::new();
        let token = stop.clone();
        let (urls_tx, urls_rx) = watch::channel(Vec::<String>::new());
        let (samples_tx, samples_rx) = watch::channel(0);
        let join = tokio::spawn(async move {
            let mut report = SamplerReport::default();
            let mut epochs: BTreeMap<i32, i64> = BTreeMap::new();
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                // One last sample after `stop`, so the final state is always seen.
                let stopping = token.is_cancelled();
                let urls = urls_rx.borrow().clone();
                // The three reads run concurrently so a sample is one short moment.
                let (doubles, decreases, views) = tokio::join!(
                    sample_locks(&pool, shard_ns),
                    sample_epochs(&pool, &name, &mut epochs),
                    sample_views(&http, &urls),
                );
                report.violations.extend(doubles?);
                report.violations.extend(decreases?);
                for view in views {
                    let Some(id) = view.runner_id else { continue };
                    for (shard, epoch) in view.owned {
                        report.beliefs.entry((shard, epoch)).or_default().insert(id);
                    }
                }
                report.samples += 1;
                samples_tx.send_replace(report.samples);
                if stopping {
                    return Ok(report);
                }
                tick.tick().await;
            }
        });
        Ok(Self {
            stop,
            urls_tx,
            samples_rx,
            join,
        })
    }

    /// Adds `runner`'s `/status` to every following sample.
    fn watch(&self, runner: &Runner) {
        let url = format!("http://{}/status", runner.addr);
        self.urls_tx.send_modify(|urls| urls.push(url));
    }

    /// Waits until `n` more whole samples were taken (so the current state is seen).
    async fn await_more_samples(&self, n: usize) -> anyhow::Result<()> {
        let mut rx = self.samples_rx.clone();
        let target = *rx.borrow_and_update() + n;
        tokio::time::timeout(DEADLINE, rx.wait_for(|taken| *taken >= target))
            .await
            .context("the sampler is not sampling")?
            .context("the sampler stopped")?;
        Ok(())
    }

    async fn stop(self) -> anyhow::Result<SamplerReport> {
        self.stop.cancel();
        self.join.await?
    }
}

/// Shards whose lock two sessions hold at once (advisory locks are exclusive, so this
/// must never happen).
async fn sample_locks(pool: &sqlx::PgPool, shard_ns: i64) -> anyhow::Result<Vec<String>> {
    let doubles: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT objid::int8, count(DISTINCT pid) FROM pg_locks
          WHERE locktype = 'advisory' AND objsubid = 2 AND granted AND classid::int8 = $1
            AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
          GROUP BY objid HAVING count(DISTINCT pid) > 1",
    )
    .bind(shard_ns)
    .fetch_all(pool)
    .await?;
    Ok(doubles
        .into_iter()
        .map(|(shard, pids)| format!("shard {shard} locked by {pids} sessions"))
        .collect())
}

/// Shards whose epoch went down since the last sample.
async fn sample_epochs(
    pool: &sqlx::PgPool,
    cluster: &str,
    last: &mut BTreeMap<i32, i64>,
) -> anyhow::Result<Vec<String>> {
    let rows: Vec<(i32, i64)> =
        sqlx::query_as("SELECT shard, epoch FROM shoal_shards WHERE cluster = $1")
            .bind(cluster)
            .fetch_all(pool)
            .await?;
    let mut decreases = Vec::new();
    for (shard, epoch) in rows {
        let previous = last.insert(shard, epoch).unwrap_or(0);
        if epoch < previous {
            decreases.push(format!(
                "shard {shard}: epoch went from {previous} to {epoch}"
            ));
        }
    }
    Ok(decreases)
}

/// Every runner's `/status` that answers (a killed runner does not; that is expected).
async fn sample_views(http: &reqwest::Client, urls: &[String]) -> Vec<common::RunnerView> {
    let mut fetches = JoinSet::new();
    for url in urls {
        let (http, url) = (http.clone(), url.clone());
        fetches.spawn(async move {
            let response = http
                .get(&url)
                .header("x-shoal-secret", shoal_testkit::process::CLUSTER_SECRET)
                .send()
                .await?
                .error_for_status()?;
            response.json::<common::RunnerView>().await
        });
    }
    let mut views = Vec::new();
    while let Some(fetched) = fetches.join_next().await {
        if let Ok(Ok(view)) = fetched {
            views.push(view);
        }
    }
    views
}
