//! Shoal's built-in entity types, built on the runtime's public API only.
//!
//! - [`counter::Counter`]: a counter kept in Postgres, used by drills and benchmarks.
//! - [`probe::Probe`]: a diagnostic entity for drills and tests (echo, slow work, panics).
//! - [`jobs`]: the job system (`job`, `job-control`, `job-key` entities, job types, routes).
//! - [`webhook`]: one Standard Webhooks delivery attempt (signing, outcome), for the
//!   webhook job type.
//! - [`notifications`]: per-tenant event streams (`notification` entity, the gateway's
//!   subscriber hub, SSE routes).
//! - [`extraction`]: the durable knowledge-graph extraction (`extraction` entity, stages,
//!   providers, ontologies, routes).
//!
//! [`http::routes`] are the application's HTTP routes, which the gateway serves beside its
//! own.

pub mod counter;
pub mod extraction;
pub mod http;
pub mod jobs;
pub mod notifications;
pub mod probe;
pub mod webhook;

use shoal::entity::EntityRegistry;

/// The application's configuration sections (`[jobs]`, `[notifications]`,
/// `[extraction]`).
#[derive(Debug, Clone, Default)]
pub struct AppConfig {
    /// `[jobs]`.
    pub jobs: jobs::JobsConfig,
    /// `[notifications]`.
    pub notifications: notifications::NotificationsConfig,
    /// `[extraction]`.
    pub extraction: extraction::ExtractionConfig,
}

/// Every built-in entity type, ready to register on a runner.
pub fn registry() -> anyhow::Result<EntityRegistry> {
    registry_with(None, None, "shoal", &AppConfig::default())
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
        &extraction::ExtractionSetup::offline(),
    )
}

/// Every built-in entity type, the extraction pipeline built from `extraction`.
pub fn registry_for(
    pool: Option<sqlx::PgPool>,
    redis: Option<shoal::redis::RedisClient>,
    cluster: &str,
    app: &AppConfig,
    extraction: &extraction::ExtractionSetup,
) -> anyhow::Result<EntityRegistry> {
    let jobs_config = &app.jobs;
    let mut registry = EntityRegistry::new();
    registry.register(extraction::Extraction::new(std::sync::Arc::new(
        extraction.pipeline()?,
    )))?;
    registry
        .register(counter::Counter)?
        .register(probe::Probe)?
        .register(notifications::entity(
            pool.clone(),
            cluster,
            redis.clone(),
            &app.notifications,
        ))?;
    let types = job_types_with(pool, redis.clone(), jobs_config)?;
    jobs::register(&mut registry, std::sync::Arc::new(types), redis)?;
    Ok(registry)
}

/// The job types of this binary: the diagnostic ones, and `webhook` when `[jobs.webhook]`
/// has secrets (it keeps its breakers and disabled endpoints in `redis`).
pub fn job_types_with(
    pool: Option<sqlx::PgPool>,
    redis: Option<shoal::redis::RedisClient>,
    jobs_config: &jobs::JobsConfig,
) -> anyhow::Result<jobs::JobRegistry> {
    let mut types = jobs::job_types(pool)?;
    types.set_limits(jobs_config.limits());
    webhook::job::register(&mut types, &jobs_config.webhook, redis)?;
    Ok(types)
}
