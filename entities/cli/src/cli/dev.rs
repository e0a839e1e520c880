//! `shoal dev`: a whole local cluster in one command. Applies migrations, starts N runner
//! processes and a gateway as children on free ports, prints the gateway URL and a status
//! screen, and on Ctrl-C (or SIGTERM) stops every child gracefully, leaving no orphans.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use shoal::config::{ConfigLoader, ShoalConfig};
use shoal::ids::RunnerId;
use shoal::sharding::assign;

use super::DatabaseArgs;
use super::children::{self, ShoalChild, free_port};

/// The Redis a local cluster uses when none is configured.
const LOCAL_REDIS: &str = "redis://127.0.0.1:6379";

#[derive(Debug, Args)]
pub(crate) struct DevArgs {
    #[command(flatten)]
    db: DatabaseArgs,
    /// Runner processes to start.
    #[arg(long, default_value_t = 3, env = "SHOAL_DEV_RUNNERS")]
    runners: usize,
    /// Port of the gateway (0 picks a free one).
    #[arg(long, default_value_t = 8080, env = "SHOAL_DEV_GATEWAY_PORT")]
    gateway_port: u16,
    /// Redis URL handed to the gateway (default: the configured one, else the local Redis).
    #[arg(long, env = "SHOAL__REDIS__URL")]
    redis_url: Option<String>,
    /// PostgreSQL connections the whole cluster may open (runners' pools, control
    /// connections, lock sessions and peer watchers, and the gateway's pool).
    #[arg(long, default_value_t = 20, env = "SHOAL_DEV_MAX_CONNECTIONS")]
    max_connections: u32,
}

impl DevArgs {
    pub(crate) fn apply(&self, loader: ConfigLoader) -> ConfigLoader {
        loader
            .set("database.url", self.db.database_url.clone())
            .set("redis.url", self.redis_url.clone())
    }
}

pub(crate) async fn run(args: &DevArgs, config: ShoalConfig) -> anyhow::Result<()> {
    if args.runners == 0 {
        bail!("--runners must be at least 1");
    }
    let budget = Budget::within(args.max_connections, args.runners)?;
    let config = super::children::with_local_secret(config);
    let shutdown = super::signals::shutdown_on_signals()?;
    ensure_database(&config.database.url).await?;
    let pool = super::connect(&config).await?;
    super::apply_migrations(&pool).await?;
    pool.close().await;

    // Every child shares one Redis: runners keep the job limits, webhook breakers,
    // provider limits and notification pushes there, the gateway its API limits.
    let redis = config
        .redis
        .url
        .clone()
        .unwrap_or_else(|| LOCAL_REDIS.to_owned());
    let mut children: Vec<ShoalChild> = Vec::new();
    for n in 1..=args.runners {
        let listen = format!("127.0.0.1:{}", free_port()?);
        let runner_args = [
            "runner",
            "--database-url",
            &config.database.url,
            "--listen",
            &listen,
        ];
        children.push(spawn(
            format!("runner {n} ({listen})"),
            &runner_args,
            &config,
            &redis,
            &budget.runner_env(),
        )?);
    }
    let port = if args.gateway_port == 0 {
        free_port()?
    } else {
        args.gateway_port
    };
    let gateway_listen = format!("127.0.0.1:{port}");
    let gateway_args = [
        "gateway",
        "--database-url",
        &config.database.url,
        "--listen",
        &gateway_listen,
        "--redis-url",
        &redis,
    ];
    children.push(spawn(
        format!("gateway ({gateway_listen})"),
        &gateway_args,
        &config,
        &redis,
        &budget.gateway_env(),
    )?);

    let url = format!("http://{gateway_listen}");
    let result = tokio::select! {
        ready = wait_ready(&url, &mut children) => ready,
        _ = shutdown.cancelled() => Ok(()),
    };
    if result.is_ok() && !shutdown.is_cancelled() {
        println!("gateway: {url}");
        println!("{}", budget.describe());
        let status = settled_status(&config, args.runners).await?;
        print!("{}", status.to_text());
        println!("try:  curl -X POST {url}/entities/counter/hello/increment -d '{{}}'");
        println!("Ctrl-C stops the cluster");
        tokio::select! {
            _ = shutdown.cancelled() => {}
            exited = first_exit(&mut children) => eprintln!("{exited}; stopping the cluster"),
        }
    }
    // SIGTERM the gateway first, then the runners; SIGKILL whatever outlives the deadline.
    children::stop_all(&mut children).await;
    result
}

