//! The limiters' arithmetic in plain Rust, step for step what the Lua scripts in
//! `src/redis/lua/` do, so it can be property-tested without Redis (the tests below check
//! it against naive models) and the scripts can be checked against it through a real Redis
//! (`tests/redis.rs`). Times are milliseconds; all arithmetic is on integers, which the
//! scripts' Lua doubles hold exactly below 2^53.

/// What a limiter decided (the scripts' reply, minus the clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the call is admitted.
    pub allowed: bool,
    /// Units still available after this decision.
    pub remaining: u64,
    /// When a unit frees (sliding window, leases), the window resets (fixed window) or the
    /// bucket is full again (token bucket), in ms.
    pub reset_at: i64,
    /// How long to wait before the same call can be admitted; 0 when admitted.
    pub retry_after: i64,
}

/// Sliding-window log (`sliding_window.lua`): `entries` are admission times, kept sorted.
/// An entry at `t` counts while `t > now - window`.
pub fn sliding_window(entries: &mut Vec<i64>, limit: u64, window: i64, now: i64) -> Verdict {
    entries.retain(|&t| t > now - window);
    let mut allowed = false;
    if (entries.len() as u64) < limit {
        let at = entries.partition_point(|&t| t <= now);
        entries.insert(at, now);
        allowed = true;
    }
    let reset_at = entries
        .first()
        .map_or(now + window, |&oldest| oldest + window);
    Verdict {
        allowed,
        remaining: limit.saturating_sub(entries.len() as u64),
        reset_at,
        retry_after: if allowed { 0 } else { reset_at - now },
    }
}

/// Fixed window (`fixed_window.lua`): `state` is `(window start, cost counted in it)`.
pub fn fixed_window(
    state: &mut Option<(i64, u64)>,
    limit: u64,
    window: i64,
    cost: u64,
    now: i64,
) -> Verdict {
    let start = now - now.rem_euclid(window);
    let reset_at = start + window;
    let mut count = match *state {
        Some((stored, count)) if stored == start => count,
        _ => 0,
    };
    let allowed = count + cost <= limit;
    if allowed {
        count += cost;
        *state = Some((start, count));
    }
    Verdict {
        allowed,
        remaining: limit.saturating_sub(count),
        reset_at,
        retry_after: if allowed { 0 } else { reset_at - now },
    }
}

/// A token bucket's stored state (`token_bucket.lua`): the level in token-milliseconds
/// (tokens × period) and when it was last refilled. `None` is a full bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// Tokens × period.
    pub level: u64,
    /// Time of the last refill, ms.
    pub ts: i64,
}

