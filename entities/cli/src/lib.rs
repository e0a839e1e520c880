//! The `shoal` binary's application: the three workload crates registered with the demo
//! and diagnostic types. An application of its own composes the crates it wants the same
//! way (`examples/reminders` takes `shoal-jobs` alone).
//!
//! - [`counter::Counter`]: a counter kept in Postgres, used by drills and benchmarks.
//! - [`probe::Probe`]: a diagnostic entity for drills and tests (echo, slow work, panics).
//! - [`shoal_jobs`]: the job system (`job`, `job-control`, `job-key`, `job-cron`, job
//!   types, routes) with the Standard Webhooks job type ([`shoal_jobs::webhook`]).
//! - [`shoal_notifications`]: per-tenant event streams (`notification` entity, the
//!   gateway's subscriber hub, SSE routes).
//! - [`shoal_extraction`]: the durable knowledge-graph extraction (`extraction` entity,
//!   stages, providers, ontologies, routes).
//!
//! [`registry_for`] registers them on a runner; [`http::routes`] are the application's
//! HTTP routes, which the gateway serves beside its own.

pub mod counter;
pub mod http;
pub mod probe;

use shoal::entity::EntityRegistry;

/// `[diagnostics]`: the types drills and tests use (`probe`, the `diag.*` job types).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct DiagnosticsConfig {
    /// Whether they are registered. Default `false`: a production cluster does not offer
    /// them to tenants; `shoal dev` and the drills turn them on for their children.
    pub enabled: bool,
}

/// The application's configuration sections (`[jobs]`, `[notifications]`,
/// `[extraction]`, `[diagnostics]`).
#[derive(Debug, Clone, Default)]
pub struct AppConfig {
    /// `[jobs]`.
    pub jobs: shoal_jobs::JobsConfig,
    /// `[notifications]`.
    pub notifications: shoal_notifications::NotificationsConfig,
    /// `[extraction]`.
    pub extraction: shoal_extraction::ExtractionConfig,
    /// `[diagnostics]`.
    pub diagnostics: DiagnosticsConfig,
}

impl AppConfig {
    /// The defaults with the diagnostic types on (tests, benches, local clusters).
    pub fn with_diagnostics() -> Self {
        Self {
            diagnostics: DiagnosticsConfig { enabled: true },
            ..Self::default()
        }
    }
}

/// Every built-in entity type, the diagnostic ones included (tests and benches).
pub fn registry() -> anyhow::Result<EntityRegistry> {
    registry_with(None, None, "shoal", &AppConfig::with_diagnostics())
}

/// Every built-in entity type; job types that touch the database and the notification
/// history use `pool` (the database of cluster `cluster`), limited job types take their
/// concurrency leases on `redis`, and notifications are pushed through it.
pub fn registry_with(
    pool: Option<sqlx::PgPool>,
    redis: Option<shoal::redis::RedisClient>,
    cluster: &str,
    app: &AppConfig,
) -> anyhow::Result<EntityRegistry> {
    registry_for(
        pool,
        redis,
        cluster,
        app,
        &shoal_extraction::ExtractionSetup::offline(),
        &shoal_jobs::webhook::egress::ClusterAddresses::default(),
    )
}

/// Every built-in entity type, the extraction pipeline built from `extraction`; webhook
/// deliveries never reach `nodes` (the cluster's own addresses).
pub fn registry_for(
    pool: Option<sqlx::PgPool>,
    redis: Option<shoal::redis::RedisClient>,
    cluster: &str,
    app: &AppConfig,
    extraction: &shoal_extraction::ExtractionSetup,
    nodes: &shoal_jobs::webhook::egress::ClusterAddresses,
) -> anyhow::Result<EntityRegistry> {
    let mut registry = EntityRegistry::new();
    shoal_extraction::register(&mut registry, extraction)?;
    if app.diagnostics.enabled {
        registry.register(probe::Probe)?;
    }
    registry.register(counter::Counter)?;
    shoal_notifications::register(
        &mut registry,
        pool.clone(),
        cluster,
        redis.clone(),
        &app.notifications,
    )?;
    let types = job_types_with(pool, redis.clone(), app, nodes)?;
    shoal_jobs::register(&mut registry, std::sync::Arc::new(types), redis)?;
    Ok(registry)
}

/// The job types of this binary: the diagnostic ones with `[diagnostics] enabled`, and
/// `webhook` when `[jobs.webhook]` has secrets (it keeps its breakers and disabled
/// endpoints in `redis`).
pub fn job_types_with(
    pool: Option<sqlx::PgPool>,
    redis: Option<shoal::redis::RedisClient>,
    app: &AppConfig,
    nodes: &shoal_jobs::webhook::egress::ClusterAddresses,
) -> anyhow::Result<shoal_jobs::JobRegistry> {
    let mut types = if app.diagnostics.enabled {
        shoal_jobs::job_types(pool)?
    } else {
        shoal_jobs::JobRegistry::new()
    };
    types.set_limits(app.jobs.limits());
    shoal_jobs::webhook::job::register(&mut types, &app.jobs.webhook, redis, nodes.clone())?;
    Ok(types)
}
