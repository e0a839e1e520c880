//! `shoal runner`.

use std::sync::Arc;

use clap::Args;
use shoal::config::{ConfigLoader, ShoalConfig};
use shoal::runner::{RunnerConnections, RunnerParams};
use shoal::runner_storage::postgres::{LockSessionSettings, PgRunnerStorage};
use shoal_jobs::webhook::egress::{ClusterAddresses, nodes};

use super::{ClusterArgs, DatabaseArgs};

#[derive(Debug, Args)]
pub(crate) struct RunnerArgs {
    #[command(flatten)]
    db: DatabaseArgs,
    /// Address of the runner's HTTP endpoint (HOST:PORT; port 0 picks one).
    #[arg(long, env = "SHOAL__RUNNER__LISTEN")]
    listen: Option<String>,
    /// Address other nodes use to reach this runner (HOST:PORT).
    #[arg(long, env = "SHOAL__RUNNER__ADVERTISE_ADDRESS")]
    advertise_address: Option<String>,
    #[command(flatten)]
    cluster: ClusterArgs,
}

impl RunnerArgs {
    pub(crate) fn apply(&self, loader: ConfigLoader) -> ConfigLoader {
        loader
            .set("database.url", self.db.database_url.clone())
            .set("runner.listen", self.listen.clone())
            .set("runner.advertise-address", self.advertise_address.clone())
            .set("cluster.name", self.cluster.cluster.clone())
    }
}

pub(crate) async fn run(config: ShoalConfig, app: shoal_cli::AppConfig) -> anyhow::Result<()> {
    super::init_logging(&config);
    let shutdown = super::signals::shutdown_on_signals()?;
    let metrics = shoal::metrics::install().map_err(anyhow::Error::msg)?;
    // One pool for the whole process: the runtime's message storage and every
    // application table (jobs, extraction journal, notification history) share it.
    let connections = RunnerConnections::connect(&config).await?;
    let pool = connections.pool().clone();
    let redis = match &config.redis.url {
        Some(_) => Some(shoal::redis::RedisClient::connect(
            &config.redis,
            &config.cluster.name,
        )?),
        None => None,
    };
    let cluster = config.cluster.name.to_string();
    let gauges =
        shoal_jobs::gauges::singleton(pool.clone(), cluster.clone(), app.jobs.gauge_interval);
    let sweeper = shoal_jobs::sweep::singleton(
        pool.clone(),
        cluster.clone(),
        app.jobs.retention,
        app.jobs.sweep_interval,
    );
    let pruner = shoal_extraction::prune::singleton(pool.clone(), cluster.clone(), &app.extraction);
    let setup = shoal_extraction::ExtractionSetup {
        config: app.extraction.clone(),
        pool: Some(pool.clone()),
        cluster: config.cluster.name.to_string(),
        redis: redis.clone(),
        redis_config: config.redis.clone(),
    };
    // Read on the first webhook connection, not here: start-up does not wait on Postgres.
    let nodes = cluster_addresses(&config, &app, pool.clone())?;
    let params = RunnerParams {
        registry: shoal_cli::registry_for(Some(pool), redis, &cluster, &app, &setup, &nodes)?,
        config,
        singletons: vec![gauges, sweeper, pruner],
        metrics: Some(metrics),
        connections,
    };
    shoal::runner::run(params, shutdown).await?;
    Ok(())
}

/// The cluster's own addresses, which webhook deliveries never reach: this runner, the
/// registered runners, the gateway, Postgres, Redis, and `[jobs.webhook] refused-addresses`.
fn cluster_addresses(
    config: &ShoalConfig,
    app: &shoal_cli::AppConfig,
    pool: sqlx::PgPool,
) -> anyhow::Result<ClusterAddresses> {
    let mut fixed = vec![
        config.runner.listen.to_string(),
        config.gateway.listen.to_string(),
    ];
    fixed.extend(config.runner.advertise_address.clone());
    fixed.extend(nodes::url_address(&config.database.url, 5432));
    fixed.extend(
        config
            .redis
            .url
            .as_deref()
            .and_then(|u| nodes::url_address(u, 6379)),
    );
    for entry in &app.jobs.webhook.refused_addresses {
        nodes::check_entry(entry).map_err(anyhow::Error::msg)?;
    }
    fixed.extend(app.jobs.webhook.refused_addresses.iter().cloned());
    let runners = PgRunnerStorage::new(
        pool,
        &config.database.url,
        config.cluster.name.clone(),
        LockSessionSettings::default(),
    )?;
    Ok(ClusterAddresses::new(fixed, Some(Arc::new(runners))))
}
