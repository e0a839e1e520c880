//! Operating a cluster with the `shoal` binary, as a user would: `shoal dev` starts a working
//! cluster and stops it without orphans on Ctrl-C; `shoal drill failover` loses nothing; a
//! rolling restart (SIGTERM one runner at a time, start a replacement) under load fails no
//! persisted request.
//!
//! Numbers are printed; `--nocapture` shows them.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use common::gateway::{Gateway, GatewayOptions, HttpResponse};
use common::{DEADLINE, Runner, TestCluster, TestDb, wait_until};
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::json;
use shoal_testkit::process::signal_pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Shards of the test clusters.
const SHARDS: u32 = 64;

/// `shoal` with a clean environment in `dir` (a temporary directory without
/// `cluster-config/`), for clusters of [`SHARDS`] shards.
fn shoal_command(dir: &Path) -> tokio::process::Command {
    let mut command = common::shoal_command(dir);
    command.env("SHOAL__CLUSTER__SHARDS_PER_GROUP", SHARDS.to_string());
    command
}

fn reply_count(response: &HttpResponse) -> anyhow::Result<i64> {
    let body = response.json()?;
    body.pointer("/reply/count")
        .and_then(|c| c.as_i64())
        .with_context(|| format!("{}: no reply count in {body}", response.status))
}

