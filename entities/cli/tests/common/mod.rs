//! Multi-process test harness: a fresh database per test, real `shoal runner` processes that
//! can be killed (SIGKILL), stopped (SIGTERM) and inspected (`GET /status`), `shoal status`,
//! a TCP proxy that can partition one runner from Postgres, and `wait_until`.
//!
//! Every test gets its own database (`shoal_t_<uuid>`, dropped at the end even on failure),
//! so tests run in parallel and rerun cleanly. The server comes from
//! `SHOAL_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`). Runner
//! logs go to files in a temporary directory, printed (tail) when a test fails.
//!
//! What is not about a Shoal cluster (the database, waiting, child processes, free ports,
//! Redis prefixes) comes from `shoal-testkit` and is re-exported here, so tests keep
//! writing `common::TestDb`, `common::wait_until` and `common::DEADLINE`.

// Each test binary uses a different part of the harness.
#![allow(dead_code)]

pub mod gateway;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use shoal::ids::{ClusterName, Epoch, RunnerId, ShardId};
use shoal::runner_storage::postgres::{LockNamespaces, LockSessionSettings, PgRunnerStorage};
use shoal::runner_storage::{ClusterSnapshot, RunnerStorage};
use shoal::sharding::{Sharding, assign};
use shoal_testkit::ChildProcess;
use shoal_testkit::process::output_within;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

pub use shoal_testkit::{DEADLINE, TestDb, free_port, wait_until};

/// The `shoal` binary under test.
pub const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

/// `url` with its host and port replaced by `addr` (to route it through a proxy).
pub fn with_host_port(url: &str, addr: SocketAddr) -> anyhow::Result<String> {
    let (base, query) = split_query(url);
    let authority_start = base.find("://").context("database URL without scheme")? + 3;
    let authority_end = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let authority = &base[authority_start..authority_end];
    let host_start = authority.rfind('@').map_or(0, |at| at + 1);
    Ok(format!(
        "{}{}{addr}{}{query}",
        &base[..authority_start],
        &authority[..host_start],
        &base[authority_end..]
    ))
}

fn split_query(url: &str) -> (&str, String) {
    match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    }
}

/// The TCP address of the server `url` points at.
pub fn server_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let options = PgConnectOptions::from_str(url)?;
    let host = match options.get_host() {
        "localhost" => "127.0.0.1",
        host => host,
    };
    format!("{host}:{}", options.get_port())
        .parse()
        .with_context(|| format!("{url} is not a TCP address (the proxy needs one)"))
}

// ---------------------------------------------------------------------------------------
// The cluster under test
// ---------------------------------------------------------------------------------------

/// What a runner is started with, over the cluster's defaults.
#[derive(Debug, Clone, Default)]
pub struct RunnerOptions {
    /// Another database URL (e.g. through a [`Proxy`]).
    pub database_url: Option<String>,
    /// Another cluster name.
    pub cluster: Option<String>,
    /// Another `cluster.shards-per-group`.
    pub shards: Option<u32>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Listen here instead of on a fresh port (a runner restarting at its old address).
    pub listen: Option<SocketAddr>,
}

/// A fresh migrated database, a cluster name, a log directory and a small pool for checks.
#[derive(Debug)]
pub struct TestCluster {
    /// The cluster's name (every runner's default).
    pub name: String,
    /// Shards per group.
    pub shards: u32,
    /// Pool for the test's own queries.
    pub pool: PgPool,
    /// Where runner logs go.
    pub dir: PathBuf,
    runners_started: std::sync::atomic::AtomicUsize,
    http: reqwest::Client,
    // Last: the database is dropped after everything that uses it.
    pub db: TestDb,
}

