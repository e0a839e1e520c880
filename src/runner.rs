//! A runner process: the pool, the ownership loop, the runner's HTTP endpoint, and ordered
//! shutdown (stop acquiring → drain → release shard by shard → unregister → close pools).

mod connections;
mod http;

pub use connections::{CONTROL_CONNECTIONS, RunnerConnections};

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use tokio::sync::watch;

use crate::client::{ClientConfig, ClientParts, ShoalClient};
use crate::config::ShoalConfig;
use crate::cron::CronStore;
use crate::entity::EntityRegistry;
use crate::entity_runtime::{EntityRuntime, RuntimeConfig};
use crate::ids::RunnerId;
use crate::message_storage::postgres::{BatchConfig, PgMessageStorage};
use crate::ownership::{OwnershipConfig, OwnershipHandle, spawn_ownership};
use crate::runner_storage::postgres::{LockSessionSettings, PgRunnerStorage};
use crate::runner_storage::{RunnerRegistration, RunnerStorage, StorageError};
use crate::singleton::{Lifecycles, Singleton, Singletons};
use crate::transport::http::HttpTransport;

/// Why a runner could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The database refused or the schema is wrong.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The listen address could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: String,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration does not fit the registered entity types.
    #[error("{0}")]
    Config(String),
    /// The transport client could not be built.
    #[error("{0}")]
    Transport(String),
    /// Graceful shutdown took longer than `runner.shutdown-timeout`.
    #[error("shutdown did not finish within {0:?}")]
    ShutdownTimedOut(std::time::Duration),
}

/// What a runner process is started with.
#[derive(Debug)]
pub struct RunnerParams {
    /// The validated configuration.
    pub config: ShoalConfig,
    /// The entity types this runner hosts.
    pub registry: EntityRegistry,
    /// Singletons of the application (the cron driver is added from the config).
    pub singletons: Vec<Singleton>,
    /// The process's metrics exporter, served at `/metrics`.
    pub metrics: Option<PrometheusHandle>,
    /// The process's pools ([`RunnerConnections::connect`]), shared with the application.
    pub connections: RunnerConnections,
}

