//! Shoal: a sharded actor cluster on PostgreSQL.
//!
//! Many **runner** processes share the shards of a cluster. Each runner holds a dedicated
//! Postgres session with an advisory lock per owned shard; a runner is alive exactly while
//! its session holds its liveness lock, so a killed runner's shards move to the survivors as
//! soon as they next poll.
//!
//! How data flows through the components:
//!
//! - [`config`] loads one validated [`ShoalConfig`] from files, environment and flags.
//! - [`sharding`] maps an entity id to its shard and computes, on every node alone, which
//!   live runner should own each shard (bounded-load rendezvous hashing).
//! - [`runner_storage`] registers runners, reads liveness and takes shard locks (Postgres,
//!   or memory for tests), bumping each shard's epoch on acquisition.
//! - [`ownership`] is the loop in each runner that acquires, drains, releases and
//!   re-confirms shard locks, and fences the runner when it cannot.
//! - [`message_storage`] persists messages before delivery (group commit), stores exactly
//!   one reply per message, and completes work only under the shard's current epoch.
//! - [`retention`] is a singleton that removes processed messages and their replies after
//!   the retention period (the idempotency window), in bounded batches.
//! - [`runner`] wires a runner process together: pool, ownership loop, HTTP endpoint,
//!   graceful shutdown.
//! - [`redis`] holds what every replica must share: rate limiters, circuit breakers and
//!   caches, each update one atomic Lua script.
//! - [`retry`] classifies every client-facing error by what a resend can do (nothing ran,
//!   stored, may run twice, final).
//! - [`metrics`] names every metric and exports them for Prometheus.

pub mod client;
pub mod config;
pub mod cron;
pub mod entity;
pub mod entity_runtime;
pub mod gateway;
pub mod ids;
pub mod message_storage;
pub mod metrics;
pub mod ownership;
pub mod redis;
pub mod retention;
pub mod retry;
pub mod runner;
pub mod runner_storage;
pub mod sharding;
pub mod singleton;
pub mod snowflake;
pub mod status;
pub mod transport;

pub use config::{ConfigLoader, ShoalConfig};
pub use ids::{
    ClusterName, EntityAddress, EntityId, EntityType, Epoch, MessageId, RunnerId, ShardId,
};
pub use sharding::Sharding;

/// The migrations of every Shoal table, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// This build's version, as runners register it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
