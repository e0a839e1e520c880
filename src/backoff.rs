//! Exponential backoff, the one helper every retry loop in Shoal uses: the client between
//! delivery attempts, the ownership loop between registrations, the cron driver between
//! failed steps, Redis between retried commands, an entity's restarts and a message waiting
//! for its type to be deployed.
//!
//! Two forms: a [`Backoff`] value a loop keeps (the delay doubles after each wait, up to
//! the cap; [`Backoff::reset`] after a success), and [`Backoff::nth`] for a delay computed
//! from an attempt count kept elsewhere (a stored message's attempts). Jitter is optional:
//! with it a delay `d` becomes a uniform draw in `[d, 1.5 d]`, so replicas that failed
//! together do not retry together; without it the delay is exact (what tests and a single
//! caller want).

use std::time::Duration;

use tokio::time::Instant;

/// Exponentially growing delays: `first`, `2 × first`, … up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    current: Duration,
    jitter: bool,
}

impl Backoff {
    /// Delays from `first`, doubling up to `max`, without jitter.
    pub const fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            current: first,
            jitter: false,
        }
    }

    /// With jitter: each delay is drawn from `[d, 1.5 d]`.
    pub const fn with_jitter(mut self) -> Self {
        self.jitter = true;
        self
    }

    /// The delay the next wait takes (before jitter).
    pub fn current(&self) -> Duration {
        self.current
    }

    /// The next delay; the one after is twice as long (up to the cap).
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.current;
        self.current = self.current.saturating_mul(2).min(self.max);
        if self.jitter { jittered(delay) } else { delay }
    }

    /// Starts again from the first delay (after a success).
    pub fn reset(&mut self) {
        self.current = self.first;
    }

    /// Sleeps the next delay.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Sleeps the next delay, but never past `deadline`.
    pub async fn wait_until(&mut self, deadline: Instant) {
        let until = (Instant::now() + self.next_delay()).min(deadline);
        tokio::time::sleep_until(until).await;
    }

    /// The delay before attempt `attempt + 1` when attempts are counted elsewhere:
    /// `first × 2^attempt`, at most `first × 2^max_doublings`.
    pub fn nth(first: Duration, attempt: u32, max_doublings: u32) -> Duration {
        first.saturating_mul(2u32.saturating_pow(attempt.min(max_doublings)))
    }
}

/// `delay` stretched by a uniform random share of up to half of it.
pub fn jittered(delay: Duration) -> Duration {
    let extra = delay.as_micros() as u64 / 2;
    if extra == 0 {
        return delay;
    }
    delay + Duration::from_micros(rand::random_range(0..=extra))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn delays_double_up_to_the_cap_and_reset() {
        let mut backoff = Backoff::new(10 * MS, 50 * MS);
        let delays: Vec<_> = (0..5).map(|_| backoff.next_delay()).collect();
        assert_eq!(delays, [10 * MS, 20 * MS, 40 * MS, 50 * MS, 50 * MS]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), 10 * MS);
    }

    #[test]
    fn jitter_stays_within_half_above_the_delay() {
        let mut backoff = Backoff::new(100 * MS, 100 * MS).with_jitter();
        for _ in 0..200 {
            let delay = backoff.next_delay();
            assert!((100 * MS..=150 * MS).contains(&delay), "{delay:?}");
        }
    }

    #[test]
    fn nth_is_capped_by_doublings() {
        assert_eq!(Backoff::nth(100 * MS, 0, 5), 100 * MS);
        assert_eq!(Backoff::nth(100 * MS, 3, 5), 800 * MS);
        assert_eq!(Backoff::nth(100 * MS, 40, 5), 3200 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn waits_never_pass_the_deadline() {
        let mut backoff = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
        let start = Instant::now();
        backoff.wait_until(start + Duration::from_secs(1)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }
}
