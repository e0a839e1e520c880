//! `shoal gateway`.

use clap::Args;
use shoal::config::{ConfigLoader, ShoalConfig};
use shoal::gateway::GatewayParams;

use super::{ClusterArgs, DatabaseArgs};

#[derive(Debug, Args)]
pub(crate) struct GatewayArgs {
    #[command(flatten)]
    db: DatabaseArgs,
    /// Address to listen on (HOST:PORT; port 0 picks one).
    #[arg(long, env = "SHOAL__GATEWAY__LISTEN")]
    listen: Option<String>,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Redis URL (rate limits, breakers, caches; checked by /ready).
    #[arg(long, env = "SHOAL__REDIS__URL")]
    redis_url: Option<String>,
}

impl GatewayArgs {
    pub(crate) fn apply(&self, loader: ConfigLoader) -> ConfigLoader {
        loader
            .set("database.url", self.db.database_url.clone())
            .set("gateway.listen", self.listen.clone())
            .set("cluster.name", self.cluster.cluster.clone())
            .set("redis.url", self.redis_url.clone())
    }
}

pub(crate) async fn run(
    config: ShoalConfig,
    jobs: shoal_entities::jobs::JobsConfig,
    extraction: shoal_entities::extraction::ExtractionConfig,
) -> anyhow::Result<()> {
    super::init_logging(&config);
    let shutdown = super::signals::shutdown_on_signals()?;
    let metrics = shoal::metrics::install().map_err(anyhow::Error::msg)?;
    let store = shoal_entities::jobs::routes::JobStore {
        pool: sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect_lazy(&config.database.url)?,
        cluster: config.cluster.name.to_string(),
    };
    // The job types as the runners have them, to validate payloads at enqueue.
    let redis = match &config.redis.url {
        Some(_) => Some(shoal::redis::RedisClient::connect(
            &config.redis,
            &config.cluster.name,
        )?),
        None => None,
    };
    let setup = shoal_entities::extraction::ExtractionSetup {
        config: extraction,
        pool: Some(store.pool.clone()),
        cluster: config.cluster.name.to_string(),
        redis: redis.clone(),
        redis_config: config.redis.clone(),
    };
    let extraction = std::sync::Arc::new(setup.api()?);
    let types = shoal_entities::job_types_with(None, redis, &jobs)?;
    let params = GatewayParams::new(config, shoal_entities::registry()?)
        .with_metrics(metrics)
        .with_routes(shoal_entities::http::routes_for(
            Some(store),
            types,
            Some(extraction),
        ));
    shoal::gateway::run(params, shutdown).await?;
    Ok(())
}
