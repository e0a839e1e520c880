//! `shoal gateway`.

use clap::Args;
use shoal::config::{ConfigLoader, ShoalConfig};
use shoal::gateway::GatewayParams;

use shoal_extraction::watch::{self as extraction_watch, JournalWatch};
use shoal_notifications::carrier;
use shoal_notifications::history::History;
use shoal_notifications::hub::spawn_hub;
use shoal_notifications::routes::Subscriptions;
use shoal_notifications::slots::StreamSlots;

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

pub(crate) async fn run(config: ShoalConfig, app: shoal_cli::AppConfig) -> anyhow::Result<()> {
    super::init_logging(&config);
    let shutdown = super::signals::shutdown_on_signals()?;
    let metrics = shoal::metrics::install().map_err(anyhow::Error::msg)?;
    // One pool for the gateway and its routes (jobs, history, extraction journal).
    let db = &config.database;
    let pool = shoal::runner_storage::postgres::connect_pool_named(
        &db.url,
        db.pool_max_connections,
        db.connect_timeout,
        shoal::gateway::APPLICATION_NAME,
    )
    .await?;
    let store = shoal_jobs::routes::JobStore {
        pool: pool.clone(),
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
    // One owner of the caps over every stream this gateway serves (in total and per
    // tenant): tenant streams, extraction streams and `?wait=true` waits.
    let slots = StreamSlots::of(&app.notifications);
    let journal_watch = JournalWatch::new(slots.clone(), app.notifications.sync_interval);
    let subscriptions = subscriptions(
        &config,
        pool.clone(),
        redis.as_ref(),
        &app,
        (&slots, &journal_watch),
        &shutdown,
    );
    let setup = shoal_extraction::ExtractionSetup {
        config: app.extraction.clone(),
        pool: Some(pool.clone()),
        cluster: config.cluster.name.to_string(),
        redis: redis.clone(),
        redis_config: config.redis.clone(),
    };
    let mut extraction = setup.api()?;
    extraction.watch = journal_watch;
    let extraction = std::sync::Arc::new(extraction);
    // The gateway's registry decodes and documents; the types' Redis is for their limits.
    let registry =
        shoal_cli::registry_with(None, redis.clone(), config.cluster.name.as_str(), &app)?;
    let types = shoal_cli::job_types_with(
        None,
        redis,
        &app,
        &shoal_jobs::webhook::egress::ClusterAddresses::default(),
    )?;
    let params = GatewayParams::new(config, registry)
        .with_pool(pool)
        .with_metrics(metrics)
        .with_routes(shoal_cli::http::routes_for(
            Some(store),
            types,
            Some(subscriptions),
            Some(extraction),
        ));
    shoal::gateway::run(params, shutdown).await?;
    Ok(())
}

/// The notification hub of this gateway and, with Redis, its subscription to the
/// cluster's channel; both stop at `shutdown` (the streams end before the server's drain).
fn subscriptions(
    config: &ShoalConfig,
    pool: sqlx::PgPool,
    redis: Option<&shoal::redis::RedisClient>,
    app: &shoal_cli::AppConfig,
    (slots, journal_watch): (&StreamSlots, &JournalWatch),
    shutdown: &tokio_util::sync::CancellationToken,
) -> Subscriptions {
    let notifications = &app.notifications;
    let history = History::new(
        pool,
        config.cluster.name.to_string(),
        notifications.history_max_age,
    );
    let hub = spawn_hub(
        history.clone(),
        notifications,
        slots.clone(),
        shutdown.clone(),
    );
    if let (Some(url), Some(redis)) = (&config.redis.url, redis) {
        tokio::spawn(carrier::listen(
            url.clone(),
            carrier::channel(redis.prefix()),
            hub.clone(),
            vec![(
                extraction_watch::channel(redis.prefix()),
                std::sync::Arc::new(journal_watch.clone()),
            )],
            shutdown.clone(),
        ));
    }
    Subscriptions {
        history,
        hub,
        config: notifications.clone(),
    }
}
