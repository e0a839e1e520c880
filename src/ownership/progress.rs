//! The progress rule: a live peer whose progress mark has not changed for `hang_timeout`,
//! by this runner's own clock and while this runner was watching, is hung.
//!
//! Marks are opaque (only equality counts), so the peers' and the server's clocks never
//! enter the rule. A gap in this runner's own observations (it was paused or starved
//! itself) restarts every peer's clock: nobody is judged on time this runner did not see.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::ids::RunnerId;
use crate::runner_storage::{ProgressMark, RunnerProgress};

/// Per-peer progress as this runner saw it. Holds one entry per live peer.
#[derive(Debug)]
pub(crate) struct ProgressTracker {
    hang_timeout: Duration,
    last_observation: Option<Instant>,
    peers: HashMap<RunnerId, Seen>,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    mark: ProgressMark,
    since: Instant,
}

/// A peer judged hung: its id and the mark it is stuck on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hung {
    pub(crate) progress: RunnerProgress,
    pub(crate) stalled_for: Duration,
}

impl ProgressTracker {
    pub(crate) fn new(hang_timeout: Duration) -> Self {
        Self {
            hang_timeout,
            last_observation: None,
            peers: HashMap::new(),
        }
    }

    /// Feeds the marks read at `now` (of every live runner but `me`) and returns the peers
    /// that made no progress for at least `hang_timeout`, with the longest stall seen.
    pub(crate) fn observe(
        &mut self,
        now: Instant,
        me: RunnerId,
        readings: &[RunnerProgress],
    ) -> (Vec<Hung>, Duration) {
        // Observations further apart than half the timeout are not continuous watching.
        let continuous = self
            .last_observation
            .is_some_and(|last| now.saturating_duration_since(last) <= self.hang_timeout / 2);
        self.last_observation = Some(now);
        self.peers
            .retain(|id, _| readings.iter().any(|r| r.id == *id));
        let mut hung = Vec::new();
        let mut longest = Duration::ZERO;
        for reading in readings.iter().filter(|r| r.id != me) {
            let seen = self.peers.entry(reading.id).or_insert(Seen {
                mark: reading.mark,
                since: now,
            });
            if seen.mark != reading.mark || !continuous {
                *seen = Seen {
                    mark: reading.mark,
                    since: now,
                };
            }
            let stalled_for = now.saturating_duration_since(seen.since);
            longest = longest.max(stalled_for);
            if stalled_for >= self.hang_timeout {
                hung.push(Hung {
                    progress: *reading,
                    stalled_for,
                });
            }
        }
        (hung, longest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: i32) -> RunnerId {
        RunnerId::new(n).expect("valid id")
    }

    fn reading(n: i32, mark: i64) -> RunnerProgress {
        RunnerProgress {
            id: id(n),
            mark: ProgressMark(mark),
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(3);
    const POLL: Duration = Duration::from_millis(250);

    /// Polls every 250 ms for `span`, peer 2 advancing its mark each time and peer 3 stuck;
    /// returns the hung peers of the last poll.
    async fn watch(tracker: &mut ProgressTracker, span: Duration, start_mark: i64) -> Vec<Hung> {
        let mut last = Vec::new();
        let mut mark = start_mark;
        let end = Instant::now() + span;
        while Instant::now() < end {
            tokio::time::advance(POLL).await;
            mark += 1;
            let readings = [reading(1, mark), reading(2, mark), reading(3, 7)];
            last = tracker.observe(Instant::now(), id(1), &readings).0;
        }
        last
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_without_progress_is_hung_after_the_timeout_and_not_before() {
        let mut tracker = ProgressTracker::new(TIMEOUT);
        let early = watch(&mut tracker, TIMEOUT - POLL * 2, 0).await;
        assert!(
            early.is_empty(),
            "nobody is hung before the timeout: {early:?}"
        );
        let late = watch(&mut tracker, POLL * 3, 100).await;
        assert_eq!(
            late.iter().map(|h| h.progress).collect::<Vec<_>>(),
            vec![reading(3, 7)],
            "only the stuck peer, never this runner or the advancing one"
        );
        assert!(late[0].stalled_for >= TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn progress_restarts_the_clock() {
        let mut tracker = ProgressTracker::new(TIMEOUT);
        tracker.observe(Instant::now(), id(1), &[reading(2, 1)]);
        let hung = watch_stuck(&mut tracker, TIMEOUT - POLL, 1).await;
        assert!(hung.is_empty(), "stuck for less than the timeout");
        let hung = watch_stuck(&mut tracker, TIMEOUT - POLL, 2).await;
        assert!(hung.is_empty(), "the change restarted the clock");
        let hung = watch_stuck(&mut tracker, POLL * 2, 2).await;
        assert_eq!(
            hung.len(),
            1,
            "the timeout has passed since the last change"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_gap_in_this_runners_own_watching_judges_nobody() {
        let mut tracker = ProgressTracker::new(TIMEOUT);
        tracker.observe(Instant::now(), id(1), &[reading(2, 1)]);
        // This runner was paused itself for longer than the timeout.
        tokio::time::advance(TIMEOUT * 4).await;
        let (hung, _) = tracker.observe(Instant::now(), id(1), &[reading(2, 1)]);
        assert!(
            hung.is_empty(),
            "time this runner did not watch does not count"
        );
        let later = watch_stuck(&mut tracker, TIMEOUT + POLL, 1).await;
        assert_eq!(later.len(), 1, "watched long enough afterwards, it is hung");
    }

    /// Polls every 250 ms for `span`, peer 2 showing `mark` each time.
    async fn watch_stuck(tracker: &mut ProgressTracker, span: Duration, mark: i64) -> Vec<Hung> {
        let end = Instant::now() + span;
        let mut last = Vec::new();
        while Instant::now() < end {
            tokio::time::advance(POLL).await;
            last = tracker
                .observe(Instant::now(), id(1), &[reading(2, mark)])
                .0;
        }
        last
    }

    #[tokio::test(start_paused = true)]
    async fn peers_that_left_are_forgotten() {
        let mut tracker = ProgressTracker::new(TIMEOUT);
        tracker.observe(Instant::now(), id(1), &[reading(2, 1), reading(3, 1)]);
        tokio::time::advance(POLL).await;
        tracker.observe(Instant::now(), id(1), &[reading(3, 2)]);
        assert_eq!(tracker.peers.len(), 1, "one entry per live peer");
    }
}
