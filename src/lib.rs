//! Shoal: a sharded actor cluster on PostgreSQL.
//!
//! Many **runner** processes share the shards of a cluster. Each runner holds a dedicated
//! Postgres session with an advisory lock per owned shard; a runner is alive exactly while
//! its session holds its liveness lock, so a killed runner's shards move to the survivors as
//! soon as they next poll.
//!
//! # The path of a persisted message
//!
//! `POST /entities/counter/hello/increment` with `{"by": 2}`, step by step:
//!
//! 1. **Gateway** ([`gateway`], `gateway/routes.rs`): validates the address and the body
//!    (a clear 4xx otherwise), applies the caller's rate limit, and hands a
//!    [`client::Request`] to the client.
//! 2. **Client** ([`client`]): finds the owner of the entity's shard in the routing it keeps
//!    (live runners → [`sharding`] assignment) and, the message being persisted, stores it
//!    first.
//! 3. **Storage** ([`message_storage`], `postgres/save.rs` + `postgres/batcher.rs`): one
//!    group-committed insert; a known idempotency key returns the earlier message (and its
//!    reply, if it has one) instead of a second row.
//! 4. **Transport** ([`transport`], `transport/http/peer.rs`): the client sends the stored
//!    message's envelope to the owner over HTTP/2 and waits; on `NotOwner`, a lost
//!    connection or an owner that changed it reads storage for the reply, refreshes the
//!    routing and tries again until the deadline.
//! 5. **Runner** ([`runner`], `transport/http/server.rs`): checks the cluster secret and the
//!    envelope version and hands a [`transport::Delivery`] to its [`entity_runtime`].
//! 6. **Shard actor** (`entity_runtime/shard.rs`): refuses the message if this runner does
//!    not own the shard under its current epoch, admits it against the entity's bounded
//!    mailbox (a full one leaves it in storage for the backlog scan), and spawns the entity
//!    actor if it is not resident.
//! 7. **Entity actor** (`entity_runtime/entity_actor.rs`): loads the state (from Postgres
//!    when the type persists it) and runs the handler ([`entity::Entity::handle`]).
//! 8. **Completion** (`message_storage/postgres/complete.rs`): one transaction stores the
//!    reply, marks the message processed and writes the new state, only if the shard's
//!    epoch is still this runner's (a fenced runner commits nothing).
//! 9. **Reply**: the shard actor answers every caller waiting on the message (and
//!    remembers the reply briefly, `entity_runtime/recent.rs`); it travels back over the
//!    transport to the client and the gateway. A caller that lost its connection reads
//!    the one stored reply by the message's id or key.
//!
//! If the runner dies anywhere after step 3, the shard's next owner finds the message
//! unprocessed in storage and runs it again (at-least-once; the epoch check makes the
//! completion exactly once). A volatile message skips steps 3 and 8.
//!
//! # The components
//!
//! - [`config`] loads one validated [`ShoalConfig`] from files, environment and flags.
//! - [`sharding`] maps an entity id to its shard and computes, on every node alone, which
//!   live runner should own each shard (bounded-load rendezvous hashing).
//! - [`runner_storage`] registers runners, reads liveness and takes shard locks (Postgres,
//!   or memory for tests), bumping each shard's epoch on acquisition.
//! - `ownership` is the loop in each runner that acquires, drains, releases and
//!   re-confirms shard locks, and fences the runner when it cannot.
//! - [`message_storage`] persists messages before delivery (group commit), stores exactly
//!   one reply per message, and completes work only under the shard's current epoch.
//! - `retention` is a singleton that removes processed messages and their replies after
//!   the retention period (the idempotency window), in bounded batches.
//! - [`runner`] wires a runner process together: pool, ownership loop, HTTP endpoint,
//!   graceful shutdown.
//! - [`redis`] holds what every replica must share: rate limiters, circuit breakers and
//!   caches, each update one atomic Lua script.
//! - [`backoff`] is the exponential backoff every retry loop uses.
//! - [`retry`] classifies every client-facing error by what a resend can do (nothing ran,
//!   stored, may run twice, final).
//! - [`metrics`] names every metric and exports them for Prometheus.

pub mod backoff;
pub mod client;
pub mod config;
pub mod cron;
pub mod entity;
pub mod entity_runtime;
pub mod gateway;
pub mod ids;
pub mod message_storage;
pub mod metrics;
pub(crate) mod ownership;
pub mod redis;
pub(crate) mod retention;
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
