//! `reminders`: one process that is a runner and a gateway of a Shoal cluster hosting the
//! reminders application. Configured like `shoal` (`SHOAL_CONFIG`, `SHOAL__*` variables);
//! applies the migrations first. Ctrl-C (or SIGTERM) stops it.

use anyhow::Context;
use shoal::config::ConfigLoader;
use shoal::gateway::GatewayParams;
use shoal::runner::RunnerParams;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let config_file = std::env::var_os("SHOAL_CONFIG").map(std::path::PathBuf::from);
    let config = ConfigLoader::new()
        .file_or_default(config_file.as_deref())
        .env(std::env::vars())
        .load()?;
    // Anyone can read the built-in secret in the source, and with it deliver into a runner.
    anyhow::ensure!(
        config.cluster.secret != shoal::config::DEFAULT_SECRET,
        "set cluster.secret (SHOAL__CLUSTER__SECRET) to a secret of your own"
    );
    let pool = shoal::runner_storage::postgres::connect_pool(
        &config.database.url,
        2,
        config.database.connect_timeout,
    )
    .await
    .context("connecting to Postgres")?;
    shoal::MIGRATOR.run(&pool).await.context("migrating")?;
    shoal_jobs::listing::migrate(&pool)
        .await
        .context("job indexes")?;
    pool.close().await;
    let redis = match config.redis.url {
        Some(_) => Some(shoal::redis::RedisClient::connect(
            &config.redis,
            &config.cluster.name,
        )?),
        None => None,
    };

    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        stop.cancel();
    });

    let connections = shoal::runner::RunnerConnections::connect(&config).await?;
    let runner = shoal::runner::run(
        RunnerParams {
            config: config.clone(),
            registry: shoal_example_reminders::registry(redis.clone())?,
            singletons: Vec::new(),
            metrics: None,
            connections,
        },
        shutdown.clone(),
    );
    let gateway = shoal::gateway::run(
        GatewayParams::new(config, shoal_example_reminders::registry(redis)?)
            .with_routes(shoal_example_reminders::routes()),
        shutdown.clone(),
    );
    // Either ending stops the other.
    let (runner, gateway) = tokio::join!(
        async {
            let ended = runner.await;
            shutdown.cancel();
            ended
        },
        async {
            let ended = gateway.await;
            shutdown.cancel();
            ended
        }
    );
    runner?;
    gateway?;
    Ok(())
}