// ---------------------------------------------------------------------------------------
// shoal dev
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_starts_a_working_cluster_and_stops_cleanly() -> anyhow::Result<()> {
    let mut cluster = TestCluster::new(SHARDS).await?;
    cluster.name = format!("dev-{}", uuid::Uuid::now_v7().simple());
    let stderr_log = cluster.dir.join("dev.log");
    let mut dev = shoal_command(&cluster.dir)
        .args(["dev", "--runners", "3", "--gateway-port", "0"])
        .args(["--database-url", &cluster.db.url])
        .env("SHOAL__CLUSTER__NAME", &cluster.name)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(&stderr_log)?))
        .spawn()
        .context("starting shoal dev")?;
    // A failing check below must not leave the cluster running: `shoal dev` stops its
    // children on SIGINT, which a plain kill of it would orphan.
    let stop_dev = StopOnDrop(dev.id());
    let dev_log = || std::fs::read_to_string(&stderr_log).unwrap_or_default();

    // Read stdout (in a task, so the pipe never fills) until the gateway URL is printed.
    let stdout = dev.stdout.take().context("no stdout")?;
    let (url_tx, url_rx) = tokio::sync::oneshot::channel::<String>();
    let reader = tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        let mut url_tx = Some(url_tx);
        let mut all = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(url) = line.strip_prefix("gateway: ")
                && let Some(tx) = url_tx.take()
            {
                let _ = tx.send(url.trim().to_owned());
            }
            all.push(line);
        }
        all
    });
    let url = match tokio::time::timeout(Duration::from_secs(90), url_rx).await {
        Ok(Ok(url)) => url,
        _ => bail!(
            "shoal dev printed no `gateway: ` line within 90 s; stderr:\n{}",
            dev_log()
        ),
    };
    ensure!(url.starts_with("http://"), "gateway url {url}");
    eprintln!("shoal dev: gateway at {url}");

    let http = common::gateway::Http::new(url.clone())?;
    let reply = http
        .post_json("/entities/counter/a/increment", &json!({}), &[])
        .await?;
    ensure!(
        reply.status == StatusCode::OK,
        "{} {}",
        reply.status,
        reply.text()
    );
    let body = reply.json()?;
    ensure!(
        body.pointer("/reply") == Some(&json!({"count": 1})),
        "{body}"
    );

    // The runners dev started, as the database sees them.
    let live_addresses = || async {
        let status = cluster.cluster_status().await?;
        anyhow::Ok(
            status
                .runners
                .iter()
                .filter(|r| r.alive)
                .map(|r| r.address.clone())
                .collect::<Vec<_>>(),
        )
    };
    wait_until(DEADLINE, "shoal status shows 3 live runners", || async {
        Ok(live_addresses().await?.len() == 3)
    })
    .await?;
    let addresses = live_addresses().await?;
    eprintln!("runners at {addresses:?}");

    // Under load (persisted sends to many entities, jobs, listings, all at once), the
    // cluster's sessions stay within the 20 `shoal dev` budgets for 3 runners.
    // Once the ring of watchers has settled: three watchers waiting on three different
    // runners (a watcher replaced while runners joined ends its session within
    // `client_connection_check_interval`).
    wait_until(
        DEADLINE,
        "one peer watcher per runner, each on another",
        || async {
            let (watchers, watched): (i64, i64) = sqlx::query_as(
                "SELECT count(*), count(DISTINCT l.objid) FROM pg_stat_activity a
               JOIN pg_locks l ON l.pid = a.pid AND l.locktype = 'advisory' AND NOT l.granted
              WHERE a.datname = $1 AND a.application_name LIKE 'shoal-watch:%'",
            )
            .bind(&cluster.db.name)
            .fetch_one(&cluster.pool)
            .await?;
            Ok((watchers, watched) == (3, 3))
        },
    )
    .await?;
    let peak = Arc::new(AtomicUsize::new(0));
    let sampling = CancellationToken::new();
    let sampler = tokio::spawn(sample_sessions(
        cluster.pool.clone(),
        cluster.db.name.clone(),
        peak.clone(),
        sampling.clone(),
    ));
    let sends = (0..600).map(|n| {
        let http = &http;
        async move {
            let path = if n % 3 == 0 {
                "/jobs".to_owned()
            } else {
                format!("/entities/counter/load-{}/increment", n % 150)
            };
            let body = if n % 3 == 0 {
                json!({"type": "diag.noop", "payload": {}})
            } else {
                json!({})
            };
            let response = http.post_json(&path, &body, &[]).await?;
            ensure!(
                response.status.is_success(),
                "{path}: {} {}",
                response.status,
                response.text()
            );
            if n % 50 == 0 {
                let listing = http.get("/jobs?limit=50").await?;
                ensure!(listing.status == StatusCode::OK, "{}", listing.text());
            }
            anyhow::Ok(())
        }
    });
    futures::stream::iter(sends)
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<()>>>()?;
    sampling.cancel();
    sampler.await??;
    let peak = peak.load(Ordering::Relaxed);
    eprintln!("peak sessions of the dev cluster: {peak}");
    ensure!(
        (3..=20).contains(&peak),
        "shoal dev's 3 runners and gateway held {peak} Postgres sessions (budget 20)"
    );

    // Ctrl-C.
    let pid = dev.id().context("shoal dev already exited")?;
    signal_pid(pid, nix::sys::signal::Signal::SIGINT)?;
    let started = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(30), dev.wait())
        .await
        .with_context(|| format!("shoal dev did not exit within 30 s; stderr:\n{}", dev_log()))??;
    eprintln!(
        "shoal dev exited with {status} {:?} after SIGINT",
        started.elapsed()
    );
    std::mem::forget(stop_dev);
    ensure!(
        status.success(),
        "shoal dev exited with {status}:\n{}",
        dev_log()
    );
    let stdout = reader.await?;
    eprintln!("shoal dev stdout:\n{}", stdout.join("\n"));
    ensure!(
        stdout
            .iter()
            .any(|l| l.starts_with("postgres connections: 3 runners × 5") && l.ends_with("= 20")),
        "shoal dev printed no connection budget of 20: {stdout:?}"
    );

    // No orphans: nothing listens where the runners and the gateway did, and nobody is alive.
    let gateway_addr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    for addr in addresses.iter().chain([&gateway_addr]) {
        let addr = addr
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_owned();
        wait_until(DEADLINE, &format!("{addr} refuses connections"), || {
            let addr = addr.clone();
            async move { Ok(tokio::net::TcpStream::connect(&addr).await.is_err()) }
        })
        .await?;
    }
    let status = cluster.cluster_status().await?;
    let live = status.runners.iter().filter(|r| r.alive).count();
    ensure!(live == 0, "live runners after dev stopped: {status:?}");
    ensure!(
        dev_log()
            .lines()
            .all(|l| !l.contains("killed after the shutdown deadline")),
        "a child had to be killed:\n{}",
        dev_log()
    );
    Ok(())
}