/// How a local cluster's connections are shared out: each runner opens its pool, one
/// control connection, its lock session and `watch_peers` peer watchers; the gateway opens
/// its pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Budget {
    runners: u32,
    runner_pool: u32,
    watch_peers: u32,
    gateway_pool: u32,
}

impl Budget {
    /// Connections the gateway's pool gets: it stores every persisted request and serves
    /// the listings, so a burst of jobs went faster (`scripts/jobs-cost.sh`) with 5 here
    /// and 2 per runner than with 2 here and 3 per runner.
    const GATEWAY_POOL: u32 = 5;
    /// The smallest pool a runner works well with (one save and one completion batch).
    const MIN_RUNNER_POOL: u32 = 2;

    /// The largest runner pools that keep the cluster within `max` connections.
    fn within(max: u32, runners: usize) -> anyhow::Result<Self> {
        let runners = u32::try_from(runners)
            .ok()
            .filter(|n| *n > 0)
            .context("--runners must be between 1 and 2^32 - 1")?;
        // A ring of one watcher each: every runner is watched by one peer, which takes
        // its share of a dead runner's shards at once; the others at their next poll.
        let watch_peers = u32::from(runners > 1);
        let fixed = runners.saturating_mul(shoal::runner::CONTROL_CONNECTIONS + 1 + watch_peers);
        let runner_pool = max.saturating_sub(Self::GATEWAY_POOL.saturating_add(fixed)) / runners;
        if runner_pool < Self::MIN_RUNNER_POOL {
            let per_runner =
                shoal::runner::CONTROL_CONNECTIONS + 1 + watch_peers + Self::MIN_RUNNER_POOL;
            let needed = u64::from(Self::GATEWAY_POOL) + u64::from(runners) * u64::from(per_runner);
            bail!(
                "--max-connections {max} is too few for {runners} runners: they need at least \
                 {needed}"
            );
        }
        Ok(Self {
            runners,
            runner_pool,
            watch_peers,
            gateway_pool: Self::GATEWAY_POOL,
        })
    }

    fn per_runner(&self) -> u32 {
        self.runner_pool + shoal::runner::CONTROL_CONNECTIONS + 1 + self.watch_peers
    }

    fn total(&self) -> u32 {
        self.runners * self.per_runner() + self.gateway_pool
    }

    fn runner_env(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "SHOAL__DATABASE__POOL_MAX_CONNECTIONS",
                self.runner_pool.to_string(),
            ),
            ("SHOAL__RUNNER__WATCH_PEERS", self.watch_peers.to_string()),
        ]
    }

    fn gateway_env(&self) -> Vec<(&'static str, String)> {
        vec![(
            "SHOAL__DATABASE__POOL_MAX_CONNECTIONS",
            self.gateway_pool.to_string(),
        )]
    }

    fn describe(&self) -> String {
        format!(
            "postgres connections: {} runners × {} (pool {} + control {} + lock session 1 + \
             watchers {}) + gateway pool {} = {}",
            self.runners,
            self.per_runner(),
            self.runner_pool,
            shoal::runner::CONTROL_CONNECTIONS,
            self.watch_peers,
            self.gateway_pool,
            self.total()
        )
    }
}