/// Runs a runner until `shutdown` is cancelled, then shuts it down in order.
pub async fn run(params: RunnerParams, shutdown: CancellationToken) -> Result<(), RunnerError> {
    let config = &params.config;
    let schedules = check_cron_targets(config, &params.registry)?;
    let registry = hosted_types(&params.registry, &config.runner.skip_entity_types)?;
    let db = &config.database;
    let connections = params.connections.clone();
    let pool = connections.pool().clone();
    let storage = PgRunnerStorage::new(
        connections.control().clone(),
        &db.url,
        config.cluster.name.clone(),
        LockSessionSettings {
            keepalive_idle: config.runner.keepalive_idle,
            keepalive_interval: config.runner.keepalive_interval,
            keepalive_count: config.runner.keepalive_count,
        },
    )?
    .with_process_tag(connections.tag().clone());
    storage
        .ensure_cluster(config.cluster.shards_per_group.get())
        .await?;
    let storage = Arc::new(storage);
    if config.cluster.secret == crate::config::DEFAULT_SECRET {
        tracing::warn!(
            "cluster.secret is the built-in default: set your own outside local clusters"
        );
    }
    let batching = if db.group_commit {
        BatchConfig::GROUP_COMMIT
    } else {
        BatchConfig::ONE_BY_ONE
    };
    let messages = Arc::new(PgMessageStorage::new(
        pool.clone(),
        config.cluster.name.clone(),
        batching,
    ));

    let listener = TcpListener::bind(config.runner.listen)
        .await
        .map_err(|source| RunnerError::Bind {
            address: config.runner.listen.to_string(),
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| RunnerError::Bind {
        address: config.runner.listen.to_string(),
        source,
    })?;
    let address = config
        .runner
        .advertise_address
        .clone()
        .unwrap_or_else(|| bound.to_string());

    let (runner_id_tx, runner_id_rx) = watch::channel(None);
    let runtime = EntityRuntime::new(
        registry,
        messages.clone(),
        RuntimeConfig {
            sharding: config.sharding(),
            max_resident_entities: config.runner.max_resident_entities,
            scan_interval: config.runner.scan_interval,
            max_attempts: config.runner.max_delivery_attempts,
            type_wait_backoff: config.runner.type_wait_backoff,
            recent_replies_bytes: config.runner.recent_replies_bytes,
            sleep_after: config.runner.sleep_after,
            ..RuntimeConfig::default()
        },
        runner_id_rx.clone(),
    );
    let sweep_shutdown = CancellationToken::new();
    tokio::spawn(runtime.clone().sweep_backlog(sweep_shutdown.clone()));
    let client_shutdown = CancellationToken::new();
    let transport =
        HttpTransport::new(config.cluster.secret.clone()).map_err(RunnerError::Transport)?;
    let client = ShoalClient::start(
        ClientParts {
            sharding: config.sharding(),
            runners: storage.clone(),
            messages: messages.clone(),
            transport: Arc::new(transport),
            machine_id: crate::snowflake::random_machine_id(),
            config: ClientConfig::default(),
        },
        client_shutdown.clone(),
    );
    tokio::spawn(follow_machine_id(client.clone(), runner_id_rx.clone()));
    // Handlers reach other entities through this runner's client.
    runtime.connect(client.clone());
    let mut singletons = params.singletons.clone();
    if !schedules.is_empty() {
        let store = CronStore::new(pool.clone(), config.cluster.name.clone());
        singletons.push(crate::cron::driver(schedules, client.clone(), store));
    }
    if config.retention.enabled {
        singletons.push(crate::retention::singleton(
            messages.clone(),
            config.retention.clone(),
        ));
    }
    let singletons = Singletons::new(
        config.sharding(),
        singletons,
        runner_id_rx.clone(),
        config.runner.drain_timeout,
    )
    .with_client(client.clone());
    let lifecycle = Lifecycles(vec![
        Arc::new(runtime.clone()),
        Arc::new(singletons.clone()),
    ]);
    let loop_shutdown = CancellationToken::new();
    let (ownership, ownership_done) = spawn_ownership(
        storage.clone(),
        Arc::new(lifecycle),
        OwnershipConfig {
            sharding: config.sharding(),
            poll_interval: config.runner.poll_interval,
            lock_check_interval: config.runner.lock_check_interval,
            lock_deadline: config.runner.lock_deadline,
            drain_timeout: config.runner.drain_timeout,
            hang_timeout: config.runner.hang_timeout,
            watch_peers: config.runner.watch_peers,
            registration: RunnerRegistration {
                address: address.clone(),
                version: crate::VERSION.to_owned(),
            },
        },
        loop_shutdown.clone(),
    );
    tracing::info!(listen = %bound, %address, cluster = %config.cluster.name, "runner started");
    tokio::spawn(follow_runner_id(ownership.clone(), runner_id_tx));

    let http_shutdown = CancellationToken::new();
    let server = tokio::spawn(http::serve(
        listener,
        http::RunnerHttp {
            ownership: ownership.clone(),
            metrics: params.metrics.clone(),
            runtime: runtime.clone(),
            secret: config.cluster.secret.clone(),
            singletons,
        },
        http_shutdown.clone(),
    ));

    shutdown.cancelled().await;
    let result = shut_down(&params, ownership, ownership_done, loop_shutdown).await;
    http_shutdown.cancel();
    client_shutdown.cancel();
    sweep_shutdown.cancel();
    let _ = server.await;
    connections.close().await;
    result
}

/// The registry without `runner.skip-entity-types` (each must be registered: a typo would
/// otherwise host everything silently).
fn hosted_types(registry: &EntityRegistry, skip: &[String]) -> Result<EntityRegistry, RunnerError> {
    let mut hosted = registry.clone();
    for name in skip {
        let known = crate::ids::EntityType::new(name.as_str())
            .is_ok_and(|entity_type| hosted.remove(&entity_type));
        if !known {
            return Err(RunnerError::Config(format!(
                "runner.skip-entity-types: `{name}` is not a registered entity type"
            )));
        }
    }
    Ok(hosted)
}

/// Every cron schedule must target a registered type with a persisted message that decodes.
fn check_cron_targets(
    config: &ShoalConfig,
    registry: &EntityRegistry,
) -> Result<Vec<crate::cron::Schedule>, RunnerError> {
    let schedules = crate::cron::schedules(&config.cron).map_err(RunnerError::Config)?;
    for schedule in &schedules {
        let fail = |what: String| {
            RunnerError::Config(format!("cron schedule `{}`: {what}", schedule.name))
        };
        let def = registry.get(&schedule.target.entity_type).ok_or_else(|| {
            fail(format!(
                "unknown entity type `{}`",
                schedule.target.entity_type
            ))
        })?;
        let request = schedule.request(chrono::Utc::now());
        let message = def
            .decode(&schedule.message, request.payload)
            .map_err(|e| fail(e.to_string()))?;
        if !def.is_persisted(&message) {
            return Err(fail(format!(
                "message `{}` is volatile; cron sends persisted messages",
                schedule.message
            )));
        }
    }
    Ok(schedules)
}

/// Keeps the runtime's view of the runner id in step with the ownership loop (it changes
/// when the runner rejoins after fencing).
async fn follow_runner_id(
    ownership: OwnershipHandle,
    tx: watch::Sender<Option<crate::ids::RunnerId>>,
) {
    let mut views = ownership.subscribe();
    loop {
        let id = views.borrow_and_update().runner_id;
        tx.send_if_modified(|current| {
            let changed = *current != id;
            *current = id;
            changed
        });
        if views.changed().await.is_err() {
            return;
        }
    }
}

async fn shut_down(
    params: &RunnerParams,
    ownership: OwnershipHandle,
    ownership_done: tokio::task::JoinHandle<()>,
    loop_shutdown: CancellationToken,
) -> Result<(), RunnerError> {
    let deadline = params.config.runner.shutdown_timeout;
    let owned = ownership.view().owned.len();
    tracing::info!(owned, ?deadline, "shutting down");
    loop_shutdown.cancel();
    match tokio::time::timeout(deadline, ownership_done).await {
        Ok(_) => {
            tracing::info!("runner stopped");
            Ok(())
        }
        Err(_) => Err(RunnerError::ShutdownTimedOut(deadline)),
    }
}

/// Gives this runner's message ids its registered runner id as machine id, for every
/// incarnation (a random one serves until the first registration).
async fn follow_machine_id(client: ShoalClient, mut runner_id: watch::Receiver<Option<RunnerId>>) {
    loop {
        if let Some(id) = *runner_id.borrow_and_update() {
            client.set_machine_id(id.get().unsigned_abs());
        }
        if runner_id.changed().await.is_err() {
            return;
        }
    }
}
