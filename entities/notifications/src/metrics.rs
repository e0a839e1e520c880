//! The notification system's metrics.

use std::time::Duration;

/// `shoal_notify_subscribers`: streams this gateway serves under its one cap (tenant
/// streams, extraction streams and `?wait=true` waits).
pub(crate) fn subscribers(n: usize) {
    metrics::gauge!("shoal_notify_subscribers").set(n as f64);
}

/// `shoal_notify_published_total`: events numbered and stored (on the owner).
pub(crate) fn published() {
    metrics::counter!("shoal_notify_published_total").increment(1);
}

/// `shoal_notify_push_failures_total`: pushes the carrier refused.
pub(crate) fn push_failed() {
    metrics::counter!("shoal_notify_push_failures_total").increment(1);
}

/// `shoal_notify_delivered_total` and `shoal_notify_delivery_seconds` (publish → handed to
/// the subscriber's connection).
pub(crate) fn delivered(latency: Duration) {
    metrics::counter!("shoal_notify_delivered_total").increment(1);
    metrics::histogram!("shoal_notify_delivery_seconds").record(latency.as_secs_f64());
}

/// `shoal_notify_resets_total{reason}`: `event: reset` frames sent.
pub(crate) fn reset(reason: &'static str) {
    metrics::counter!("shoal_notify_resets_total", "reason" => reason).increment(1);
}

/// `shoal_notify_rejected_total`: subscriptions refused at the cap (503).
pub(crate) fn rejected() {
    metrics::counter!("shoal_notify_rejected_total").increment(1);
}

/// `shoal_notify_slow_dropped_total`: subscribers dropped by the hub because their buffer
/// was full (each is sent `event: reset` once its connection drains).
pub(crate) fn slow_dropped() {
    metrics::counter!("shoal_notify_slow_dropped_total").increment(1);
}