impl TestCluster {
    /// A fresh database migrated with `shoal migrate`, for a cluster of `shards` shards.
    pub async fn new(shards: u32) -> anyhow::Result<Self> {
        let db = TestDb::create().await?;
        let dir = std::env::temp_dir().join(&db.name);
        std::fs::create_dir_all(&dir)?;
        let mut migrate = shoal_command(&dir);
        migrate.args(["migrate", "--database-url", &db.url]);
        let output = output_within(&mut migrate, DEADLINE).await?;
        if !output.status.success() {
            bail!(
                "shoal migrate failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&db.url)
            .await?;
        Ok(Self {
            name: "test".to_owned(),
            shards,
            pool,
            dir,
            runners_started: Default::default(),
            http: http_client()?,
            db,
        })
    }

    /// A fresh cluster of `shards` shards with `runners` runners, balanced.
    pub async fn balanced(shards: u32, runners: usize) -> anyhow::Result<(Self, Vec<Runner>)> {
        let cluster = Self::new(shards).await?;
        let mut started = Vec::new();
        for _ in 0..runners {
            started.push(cluster.start_runner().await?);
        }
        cluster
            .await_balanced(&started.iter().collect::<Vec<_>>())
            .await?;
        Ok((cluster, started))
    }

    /// Starts a runner with the defaults and waits until it has registered.
    pub async fn start_runner(&self) -> anyhow::Result<Runner> {
        self.start_runner_with(RunnerOptions::default()).await
    }

    /// Starts a runner and waits until it has registered (retrying if its port was taken).
    pub async fn start_runner_with(&self, options: RunnerOptions) -> anyhow::Result<Runner> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut runner = self.spawn_runner(&options)?;
            // A port from `free_port` can be taken by another test's process before this
            // runner binds it; that process then answers the readiness checks. Only this
            // runner's own log says whether it bound.
            let registered = match runner.await_registered().await {
                Ok(()) => runner.await_bound().await,
                Err(error) => Err(error),
            };
            match registered {
                Ok(()) => return Ok(runner),
                Err(error) if attempt < 3 && runner.log().contains("cannot listen") => {
                    eprintln!("runner could not bind (retrying): {error:#}");
                }
                Err(error) => {
                    return Err(error.context(format!("runner log:\n{}", runner.log_tail(30))));
                }
            }
        }
    }

