//! Metric names and the Prometheus exporter.
//!
//! Every metric Shoal emits is named here, so the names in the architecture doc's
//! observability section have one source. Recording goes through the `metrics` facade; a
//! process that installs no recorder pays almost nothing.

use metrics::{counter, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Live runners seen by this runner's last poll.
pub const RUNNERS_ALIVE: &str = "shoal_runners_alive";
/// Shards this runner owns.
pub const SHARDS_OWNED: &str = "shoal_shards_owned";
/// Shard locks acquired.
pub const LOCK_ACQUISITIONS: &str = "shoal_lock_acquisitions_total";
/// Shard locks lost without a release (fencing).
pub const LOCK_LOSSES: &str = "shoal_lock_losses_total";
/// Shard locks released after draining.
pub const SHARD_RELEASES: &str = "shoal_shard_releases_total";
/// Times this runner fenced itself.
pub const FENCING_EVENTS: &str = "shoal_fencing_events_total";
/// Hung peers (live session, no progress for `runner.hang-timeout`) whose sessions this
/// runner ended.
pub const HUNG_RUNNERS_ENDED: &str = "shoal_hung_runners_ended_total";
/// Peers whose end a watcher saw the moment their liveness lock was freed.
pub const PEERS_GONE: &str = "shoal_peers_gone_total";
/// Longest time, in seconds, a live peer showed no progress at this runner's last poll.
pub const PEER_PROGRESS_GAP: &str = "shoal_peer_progress_gap_seconds";

/// Entities resident on this runner.
pub const ENTITIES_RESIDENT: &str = "shoal_entities_resident";
/// Resident entities with an actor (the others sleep as data).
pub const ENTITIES_AWAKE: &str = "shoal_entities_awake";
/// Persisted messages completed.
pub const MESSAGES_PROCESSED: &str = "shoal_messages_processed_total";
/// Persisted messages delivered again by a backlog scan.
pub const MESSAGES_REDELIVERED: &str = "shoal_messages_redelivered_total";
/// Backlog scan pages read (one query each).
pub const BACKLOG_SCANS: &str = "shoal_backlog_scans_total";
/// Rows those backlog scan pages returned.
pub const BACKLOG_SCAN_ROWS: &str = "shoal_backlog_scan_rows_total";
/// Volatile sends refused because the entity's mailbox was full.
pub const MAILBOX_FULL: &str = "shoal_mailbox_full_total";
/// Entity restarts after a handler panic or retryable error.
pub const ENTITY_RESTARTS: &str = "shoal_entity_restarts_total";

/// Envelopes per batch delivery request this node sent to a runner.
pub const TRANSPORT_BATCH_SIZE: &str = "shoal_transport_batch_size";

/// Gateway connections closed by a cap, by `reason` (`per_client`, `header_read_timeout`).
pub const GATEWAY_CONNECTIONS_REFUSED: &str = "shoal_gateway_connections_refused_total";

/// HTTP requests served, by route and status.
pub const HTTP_REQUESTS: &str = "shoal_http_requests_total";
/// HTTP request latency, by route.
pub const HTTP_DURATION: &str = "shoal_http_request_duration_seconds";

/// Singletons running on this runner.
pub const SINGLETONS_RUNNING: &str = "shoal_singletons_running";
/// Cron instants fired.
pub const CRON_FIRES: &str = "shoal_cron_fires_total";
/// Cron instants skipped because they passed while no runner could fire them.
pub const CRON_MISSES: &str = "shoal_cron_misses_total";
/// Delay between a cron instant and its firing.
pub const CRON_LAG: &str = "shoal_cron_lag_seconds";

/// Rows in the message tables, by table (`messages`, `replies`): the planner's estimate
/// (`pg_class.reltuples`, refreshed by autovacuum/ANALYZE), set by the retention singleton.
pub const STORAGE_ROWS: &str = "shoal_storage_rows";
/// Age of the oldest message this cluster still keeps (processed or not), in seconds.
pub const STORAGE_OLDEST_KEPT_AGE: &str = "shoal_storage_oldest_kept_age_seconds";
/// Processed messages (each with its reply) removed by retention.
pub const RETENTION_PURGED: &str = "shoal_retention_purged_total";

/// Redis commands sent (each attempt), by operation.
pub const REDIS_COMMANDS: &str = "shoal_redis_commands_total";
/// Redis commands that failed, by operation and error kind.
pub const REDIS_ERRORS: &str = "shoal_redis_errors_total";
/// Redis command latency (each attempt), by operation.
pub const REDIS_DURATION: &str = "shoal_redis_command_duration_seconds";
/// Rate-limit decisions, by limiter and outcome (`allowed`, `limited`, `bypassed`).
pub const RATE_LIMIT_DECISIONS: &str = "shoal_rate_limit_decisions_total";
/// Time callers waited for a limiter to admit them.
pub const RATE_LIMIT_WAIT: &str = "shoal_rate_limit_wait_seconds";
/// Circuit breaker state as last seen by this process: 0 closed, 1 half-open, 2 open.
pub const BREAKER_STATE: &str = "shoal_circuit_breaker_state";
/// Cache lookups, by cache and result (`hit`, `miss`).
pub const CACHE_LOOKUPS: &str = "shoal_cache_lookups_total";
/// Cache entries that failed to decode (deleted, counted as misses).
pub const CACHE_DECODE_ERRORS: &str = "shoal_cache_decode_errors_total";
/// Cache operation latency, by cache and operation.
pub const CACHE_DURATION: &str = "shoal_cache_duration_seconds";

/// How often histogram samples recorded since the last upkeep are folded into their
/// summaries.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the global Prometheus recorder and describes every metric. Call once per process.
///
/// Also starts the recorder's upkeep on a thread of its own: `install_recorder` does not,
/// and without it every histogram sample is kept until `/metrics` is scraped, so a process
/// nobody scrapes grows with every request it serves.
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| format!("cannot install metrics recorder: {e}"))?;
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".to_owned())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                upkeep.run_upkeep();
            }
        })
        .map_err(|e| format!("cannot start metrics upkeep: {e}"))?;
    describe_gauge!(
        RUNNERS_ALIVE,
        "Live runners seen by this runner's last poll."
    );
    describe_gauge!(SHARDS_OWNED, "Shards this runner owns.");
    describe_counter!(LOCK_ACQUISITIONS, "Shard locks acquired.");
    describe_counter!(LOCK_LOSSES, "Shard locks lost without a release (fencing).");
    describe_counter!(SHARD_RELEASES, "Shard locks released after draining.");
    describe_counter!(FENCING_EVENTS, "Times this runner fenced itself.");
    describe_counter!(
        HUNG_RUNNERS_ENDED,
        "Hung peers whose sessions this runner ended."
    );
    describe_counter!(PEERS_GONE, "Peers a watcher saw end.");
    describe_gauge!(
        PEER_PROGRESS_GAP,
        "Longest time a live peer showed no progress (seconds), at the last poll."
    );
    describe_gauge!(ENTITIES_RESIDENT, "Entities resident on this runner.");
    describe_gauge!(
        ENTITIES_AWAKE,
        "Resident entities with an actor (the others sleep as data)."
    );
    describe_counter!(MESSAGES_PROCESSED, "Persisted messages completed.");
    describe_counter!(
        MESSAGES_REDELIVERED,
        "Persisted messages delivered again by a scan."
    );
    describe_counter!(BACKLOG_SCANS, "Backlog scan pages read.");
    describe_counter!(BACKLOG_SCAN_ROWS, "Rows read by backlog scans.");
    describe_counter!(MAILBOX_FULL, "Volatile sends refused by a full mailbox.");
    describe_counter!(ENTITY_RESTARTS, "Entity restarts after a failure.");
    describe_gauge!(
        STORAGE_ROWS,
        "Rows in the message tables by table (planner estimate, pg_class.reltuples)."
    );
    describe_gauge!(
        STORAGE_OLDEST_KEPT_AGE,
        "Age in seconds of the oldest message the cluster still keeps."
    );
    describe_counter!(
        RETENTION_PURGED,
        "Processed messages (with their replies) removed by retention."
    );
    describe_counter!(REDIS_COMMANDS, "Redis commands sent (each attempt).");
    describe_counter!(REDIS_ERRORS, "Redis commands that failed, by error kind.");
    metrics::describe_histogram!(REDIS_DURATION, "Redis command latency (each attempt).");
    describe_counter!(RATE_LIMIT_DECISIONS, "Rate-limit decisions by outcome.");
    metrics::describe_histogram!(RATE_LIMIT_WAIT, "Time callers waited for a limiter.");
    describe_gauge!(
        BREAKER_STATE,
        "Circuit breaker state last seen: 0 closed, 1 half-open, 2 open."
    );
    describe_counter!(CACHE_LOOKUPS, "Cache lookups by result.");
    describe_counter!(CACHE_DECODE_ERRORS, "Cache entries deleted as undecodable.");
    metrics::describe_histogram!(CACHE_DURATION, "Cache operation latency.");
    metrics::describe_histogram!(
        TRANSPORT_BATCH_SIZE,
        "Envelopes per batch delivery request sent to a runner."
    );
    describe_counter!(
        GATEWAY_CONNECTIONS_REFUSED,
        "Gateway connections closed by a cap: per_client, header_read_timeout."
    );
    Ok(handle)
}

