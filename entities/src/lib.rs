//! Shoal's built-in entity types, built on the runtime's public API only.
//!
//! - [`counter::Counter`]: a counter kept in Postgres, used by drills and benchmarks.
//! - [`probe::Probe`]: a diagnostic entity for drills and tests (echo, slow work, panics).
//! - [`jobs`]: the job system (`job`, `job-control`, `job-key` entities, job types, routes).
//! - [`webhook`]: one Standard Webhooks delivery attempt (signing, outcome), for the
//!   webhook job type.
//! - [`extraction`]: the durable knowledge-graph extraction (`extraction` entity, stages,
//!   providers, ontologies, routes).
//!
//! [`http::routes`] are the application's HTTP routes, which the gateway serves beside its
//! own.

pub mod counter;
pub mod extraction;
pub mod http;
pub mod jobs;
pub mod probe;
pub mod webhook;

use shoal::entity::EntityRegistry;

/// Every built-in entity type, ready to register on a runner.
pub fn registry() -> anyhow::Result<EntityRegistry> {
    registry_with(None, None, &jobs::JobsConfig::default())
}

/// Every built-in entity type; job types that touch the database use `pool`, limited job
/// types take their concurrency leases on `redis`.
pub fn registry_with(
    pool: Option<sqlx::PgPool>,
    redis: Option<shoal::redis::RedisClient>,
    jobs_config: &jobs::JobsConfig,
) -> anyhow::Result<EntityRegistry> {
    registry_for(
        pool,
        redis,
        jobs_config,
        &extraction::ExtractionSetup::offline(),
    )
}

/// Every built-in entity type, the extraction pipeline built from `extraction`.
pub fn registry_for(
    pool: Option<sqlx::PgPool>,
    redis: Option<shoal::redis::RedisClient>,
    jobs_config: &jobs::JobsConfig,
    extraction: &extraction::ExtractionSetup,
) -> anyhow::Result<EntityRegistry> {
    let mut registry = EntityRegistry::new();
    registry.register(extraction::Extraction::new(std::sync::Arc::new(
        extraction.pipeline()?,
    )))?;
    registry
        .register(counter::Counter)?
        .register(probe::Probe)?;
    let types = job_types_with(pool, redis.clone(), jobs_config)?;
    jobs::register(
        &mut registry,
        std::sync::Arc::new(types),
        redis,
        jobs_config,
    )?;
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
    webhook::job::register(&mut types, &jobs_config.webhook, redis)?;
    Ok(types)
}