/// Token bucket (`token_bucket.lua`): `capacity` tokens, refilled at `capacity` per
/// `period` ms; a call takes `cost` tokens.
pub fn token_bucket(
    state: &mut Option<Bucket>,
    capacity: u64,
    period: u64,
    cost: u64,
    now: i64,
) -> Verdict {
    let full = capacity * period;
    let cost = cost * period;
    let Bucket { mut level, mut ts } = state.unwrap_or(Bucket {
        level: full,
        ts: now,
    });
    if now > ts {
        let elapsed = ((now - ts) as u64).min(period);
        level = full.min(level + elapsed * capacity);
        ts = now;
    }
    let allowed = level >= cost;
    let mut retry_after = 0;
    if allowed {
        level -= cost;
        *state = Some(Bucket { level, ts });
    } else {
        retry_after = (cost - level).div_ceil(capacity) as i64;
    }
    Verdict {
        allowed,
        remaining: level / period,
        reset_at: now + (full - level).div_ceil(capacity) as i64,
        retry_after,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Calls at increasing times: (gap since the previous call in ms, cost).
    fn calls(max_gap: i64, max_cost: u64) -> impl Strategy<Value = Vec<(i64, u64)>> {
        prop::collection::vec((0..=max_gap, 1..=max_cost), 1..200)
    }

    proptest! {
        /// Never more than `limit` admissions in any window, and a call is refused only
        /// when the window is full.
        #[test]
        fn sliding_window_matches_a_log(
            limit in 1u64..20,
            window in 1i64..2_000,
            calls in calls(300, 1),
        ) {
            let mut entries = Vec::new();
            let mut admitted: Vec<i64> = Vec::new();
            let mut now = 1_000_000;
            for (gap, _) in calls {
                now += gap;
                let in_window = admitted.iter().filter(|&&t| t > now - window).count() as u64;
                let verdict = sliding_window(&mut entries, limit, window, now);
                prop_assert_eq!(verdict.allowed, in_window < limit);
                if verdict.allowed {
                    admitted.push(now);
                    prop_assert_eq!(verdict.retry_after, 0);
                } else {
                    // Waiting `retry_after` frees exactly one slot, and not earlier.
                    let later = now + verdict.retry_after;
                    let at = |t: i64| admitted.iter().filter(|&&a| a > t - window).count() as u64;
                    prop_assert!(at(later) < limit);
                    prop_assert!(at(later - 1) >= limit);
                }
                let used = admitted.iter().filter(|&&t| t > now - window).count() as u64;
                prop_assert_eq!(verdict.remaining, limit - used);
            }
        }

        /// The cost admitted in a window never exceeds the limit; a call is refused only
        /// when it would; the reset is the window's end.
        #[test]
        fn fixed_window_matches_a_counter(
            limit in 1u64..50,
            window in 1i64..5_000,
            calls in calls(1_000, 10),
        ) {
            let mut state = None;
            let mut per_window = std::collections::BTreeMap::<i64, u64>::new();
            let mut now = 7_777;
            for (gap, cost) in calls {
                now += gap;
                let index = now.div_euclid(window);
                let used = per_window.get(&index).copied().unwrap_or(0);
                let verdict = fixed_window(&mut state, limit, window, cost, now);
                prop_assert_eq!(verdict.allowed, used + cost <= limit);
                prop_assert_eq!(verdict.reset_at, (index + 1) * window);
                if verdict.allowed {
                    *per_window.entry(index).or_default() += cost;
                } else {
                    prop_assert_eq!(verdict.retry_after, verdict.reset_at - now);
                }
                let used = per_window.get(&index).copied().unwrap_or(0);
                prop_assert!(used <= limit);
                prop_assert_eq!(verdict.remaining, limit - used);
            }
        }

        /// Against a model with exact rational tokens: admitted iff the model has the tokens,
        /// the level matches, and over any run the admitted cost is at most the capacity plus
        /// what the elapsed time refilled.
        #[test]
        fn token_bucket_matches_rational_refill(
            capacity in 1u64..1_000,
            period in 1u64..120_000,
            calls in calls(5_000, 50),
        ) {
            let mut state = None;
            // The model: tokens as a fraction level / period, refilled capacity per ms.
            let full = u128::from(capacity) * u128::from(period);
            let mut level = full;
            let start = 42_000i64;
            let mut now = start;
            let mut admitted = 0u128;
            for (gap, cost) in calls {
                let cost = cost.min(capacity);
                now += gap;
                level = full.min(level + gap as u128 * u128::from(capacity));
                let verdict = token_bucket(&mut state, capacity, period, cost, now);
                let need = u128::from(cost) * u128::from(period);
                prop_assert_eq!(verdict.allowed, level >= need);
                if verdict.allowed {
                    level -= need;
                    admitted += u128::from(cost);
                } else {
                    // After `retry_after` ms the model has the tokens, one ms earlier not.
                    let after = |ms: i64| full.min(level + ms as u128 * u128::from(capacity));
                    prop_assert!(after(verdict.retry_after) >= need);
                    prop_assert!(after(verdict.retry_after - 1) < need);
                }
                prop_assert_eq!(u128::from(verdict.remaining), level / u128::from(period));
                let elapsed = (now - start) as u128;
                prop_assert!(
                    admitted * u128::from(period)
                        <= full + elapsed * u128::from(capacity)
                );
            }
        }
    }

    #[test]
    fn a_full_bucket_resets_now_and_an_empty_one_after_a_period() {
        let mut state = None;
        let verdict = token_bucket(&mut state, 10, 60_000, 10, 0);
        assert!(verdict.allowed);
        assert_eq!(verdict.remaining, 0);
        assert_eq!(verdict.reset_at, 60_000);
        let verdict = token_bucket(&mut state, 10, 60_000, 1, 1);
        assert!(!verdict.allowed);
        assert_eq!(verdict.retry_after, 5_999);
    }
}