pub(crate) fn backlog_scanned(rows: usize) {
    counter!(BACKLOG_SCANS).increment(1);
    counter!(BACKLOG_SCAN_ROWS).increment(rows as u64);
}

pub(crate) fn singletons_running(n: usize) {
    gauge!(SINGLETONS_RUNNING).set(n as f64);
}

pub(crate) fn cron_fired(schedule: &str, lag: std::time::Duration) {
    counter!(CRON_FIRES, "schedule" => schedule.to_owned()).increment(1);
    metrics::histogram!(CRON_LAG, "schedule" => schedule.to_owned()).record(lag.as_secs_f64());
}

pub(crate) fn cron_missed(schedule: &str, n: usize) {
    counter!(CRON_MISSES, "schedule" => schedule.to_owned()).increment(n as u64);
}

pub(crate) fn storage_stats(stats: &crate::message_storage::StorageStats) {
    gauge!(STORAGE_ROWS, "table" => "messages").set(stats.messages as f64);
    gauge!(STORAGE_ROWS, "table" => "replies").set(stats.replies as f64);
    let age = stats.oldest_kept.map_or(0.0, |t| {
        (chrono::Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0
    });
    gauge!(STORAGE_OLDEST_KEPT_AGE).set(age);
}

pub(crate) fn retention_purged(n: u64) {
    counter!(RETENTION_PURGED).increment(n);
}

pub(crate) fn http_request(route: &str, status: u16, elapsed: std::time::Duration) {
    counter!(HTTP_REQUESTS, "route" => route.to_owned(), "status" => status.to_string())
        .increment(1);
    metrics::histogram!(HTTP_DURATION, "route" => route.to_owned()).record(elapsed.as_secs_f64());
}

pub(crate) fn gateway_connection_refused(reason: &'static str) {
    counter!(GATEWAY_CONNECTIONS_REFUSED, "reason" => reason).increment(1);
}

pub(crate) fn transport_batch(envelopes: usize) {
    metrics::histogram!(TRANSPORT_BATCH_SIZE).record(envelopes as f64);
}

pub(crate) fn entities_resident(n: usize) {
    gauge!(ENTITIES_RESIDENT).set(n as f64);
}

pub(crate) fn entities_awake(n: usize) {
    gauge!(ENTITIES_AWAKE).set(n as f64);
}

pub(crate) fn message_processed() {
    counter!(MESSAGES_PROCESSED).increment(1);
}

pub(crate) fn messages_redelivered(n: usize) {
    counter!(MESSAGES_REDELIVERED).increment(n as u64);
}

pub(crate) fn mailbox_full() {
    counter!(MAILBOX_FULL).increment(1);
}

pub(crate) fn entity_restart() {
    counter!(ENTITY_RESTARTS).increment(1);
}

pub(crate) fn runners_alive(n: usize) {
    gauge!(RUNNERS_ALIVE).set(n as f64);
}

pub(crate) fn shards_owned(n: usize) {
    gauge!(SHARDS_OWNED).set(n as f64);
}

pub(crate) fn lock_acquisitions(n: usize) {
    counter!(LOCK_ACQUISITIONS).increment(n as u64);
}

pub(crate) fn lock_losses(n: usize) {
    counter!(LOCK_LOSSES).increment(n as u64);
}

pub(crate) fn shard_releases(n: usize) {
    counter!(SHARD_RELEASES).increment(n as u64);
}

pub(crate) fn fencing_event() {
    counter!(FENCING_EVENTS).increment(1);
}

pub(crate) fn hung_runner_ended() {
    counter!(HUNG_RUNNERS_ENDED).increment(1);
}

pub(crate) fn peer_gone() {
    counter!(PEERS_GONE).increment(1);
}

pub(crate) fn peer_progress_gap(gap: std::time::Duration) {
    gauge!(PEER_PROGRESS_GAP).set(gap.as_secs_f64());
}

pub(crate) fn redis_command(
    op: &'static str,
    elapsed: std::time::Duration,
    error: Option<&'static str>,
) {
    counter!(REDIS_COMMANDS, "op" => op).increment(1);
    metrics::histogram!(REDIS_DURATION, "op" => op).record(elapsed.as_secs_f64());
    if let Some(kind) = error {
        counter!(REDIS_ERRORS, "op" => op, "kind" => kind).increment(1);
    }
}

pub(crate) fn rate_limit_decision(limiter: &'static str, outcome: &'static str) {
    counter!(RATE_LIMIT_DECISIONS, "limiter" => limiter, "outcome" => outcome).increment(1);
}

pub(crate) fn rate_limit_wait(limiter: &'static str, waited: std::time::Duration) {
    metrics::histogram!(RATE_LIMIT_WAIT, "limiter" => limiter).record(waited.as_secs_f64());
}

pub(crate) fn breaker_state(breaker: &str, state: f64) {
    gauge!(BREAKER_STATE, "breaker" => breaker.to_owned()).set(state);
}

pub(crate) fn cache_lookup(cache: &str, hit: bool, elapsed: std::time::Duration) {
    let result = if hit { "hit" } else { "miss" };
    counter!(CACHE_LOOKUPS, "cache" => cache.to_owned(), "result" => result).increment(1);
    metrics::histogram!(CACHE_DURATION, "cache" => cache.to_owned(), "op" => "get")
        .record(elapsed.as_secs_f64());
}

pub(crate) fn cache_write(cache: &str, elapsed: std::time::Duration) {
    metrics::histogram!(CACHE_DURATION, "cache" => cache.to_owned(), "op" => "set")
        .record(elapsed.as_secs_f64());
}

pub(crate) fn cache_decode_error(cache: &str) {
    counter!(CACHE_DECODE_ERRORS, "cache" => cache.to_owned()).increment(1);
}