    /// Spawns a runner without waiting for anything.
    pub fn spawn_runner(&self, options: &RunnerOptions) -> anyhow::Result<Runner> {
        let n = self.runners_started.fetch_add(1, Ordering::Relaxed);
        let addr = match options.listen {
            Some(addr) => addr,
            None => SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        };
        let name = format!("runner-{n}");
        let url = options.database_url.as_deref().unwrap_or(&self.db.url);
        let cluster = options.cluster.as_deref().unwrap_or(&self.name);
        let shards = options.shards.unwrap_or(self.shards).to_string();
        let mut command = shoal_command(&self.dir);
        command
            .args(["runner", "--database-url", url])
            .args(["--listen", &addr.to_string(), "--cluster", cluster])
            .env("SHOAL__CLUSTER__SHARDS_PER_GROUP", shards)
            .env("SHOAL__LOG__FILTER", "info")
            .env("SHOAL__DATABASE__POOL_MAX_CONNECTIONS", "3")
            .envs(options.env.iter().map(|(k, v)| (k, v)));
        let log = self.dir.join(format!("{name}.log"));
        let process = ChildProcess::spawn(format!("{name} ({addr})"), &mut command, log)?;
        let secret = options
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "SHOAL__CLUSTER__SECRET")
            .map_or(
                shoal_testkit::process::CLUSTER_SECRET.to_owned(),
                |(_, v)| v.clone(),
            );
        Ok(Runner {
            name,
            process,
            addr,
            http: self.http.clone(),
            secret,
        })
    }

    /// `shoal status --json` for this cluster.
    pub async fn cluster_status(&self) -> anyhow::Result<StatusJson> {
        self.cluster_status_of(&self.name).await
    }

    /// `shoal status --json` for `cluster`.
    pub async fn cluster_status_of(&self, cluster: &str) -> anyhow::Result<StatusJson> {
        let mut status = shoal_command(&self.dir);
        status
            .args(["status", "--json", "--database-url", &self.db.url])
            .args(["--cluster", cluster])
            .env("SHOAL__CLUSTER__SHARDS_PER_GROUP", self.shards.to_string());
        let output = output_within(&mut status, DEADLINE).await?;
        if !output.status.success() {
            bail!(
                "shoal status failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        serde_json::from_slice(&output.stdout).with_context(|| {
            format!(
                "parsing shoal status output: {}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }

    /// Runner storage over the test database, for `cluster` (snapshots, namespaces).
    pub fn storage_of(&self, cluster: &str) -> anyhow::Result<PgRunnerStorage> {
        Ok(PgRunnerStorage::new(
            self.pool.clone(),
            &self.db.url,
            ClusterName::new(cluster)?,
            LockSessionSettings::default(),
        )?)
    }

    /// Who holds what, as the database sees it now.
    pub async fn snapshot(&self) -> anyhow::Result<ClusterSnapshot> {
        Ok(self.storage_of(&self.name)?.snapshot().await?)
    }

    /// The cluster's advisory-lock namespaces.
    pub fn namespaces(&self) -> anyhow::Result<LockNamespaces> {
        Ok(LockNamespaces::for_cluster(&ClusterName::new(&self.name)?))
    }

    /// Whether every shard is owned, by runners in `owners` only.
    pub async fn all_owned_by(&self, owners: &[RunnerId]) -> anyhow::Result<bool> {
        let snapshot = self.snapshot().await?;
        Ok(snapshot.owners.len() == self.shards as usize
            && snapshot.owners.values().all(|r| owners.contains(r)))
    }

    /// Waits until `runners` are all registered and alive, every shard is owned, each runner
    /// holds exactly the shards the assignment of the live runners gives it, and each
    /// runner's own view agrees with the database (nothing draining): the cluster is
    /// balanced and still.
    pub async fn await_balanced(&self, runners: &[&Runner]) -> anyhow::Result<Duration> {
        let sharding = Sharding::new(NonZeroU32::new(self.shards).context("no shards")?);
        let balanced = wait_until(DEADLINE, "the cluster is balanced", || async move {
            let snapshot = self.snapshot().await?;
            if snapshot.owners.len() != self.shards as usize {
                return Ok(false);
            }
            for runner in runners {
                let view = runner.status().await?;
                let Some(id) = view.runner_id else {
                    return Ok(false);
                };
                let in_db: BTreeSet<ShardId> = snapshot
                    .owners
                    .iter()
                    .filter(|(_, r)| **r == id)
                    .map(|(s, _)| *s)
                    .collect();
                let believed: BTreeSet<ShardId> = view.owned.keys().copied().collect();
                let live: Vec<RunnerId> = view.live_runners.iter().map(|r| r.id).collect();
                if view.live_runners.len() != runners.len()
                    || !view.draining.is_empty()
                    || !in_db
                        .iter()
                        .copied()
                        .eq(assign(sharding, &live).shards_of(id))
                    || in_db != believed
                {
                    return Ok(false);
                }
            }
            Ok(true)
        })
        .await;
        match balanced {
            Ok(took) => Ok(took),
            Err(error) => Err(error.context(self.describe(runners).await)),
        }
    }

    /// What the database and each runner say, with log tails: for failure messages.
    pub async fn describe(&self, runners: &[&Runner]) -> String {
        let mut out = String::new();
        match self.snapshot().await {
            Ok(snapshot) => {
                let mut counts: BTreeMap<RunnerId, usize> = BTreeMap::new();
                for owner in snapshot.owners.values() {
                    *counts.entry(*owner).or_default() += 1;
                }
                out.push_str(&format!(
                    "database: {} of {} shards owned, by {counts:?}; runners {:?}\n",
                    snapshot.owners.len(),
                    self.shards,
                    snapshot
                        .runners
                        .iter()
                        .map(|r| (r.id, r.alive, r.shards))
                        .collect::<Vec<_>>()
                ));
            }
            Err(error) => out.push_str(&format!("database: {error:#}\n")),
        }
        for runner in runners {
            match runner.status().await {
                Ok(view) => out.push_str(&format!(
                    "{} ({}): id {:?}, {}, owns {}, draining {}, sees {:?}, fenced {}\n",
                    runner.name,
                    runner.addr,
                    view.runner_id,
                    view.phase,
                    view.owned.len(),
                    view.draining.len(),
                    view.live_runners.iter().map(|r| r.id).collect::<Vec<_>>(),
                    view.fenced_count
                )),
                Err(error) => out.push_str(&format!("{}: {error:#}\n", runner.name)),
            }
            out.push_str(&format!(
                "--- {} log tail ---\n{}\n",
                runner.name,
                runner.log_tail(15)
            ));
        }
        out
    }

    /// The backend pid of runner `id`'s lock session and the shard locks it holds, read
    /// from `pg_locks`.
    pub async fn lock_session(&self, id: RunnerId) -> anyhow::Result<Option<(i32, i64)>> {
        let ns = self.namespaces()?;
        let row: Option<(i32, i64)> = sqlx::query_as(
            "SELECT l.pid,
                    (SELECT count(*) FROM pg_locks s
                      WHERE s.pid = l.pid AND s.locktype = 'advisory' AND s.objsubid = 2
                        AND s.granted AND s.classid::int8 = $1)
               FROM pg_locks l
              WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND l.granted
                AND l.classid::int8 = $2 AND l.objid::int8 = $3
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .bind(i64::from(ns.shards))
        .bind(i64::from(ns.runners))
        .bind(i64::from(id.get()))
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    /// Runs `shoal` with `args` and `env` to its end (for start-up failures).
    pub async fn run_shoal(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<(ExitStatus, String)> {
        run_shoal_in(&self.dir, args, env).await
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("runner logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs `shoal` with `args` and `env` to its end, in `dir`, under [`DEADLINE`]; returns its
/// status and stderr.
pub async fn run_shoal_in(
    dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<(ExitStatus, String)> {
    let mut command = shoal_command(dir);
    command.args(args).envs(env.iter().copied());
    let output = output_within(&mut command, DEADLINE).await?;
    Ok((
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// `shoal` with a clean environment: no inherited `SHOAL__*`, `SHOAL_CONFIG` or `RUST_LOG`,
/// and `dir` (a directory without `cluster-config/`) as its working directory.
pub fn shoal_command(dir: &Path) -> Command {
    shoal_testkit::process::shoal_command(SHOAL, dir)
}

fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(2))
        .build()?)
}

// ---------------------------------------------------------------------------------------
// Runner processes
// ---------------------------------------------------------------------------------------

/// `GET /status` of a runner (`shoal::ownership::OwnershipView`).
#[derive(Debug, Clone, Deserialize)]
pub struct RunnerView {
    /// The current incarnation's id, once registered.
    pub runner_id: Option<RunnerId>,
    /// `joining`, `active`, `fenced`, `shutting_down`, `stopped`.
    pub phase: String,
    /// Shards owned, with their epochs.
    pub owned: BTreeMap<ShardId, Epoch>,
    /// Owned shards being drained.
    pub draining: BTreeSet<ShardId>,
    /// Live runners as last read.
    pub live_runners: Vec<LiveRunner>,
    /// How many times the process fenced itself.
    pub fenced_count: u64,
}

/// A live runner in a [`RunnerView`].
#[derive(Debug, Clone, Deserialize)]
pub struct LiveRunner {
    /// Its id.
    pub id: RunnerId,
    /// Its address.
    pub address: String,
}

/// `shoal status --json`.
#[derive(Debug, Clone, Deserialize)]
pub struct StatusJson {
    /// The cluster's name.
    pub cluster: String,
    /// Shards in the cluster.
    pub shards_total: u32,
    /// Shards nobody holds.
    pub unowned: u32,
    /// Registered runners.
    pub runners: Vec<StatusRunner>,
}

/// One runner in [`StatusJson`].
#[derive(Debug, Clone, Deserialize)]
pub struct StatusRunner {
    /// Its id.
    pub id: RunnerId,
    /// Its address.
    pub address: String,
    /// Whether its liveness lock is held.
    pub alive: bool,
    /// Shard locks it holds.
    pub shards: usize,
}

/// A `shoal runner` process (killed when dropped; its log tail is printed if the test
/// fails).
#[derive(Debug)]
pub struct Runner {
    /// For messages.
    pub name: String,
    /// Its HTTP endpoint.
    pub addr: SocketAddr,
    process: ChildProcess,
    http: reqwest::Client,
    /// The cluster secret it was given (its `/status` needs it).
    secret: String,
}

impl Runner {
    /// `GET /status`.
    pub async fn status(&self) -> anyhow::Result<RunnerView> {
        runner_status(&self.http, self.addr, &self.secret).await
    }

    /// The current incarnation's id (fails before registration).
    pub async fn id(&self) -> anyhow::Result<RunnerId> {
        self.status()
            .await?
            .runner_id
            .with_context(|| format!("{} has not registered", self.name))
    }

    async fn await_registered(&mut self) -> anyhow::Result<()> {
        let (http, addr, secret) = (&self.http, self.addr, self.secret.as_str());
        self.process
            .await_ready(DEADLINE, "registered", || async move {
                Ok(runner_status(http, addr, secret).await?.runner_id.is_some())
            })
            .await
    }

    /// SIGKILL.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.process.kill()
    }

    /// SIGTERM: graceful shutdown.
    pub fn terminate(&self) -> anyhow::Result<()> {
        self.process.terminate()
    }

    /// SIGSTOP: the process stays, its sockets stay open, it makes no progress.
    pub fn freeze(&self) -> anyhow::Result<()> {
        self.process.freeze()
    }

    /// SIGCONT after [`Runner::freeze`].
    pub fn thaw(&self) -> anyhow::Result<()> {
        self.process.thaw()
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, deadline: Duration) -> anyhow::Result<ExitStatus> {
        self.process.wait_exit(deadline).await
    }

    /// Everything the runner has logged so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Waits until this runner's own log says it bound its listen address (the readiness
    /// checks alone may be answered by whoever holds the port).
    async fn await_bound(&self) -> anyhow::Result<()> {
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            let log = self.log();
            anyhow::ensure!(!log.contains("cannot listen"), "the runner could not bind");
            if log.contains("runner started") {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < until,
                "the runner did not log that it bound its address within {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }
}

async fn runner_status(
    http: &reqwest::Client,
    addr: SocketAddr,
    secret: &str,
) -> anyhow::Result<RunnerView> {
    let url = format!("http://{addr}/status");
    let response = http
        .get(&url)
        .header("x-shoal-secret", secret)
        .send()
        .await?
        .error_for_status()?;
    Ok(response.json().await?)
}

// ---------------------------------------------------------------------------------------
// A TCP proxy that can partition a runner from Postgres
// ---------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct ProxyState {
    /// No byte crosses in either direction, and new connections are refused.
    frozen: AtomicBool,
    /// Upstream sockets are closed (the server sees the session end).
    severed: CancellationToken,
    /// The proxy is gone: close everything.
    closed: CancellationToken,
}

/// A TCP proxy in front of Postgres. [`Proxy::freeze`] is a network partition: every socket
/// stays open (both kernels keep the connections up, so the server still believes the
/// sessions alive and keeps their locks) but no byte is forwarded any more.
/// [`Proxy::sever`] then closes the upstream sockets, as the server's keepalive detection
/// eventually would.
#[derive(Debug)]
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    state: Arc<ProxyState>,
}

impl Proxy {
    /// Starts forwarding connections to `upstream`.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(ProxyState::default());
        tokio::spawn(accept_loop(listener, upstream, state.clone()));
        Ok(Self { addr, state })
    }

    /// Stops forwarding bytes in both directions and refuses new connections.
    pub fn freeze(&self) {
        self.state.frozen.store(true, Ordering::SeqCst);
    }

    /// Closes every upstream socket (the client sides stay open and silent).
    pub fn sever(&self) {
        self.state.severed.cancel();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.closed.cancel();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, state: Arc<ProxyState>) {
    loop {
        let accepted = tokio::select! {
            _ = state.closed.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((client, _)) = accepted else { continue };
        if state.frozen.load(Ordering::SeqCst) {
            drop(client); // refused
            continue;
        }
        let state = state.clone();
        tokio::spawn(async move {
            if let Ok(server) = TcpStream::connect(upstream).await {
                relay(client, server, state).await;
            }
        });
    }
}

async fn relay(mut client: TcpStream, mut server: TcpStream, state: Arc<ProxyState>) {
    let severed = {
        let (mut client_rx, mut client_tx) = client.split();
        let (mut server_rx, mut server_tx) = server.split();
        tokio::select! {
            _ = pump(&mut client_rx, &mut server_tx, &state) => false,
            _ = pump(&mut server_rx, &mut client_tx, &state) => false,
            _ = state.severed.cancelled() => true,
            _ = state.closed.cancelled() => false,
        }
    };
    drop(server);
    if severed {
        // The partition goes on for the client: its socket stays open and silent.
        state.closed.cancelled().await;
    }
}

async fn pump(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    state: &ProxyState,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let Ok(n) = from.read(&mut buf).await else {
            return;
        };
        if state.frozen.load(Ordering::SeqCst) {
            // Partitioned: these bytes (or this end of stream) never arrive.
            std::future::pending::<()>().await;
        }
        if n == 0 {
            let _ = to.shutdown().await;
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
