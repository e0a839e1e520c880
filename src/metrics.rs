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

/// Installs the global Prometheus recorder and describes every metric. Call once per process.
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| format!("cannot install metrics recorder: {e}"))?;
    describe_gauge!(
        RUNNERS_ALIVE,
        "Live runners seen by this runner's last poll."
    );
    describe_gauge!(SHARDS_OWNED, "Shards this runner owns.");
    describe_counter!(LOCK_ACQUISITIONS, "Shard locks acquired.");
    describe_counter!(LOCK_LOSSES, "Shard locks lost without a release (fencing).");
    describe_counter!(SHARD_RELEASES, "Shard locks released after draining.");
    describe_counter!(FENCING_EVENTS, "Times this runner fenced itself.");
    Ok(handle)
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