/// The status once every runner holds its share (or after 10 s, whatever it is then).
async fn settled_status(
    config: &ShoalConfig,
    runners: usize,
) -> anyhow::Result<shoal::status::ClusterStatus> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = super::status::read(config).await?;
        let live: Vec<RunnerId> = status
            .runners
            .iter()
            .filter(|r| r.alive)
            .map(|r| r.id)
            .collect();
        let assignment = assign(config.sharding(), &live);
        let balanced = status
            .runners
            .iter()
            .filter(|r| r.alive)
            .all(|r| r.shards == assignment.shards_of(r.id).count());
        if (live.len() >= runners && balanced && status.unowned == 0) || Instant::now() > deadline {
            return Ok(status);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Creates the configured database if the server lacks it (a fresh machine has none).
async fn ensure_database(url: &str) -> anyhow::Result<()> {
    use sqlx::ConnectOptions;
    use std::str::FromStr;
    let options =
        sqlx::postgres::PgConnectOptions::from_str(url).context("parsing the database url")?;
    let Some(name) = options.get_database().map(str::to_owned) else {
        return Ok(());
    };
    if options.connect().await.is_ok() {
        return Ok(());
    }
    let mut admin = options
        .database("postgres")
        .connect()
        .await
        .with_context(|| format!("connecting to {}", super::redact(url)))?;
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {quoted}")))
        .execute(&mut admin)
        .await
        .with_context(|| format!("creating database {name}"))?;
    eprintln!("created database {name}");
    Ok(())
}

fn spawn(
    name: String,
    args: &[&str],
    config: &ShoalConfig,
    redis: &str,
    budget_env: &[(&str, String)],
) -> anyhow::Result<ShoalChild> {
    let mut command = children::shoal_command(args)?;
    command.envs(budget_env.iter().map(|(k, v)| (*k, v.as_str())));
    command
        .env("SHOAL__CLUSTER__NAME", config.cluster.name.as_str())
        .env("SHOAL__CLUSTER__SECRET", &config.cluster.secret)
        .env("SHOAL__REDIS__URL", redis)
        .env(
            "SHOAL__CLUSTER__SHARDS_PER_GROUP",
            config.cluster.shards_per_group.to_string(),
        )
        .env(
            "SHOAL__LOG__FILTER",
            std::env::var("SHOAL__LOG__FILTER").unwrap_or_else(|_| "warn".to_owned()),
        )
        // Children ignore the terminal's Ctrl-C; we stop them in order.
        .process_group(0);
    ShoalChild::spawn(name, &mut command)
}

async fn wait_ready(url: &str, children: &mut [ShoalChild]) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for child in children.iter_mut() {
            if let Some(status) = child.exited()? {
                bail!("{} exited during start-up with {status}", child.name);
            }
        }
        if let Ok(response) = client.get(format!("{url}/ready")).send().await
            && response.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the cluster was not ready within 60 s (see {url}/ready)");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn first_exit(children: &mut [ShoalChild]) -> String {
    loop {
        for child in children.iter_mut() {
            if let Ok(Some(status)) = child.exited() {
                return format!("{} exited with {status}", child.name);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::Budget;

    #[test]
    fn three_runners_and_a_gateway_fit_in_twenty() {
        let budget = Budget::within(20, 3).expect("20 fit 3 runners");
        assert_eq!(budget.runner_pool, 2);
        assert_eq!(budget.watch_peers, 1);
        assert_eq!(budget.total(), 20);
        for runners in 1..=6 {
            let budget = Budget::within(40, runners).expect("40 fit up to 6 runners");
            assert!(budget.total() <= 40, "{budget:?}");
        }
        let refused = Budget::within(10, 3)
            .expect_err("10 are too few")
            .to_string();
        assert!(refused.contains("at least 20"), "{refused}");
        // Absurd sizes are refused with the count, not an overflow.
        let huge = Budget::within(u32::MAX, 2_000_000_000)
            .expect_err("too many runners")
            .to_string();
        assert!(huge.contains("at least 10000000005"), "{huge}");
        assert!(Budget::within(20, 0).is_err());
    }
}
