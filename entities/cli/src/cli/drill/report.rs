//! What a drill reports: one run's numbers ([`DrillRun`]) and the summary over runs.

use anyhow::Context;
use serde::Serialize;
use shoal::ids::RunnerId;

/// One drill's result.
#[derive(Debug, Clone, Serialize)]
pub(super) struct DrillRun {
    pub(super) runners: usize,
    /// `kill` (SIGKILL) or `freeze` (SIGSTOP, then SIGCONT).
    pub(super) mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) frozen_s: Option<f64>,
    pub(super) killed_runner: RunnerId,
    pub(super) shards_moved: usize,
    pub(super) ownership_ms: f64,
    pub(super) first_processed_ms: Option<f64>,
    pub(super) sent: usize,
    pub(super) acknowledged: usize,
    pub(super) processed: usize,
    pub(super) lost: usize,
    pub(super) duplicated: usize,
    pub(super) reexecuted: i64,
    pub(super) failed_requests: usize,
}

#[derive(Debug, Serialize)]
pub(super) struct DrillReport {
    #[serde(flatten)]
    pub(super) last: DrillRun,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) runs: Vec<DrillRun>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ownership_ms_p50: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ownership_ms_p99: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_processed_ms_p50: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_processed_ms_p99: Option<f64>,
}

pub(super) fn report(mut runs: Vec<DrillRun>) -> anyhow::Result<DrillReport> {
    let last = runs.last().cloned().context("at least one run")?;
    if runs.len() == 1 {
        runs.clear();
        return Ok(DrillReport {
            last,
            runs,
            ownership_ms_p50: None,
            ownership_ms_p99: None,
            first_processed_ms_p50: None,
            first_processed_ms_p99: None,
        });
    }
    let sorted = |values: Vec<f64>| {
        let mut values = values;
        values.sort_by(f64::total_cmp);
        values
    };
    let ownership = sorted(runs.iter().map(|r| r.ownership_ms).collect());
    let first = sorted(runs.iter().filter_map(|r| r.first_processed_ms).collect());
    Ok(DrillReport {
        last,
        ownership_ms_p50: Some(percentile(&ownership, 0.50)),
        ownership_ms_p99: Some(percentile(&ownership, 0.99)),
        first_processed_ms_p50: (!first.is_empty()).then(|| percentile(&first, 0.50)),
        first_processed_ms_p99: (!first.is_empty()).then(|| percentile(&first, 0.99)),
        runs,
    })
}

/// Nearest-rank percentile of sorted values.
pub(super) fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