/// Sends SIGINT to a `shoal dev` process when dropped (a test that fails early) and waits
/// up to 30 s for it to exit, so it stops its children before its handle's drop kills it.
struct StopOnDrop(Option<u32>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let Some(pid) = self.0 else { return };
        if signal_pid(pid, nix::sys::signal::Signal::SIGINT).is_err() {
            return;
        }
        let exited = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
                stat.rsplit(") ").next().is_some_and(|s| s.starts_with('Z'))
            })
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !exited() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Records in `peak` the most sessions a cluster's processes (runner pools, lock sessions,
/// watchers, gateway) held on `database` at once, sampling until `stop`.
async fn sample_sessions(
    pool: sqlx::PgPool,
    database: String,
    peak: Arc<AtomicUsize>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let sessions: Vec<String> = sqlx::query_scalar(
            "SELECT application_name FROM pg_stat_activity
              WHERE datname = $1
                AND (application_name LIKE 'shoal-runner:%' OR application_name LIKE 'shoal-locks:%'
                     OR application_name LIKE 'shoal-watch:%' OR application_name = 'shoal-gateway')",
        )
        .bind(&database)
        .fetch_all(&pool)
        .await?;
        if sessions.len() > peak.fetch_max(sessions.len(), Ordering::Relaxed) {
            eprintln!("{} sessions: {sessions:?}", sessions.len());
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}

// ---------------------------------------------------------------------------------------
// shoal drill failover
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_failover_loses_nothing() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let dir = std::env::temp_dir().join(format!("{}-drill", db.name));
    std::fs::create_dir_all(&dir)?;
    let started = Instant::now();
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        shoal_command(&dir)
            .args(["drill", "failover", "--database-url", &db.url])
            .args([
                "--runners",
                "3",
                "--rate",
                "100",
                "--entities",
                "20",
                "--json",
            ])
            .output(),
    )
    .await
    .context("shoal drill failover did not finish within 120 s")??;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let _ = std::fs::remove_dir_all(&dir);
    ensure!(
        output.status.success(),
        "shoal drill failover exited with {}:\n{stderr}",
        output.status
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("stdout is not one JSON object: {stdout}\nstderr:\n{stderr}"))?;
    eprintln!("drill took {:?}: {report}", started.elapsed());

    let field = |name: &str| -> anyhow::Result<u64> {
        report
            .get(name)
            .and_then(|v| v.as_u64())
            .with_context(|| format!("no unsigned `{name}` in {report}"))
    };
    let (sent, acknowledged, processed) =
        (field("sent")?, field("acknowledged")?, field("processed")?);
    ensure!(field("lost")? == 0, "lost: {report}");
    ensure!(field("duplicated")? == 0, "duplicated: {report}");
    ensure!(acknowledged > 0 && acknowledged <= sent, "{report}");
    ensure!(processed >= acknowledged, "{report}");
    ensure!(
        report
            .get("ownership_ms")
            .and_then(|v| v.as_f64())
            .is_some(),
        "no ownership_ms: {report}"
    );
    ensure!(
        report
            .get("first_processed_ms")
            .and_then(|v| v.as_f64())
            .is_some(),
        "no first_processed_ms: {report}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Rolling restart
// ---------------------------------------------------------------------------------------

const WORKERS: usize = 8;
const ENTITIES_PER_WORKER: usize = 3;

/// What a load worker saw.
#[derive(Debug, Default)]
struct WorkerOutcome {
    /// Distinct keys answered 200, per entity.
    acknowledged: BTreeMap<String, i64>,
    /// Requests that ended in something other than 200.
    failures: Vec<String>,
    /// Sends again with the same key.
    resent: usize,
}

/// One keyed persisted increment, sent again (same key) on 429/503/504 or a connection
/// error until it is answered 200 or something else final.
async fn increment(
    http: &common::gateway::Http,
    entity: &str,
    key: &str,
) -> (Result<(), String>, usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut resent = 0;
    loop {
        let sent = http
            .send(
                http.client
                    .post(http.url(&format!("/entities/counter/{entity}/increment")))
                    .header("idempotency-key", key)
                    .header("x-request-timeout", "20s")
                    .timeout(Duration::from_secs(30))
                    .json(&json!({})),
            )
            .await;
        let retry = match &sent {
            Ok(response) if response.status == StatusCode::OK => return (Ok(()), resent),
            Ok(response) => {
                let s = response.status;
                if s == StatusCode::TOO_MANY_REQUESTS
                    || s == StatusCode::SERVICE_UNAVAILABLE
                    || s == StatusCode::GATEWAY_TIMEOUT
                {
                    format!("{s} {}", response.text())
                } else {
                    return (
                        Err(format!("{entity} `{key}`: {s} {}", response.text())),
                        resent,
                    );
                }
            }
            Err(error) => format!("{error:#}"),
        };
        if Instant::now() > deadline {
            return (
                Err(format!("{entity} `{key}`: still {retry} after 60 s")),
                resent,
            );
        }
        resent += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_restart_fails_no_persisted_request() -> anyhow::Result<()> {
    let cluster = TestCluster::new(SHARDS).await?;
    let mut runners: Vec<Runner> = Vec::new();
    for _ in 0..3 {
        runners.push(cluster.start_runner().await?);
    }
    cluster
        .await_balanced(&runners.iter().collect::<Vec<_>>())
        .await?;
    let gateway = Gateway::start(&cluster, GatewayOptions::default()).await?;

    let stop = CancellationToken::new();
    let answered = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for w in 0..WORKERS {
        let (http, stop, answered) = (gateway.http.clone(), stop.clone(), answered.clone());
        workers.spawn(async move {
            let mut outcome = WorkerOutcome::default();
            let mut n = 0;
            while !stop.is_cancelled() {
                let entity = format!("roll-{w}-{}", n % ENTITIES_PER_WORKER);
                let key = format!("roll-{w}-{n}");
                let (result, resent) = increment(&http, &entity, &key).await;
                outcome.resent += resent;
                match result {
                    Ok(()) => {
                        *outcome.acknowledged.entry(entity).or_default() += 1;
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(failure) => outcome.failures.push(failure),
                }
                n += 1;
            }
            outcome
        });
    }
    let mut reads = JoinSet::new();
    for r in 0..2 {
        let (http, stop) = (gateway.http.clone(), stop.clone());
        reads.spawn(async move {
            let mut seen: BTreeMap<String, usize> = BTreeMap::new();
            let mut bad: Vec<String> = Vec::new();
            let mut n = 0;
            while !stop.is_cancelled() {
                let entity = format!("roll-{}-{}", (n + r) % WORKERS, n % ENTITIES_PER_WORKER);
                n += 1;
                let response = http
                    .send(
                        http.client
                            .post(http.url(&format!("/entities/counter/{entity}/get")))
                            .header("x-request-timeout", "5s")
                            .timeout(Duration::from_secs(10))
                            .json(&json!({})),
                    )
                    .await;
                let key = match response {
                    Ok(response) if response.status == StatusCode::OK => "200".to_owned(),
                    Ok(response) => match response.error() {
                        Ok((code, retryable)) => {
                            let ok = (response.status == StatusCode::SERVICE_UNAVAILABLE
                                && retryable)
                                || response.status == StatusCode::TOO_MANY_REQUESTS;
                            if !ok {
                                bad.push(format!(
                                    "get {entity}: {} {}",
                                    response.status,
                                    response.text()
                                ));
                            }
                            format!("{} {code} retryable={retryable}", response.status)
                        }
                        Err(error) => {
                            bad.push(format!("get {entity}: {error:#}"));
                            format!("{} (no error body)", response.status)
                        }
                    },
                    Err(error) => {
                        bad.push(format!("get {entity}: {error:#}"));
                        "connection error".to_owned()
                    }
                };
                *seen.entry(key).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (seen, bad)
        });
    }

    wait_until(DEADLINE, "the load is flowing", || async {
        Ok(answered.load(Ordering::Relaxed) >= 50)
    })
    .await?;

    // SIGTERM each original runner in turn, start a replacement, wait until balanced.
    let started = Instant::now();
    for i in 0..3 {
        let before = answered.load(Ordering::Relaxed);
        let step = Instant::now();
        runners[i].terminate()?;
        let status = runners[i].wait_exit(Duration::from_secs(60)).await?;
        ensure!(
            status.success(),
            "{} exited with {status}:\n{}",
            runners[i].name,
            runners[i].log_tail(30)
        );
        let stopped = step.elapsed();
        runners[i] = cluster.start_runner().await?;
        cluster
            .await_balanced(&runners.iter().collect::<Vec<_>>())
            .await?;
        eprintln!(
            "restart {}: stopped in {stopped:?}, balanced again after {:?}; {} answered meanwhile",
            i + 1,
            step.elapsed(),
            answered.load(Ordering::Relaxed) - before
        );
    }
    // A little more load on the final cluster, then stop.
    let after = answered.load(Ordering::Relaxed);
    wait_until(DEADLINE, "the load flows on the new runners", || async {
        Ok(answered.load(Ordering::Relaxed) >= after + 50)
    })
    .await?;
    stop.cancel();
    eprintln!("rolling restart took {:?}", started.elapsed());

    let mut acknowledged: BTreeMap<String, i64> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut resent = 0;
    while let Some(joined) = workers.join_next().await {
        let outcome = joined?;
        acknowledged.extend(outcome.acknowledged);
        failures.extend(outcome.failures);
        resent += outcome.resent;
    }
    let mut read_statuses: BTreeMap<String, usize> = BTreeMap::new();
    let mut bad_reads = Vec::new();
    while let Some(joined) = reads.join_next().await {
        let (seen, bad) = joined?;
        for (k, v) in seen {
            *read_statuses.entry(k).or_default() += v;
        }
        bad_reads.extend(bad);
    }
    let total: i64 = acknowledged.values().sum();
    eprintln!(
        "{total} persisted increments answered 200 ({resent} resent with the same key), \
         {} failed; volatile gets: {read_statuses:?}",
        failures.len()
    );
    ensure!(
        failures.is_empty(),
        "{} persisted requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    ensure!(
        bad_reads.is_empty(),
        "volatile gets failed other than 503 retryable / 429: {:?}",
        &bad_reads[..bad_reads.len().min(10)]
    );
    for (entity, expected) in &acknowledged {
        let get = gateway
            .http
            .post_json(&format!("/entities/counter/{entity}/get"), &json!({}), &[])
            .await?;
        ensure!(
            reply_count(&get)? == *expected,
            "{entity}: {expected} distinct keys acknowledged, but {}",
            get.text()
        );
    }
    Ok(())
}
