//! Cluster cron: schedules from `[[cron]]`, driven by one singleton (`shoal-cron`).
//!
//! Each instant becomes one persisted message with the idempotency key
//! `cron:<name>:<instant>`, so an instant sent twice (a failover between sending and
//! recording, or a fenced driver that has not noticed yet) is stored once. The last instant
//! handled is recorded per schedule (`shoal_cron_state`, only ever moving forward), so a new
//! driver knows which instants passed while nobody could fire them and applies the
//! schedule's missed-run policy to them.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use serde::Serialize;
use sqlx::{PgPool, Row};

use crate::backoff::Backoff;
use crate::client::{ClientError, Request, ShoalClient};
use crate::ids::{ClusterName, EntityAddress, EntityId, EntityType, RunnerId};
use crate::singleton::{Singleton, SingletonContext};
use config::{CronScheduleConfig, MissedRunPolicy};

pub mod config;

/// The singleton that drives every schedule.
pub const DRIVER: &str = "shoal-cron";

/// How long the driver waits for an instant's message to be handled before moving on.
pub const FIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// An instant this late or less is on time; older ones passed while nobody could fire them.
pub const ON_TIME: Duration = Duration::from_secs(1);

/// A validated schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Its name.
    pub name: String,
    /// The expression as written.
    pub expression: String,
    cron: croner::Cron,
    zone: chrono_tz::Tz,
    /// Missed-run policy.
    pub policy: MissedRunPolicy,
    /// Bound of `run-all`.
    pub max_catch_up: usize,
    /// Target entity.
    pub target: EntityAddress,
    /// Target message.
    pub message: String,
    payload: serde_json::Value,
}

/// What to do now for one schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Instants to fire, oldest first.
    pub fire: Vec<DateTime<Utc>>,
    /// Due instants not fired (by policy).
    pub missed: usize,
    /// The latest due instant: recorded as handled once `fire` is sent.
    pub handled_through: Option<DateTime<Utc>>,
}

impl Schedule {
    /// Validates a `[[cron]]` entry; the error names the schedule.
    pub fn parse(config: &CronScheduleConfig) -> Result<Self, String> {
        let name = &config.name;
        let fail = |what: String| format!("cron schedule `{name}`: {what}");
        if name.is_empty() || name.len() > 100 || name.contains(':') {
            return Err(fail(
                "the name must be 1 to 100 characters without ':'".to_owned(),
            ));
        }
        let cron = croner::Cron::from_str(&config.expression).map_err(|e| {
            fail(format!(
                "expression `{}` does not parse: {e}",
                config.expression
            ))
        })?;
        let zone = chrono_tz::Tz::from_str(&config.time_zone)
            .map_err(|_| fail(format!("unknown time zone `{}`", config.time_zone)))?;
        let entity_type =
            EntityType::new(config.target.entity_type.clone()).map_err(|e| fail(e.to_string()))?;
        let entity_id =
            EntityId::new(config.target.entity_id.clone()).map_err(|e| fail(e.to_string()))?;
        if !config.target.payload.is_object() {
            return Err(fail("target payload must be a table".to_owned()));
        }
        Ok(Self {
            name: name.clone(),
            expression: config.expression.clone(),
            cron,
            zone,
            policy: config.policy,
            max_catch_up: config.max_catch_up.max(1),
            target: EntityAddress {
                entity_type,
                entity_id,
            },
            message: config.target.message.clone(),
            payload: config.target.payload.clone(),
        })
    }

    /// The first instant strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // Instants are whole seconds; croner keeps a start's fraction, so drop it first.
        let t = t.trunc_subsecs(0);
        self.cron
            .find_next_occurrence(&t.with_timezone(&self.zone), false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The due instants in `(last, now]` and what the policy does with them.
    pub fn plan(&self, last: DateTime<Utc>, now: DateTime<Utc>) -> Plan {
        // Forward count (bounded), keeping only the newest instants a policy could fire.
        const MAX_SCAN: usize = 100_000;
        let keep = match self.policy {
            MissedRunPolicy::RunAll => self.max_catch_up,
            _ => 1,
        };
        let mut newest = std::collections::VecDeque::with_capacity(keep + 1);
        let mut due = 0usize;
        let mut cursor = last;
        while let Some(next) = self.next_after(cursor) {
            if next > now || due >= MAX_SCAN {
                break;
            }
            due += 1;
            newest.push_back(next);
            if newest.len() > keep {
                newest.pop_front();
            }
            cursor = next;
        }
        if due >= MAX_SCAN {
            // A very long outage: the newest instants are found backwards from now.
            newest.clear();
            let mut cursor = now;
            let mut inclusive = true;
            while newest.len() < keep {
                match self.cron.find_previous_occurrence(
                    &cursor.trunc_subsecs(0).with_timezone(&self.zone),
                    inclusive,
                ) {
                    Ok(prev) if prev.with_timezone(&Utc) > last => {
                        let prev = prev.with_timezone(&Utc);
                        newest.push_front(prev);
                        cursor = prev;
                        inclusive = false;
                    }
                    _ => break,
                }
            }
        }
        let handled_through = newest.back().copied();
        let fire: Vec<DateTime<Utc>> = match self.policy {
            MissedRunPolicy::Skip => handled_through
                .filter(|t| (now - *t).to_std().unwrap_or_default() <= ON_TIME)
                .into_iter()
                .collect(),
            MissedRunPolicy::RunOnce => handled_through.into_iter().collect(),
            MissedRunPolicy::RunAll => newest.into_iter().collect(),
        };
        Plan {
            missed: due - fire.len().min(due),
            fire,
            handled_through,
        }
    }

    /// The request that fires `instant`.
    pub fn request(&self, instant: DateTime<Utc>) -> Request {
        let stamp = instant.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let payload = substitute(self.payload.clone(), &stamp, &self.name);
        Request::persisted(self.target.clone(), self.message.clone(), payload)
            .with_key(format!("cron:{}:{stamp}", self.name))
    }
}

fn substitute(value: serde_json::Value, instant: &str, name: &str) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(s) if s == "{{instant}}" => Value::String(instant.to_owned()),
        Value::String(s) if s == "{{name}}" => Value::String(name.to_owned()),
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .map(|v| substitute(v, instant, name))
                .collect(),
        ),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, substitute(v, instant, name)))
                .collect(),
        ),
        other => other,
    }
}

/// Last handled instants, in Postgres.
#[derive(Debug, Clone)]
pub struct CronStore {
    pool: PgPool,
    cluster: ClusterName,
}

impl CronStore {
    /// The store of `cluster`.
    pub fn new(pool: PgPool, cluster: ClusterName) -> Self {
        Self { pool, cluster }
    }

    /// Every schedule's last handled instant.
    pub async fn load(&self) -> Result<HashMap<String, DateTime<Utc>>, sqlx::Error> {
        let rows = sqlx::query("SELECT name, last_fired FROM shoal_cron_state WHERE cluster = $1")
            .bind(self.cluster.as_str())
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|row| Ok((row.try_get("name")?, row.try_get("last_fired")?)))
            .collect()
    }

    /// Records `at` as handled; the stored instant only moves forward.
    pub async fn record(&self, name: &str, at: DateTime<Utc>) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO shoal_cron_state (cluster, name, last_fired) VALUES ($1, $2, $3)
             ON CONFLICT (cluster, name) DO UPDATE
                SET last_fired = GREATEST(shoal_cron_state.last_fired, EXCLUDED.last_fired),
                    updated_at = now()",
        )
        .bind(self.cluster.as_str())
        .bind(name)
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// The singleton that drives `schedules`.
pub fn driver(schedules: Vec<Schedule>, client: ShoalClient, store: CronStore) -> Singleton {
    let schedules = Arc::new(schedules);
    Singleton::new(DRIVER, move |ctx| {
        drive(ctx, schedules.clone(), client.clone(), store.clone())
    })
}

async fn drive(
    ctx: SingletonContext,
    schedules: Arc<Vec<Schedule>>,
    client: ShoalClient,
    store: CronStore,
) {
    tracing::info!(runner_id = ?ctx.runner_id, epoch = %ctx.epoch, schedules = schedules.len(), "cron driver leading");
    let Some(mut last) = retry(&ctx, || store.load()).await else {
        return;
    };
    let started = Utc::now();
    for schedule in schedules.iter() {
        if !last.contains_key(&schedule.name) {
            // A new schedule starts from now: nothing before it was ever due.
            if retry(&ctx, || store.record(&schedule.name, started))
                .await
                .is_none()
            {
                return;
            }
            last.insert(schedule.name.clone(), started);
        }
    }
    while ctx.is_leader() {
        let now = Utc::now();
        for schedule in schedules.iter() {
            let from = last.get(&schedule.name).copied().unwrap_or(now);
            let plan = schedule.plan(from, now);
            if plan.missed > 0 {
                tracing::warn!(schedule = %schedule.name, missed = plan.missed, policy = ?schedule.policy, "cron instants missed while no runner could fire them");
                crate::metrics::cron_missed(&schedule.name, plan.missed);
            }
            for instant in &plan.fire {
                // Ask, not send: each instant is handled before the next is stored, so the
                // target sees instants in order even right after a failover (a fire-and-forget
                // notification lost during a restart would let the next instant overtake it).
                // A timeout means the message is stored and will run: move on.
                let fire = || async {
                    match client
                        .ask(schedule.request(*instant).with_timeout(FIRE_TIMEOUT))
                        .await
                    {
                        Ok(_) | Err(ClientError::Timeout { .. }) => Ok(()),
                        Err(error) => Err(error),
                    }
                };
                if retry(&ctx, fire).await.is_none() {
                    return;
                }
                let lag = (Utc::now() - *instant).to_std().unwrap_or_default();
                crate::metrics::cron_fired(&schedule.name, lag);
                tracing::debug!(schedule = %schedule.name, %instant, ?lag, "cron instant fired");
            }
            if let Some(through) = plan.handled_through {
                if retry(&ctx, || store.record(&schedule.name, through))
                    .await
                    .is_none()
                {
                    return;
                }
                last.insert(schedule.name.clone(), through);
            }
        }
        let next = schedules
            .iter()
            .filter_map(|s| s.next_after(last.get(&s.name).copied().unwrap_or(now).max(now)))
            .min();
        // An instant already due (this pass took long) is handled at once, not in a second.
        let wait = match next {
            Some(n) => (n - Utc::now()).to_std().unwrap_or(Duration::ZERO),
            None => Duration::from_secs(1),
        };
        tokio::select! {
            _ = ctx.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    tracing::info!("cron driver stopped leading");
}

/// Retries `call` with backoff while this runner leads; None once leadership ends.
async fn retry<T, E: std::fmt::Display, F, Fut>(ctx: &SingletonContext, mut call: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    while ctx.is_leader() {
        match call().await {
            Ok(value) => return Some(value),
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(%error, ?delay, "cron driver step failed; retrying");
                tokio::select! {
                    _ = ctx.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    None
}

/// One schedule as `GET /cron` and `shoal cron list` show it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ScheduleView {
    /// Name.
    pub name: String,
    /// Expression.
    pub expression: String,
    /// `skip`, `run-once` or `run-all`.
    pub policy: String,
    /// Last handled instant.
    pub last_fired: Option<DateTime<Utc>>,
    /// Next instant.
    pub next: Option<DateTime<Utc>>,
    /// The runner driving the schedules now.
    #[schema(value_type = Option<i32>)]
    pub runner: Option<RunnerId>,
}

/// `{"schedules": [...]}`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct CronListing {
    /// Every schedule.
    pub schedules: Vec<ScheduleView>,
}

/// Lists `schedules` with their state; `driver` is the runner owning the driver's shard.
pub async fn list(
    schedules: &[Schedule],
    store: &CronStore,
    driver: Option<RunnerId>,
) -> Result<CronListing, sqlx::Error> {
    let last = store.load().await?;
    let now = Utc::now();
    Ok(CronListing {
        schedules: schedules
            .iter()
            .map(|s| {
                let last_fired = last.get(&s.name).copied();
                ScheduleView {
                    name: s.name.clone(),
                    expression: s.expression.clone(),
                    policy: match s.policy {
                        MissedRunPolicy::Skip => "skip",
                        MissedRunPolicy::RunOnce => "run-once",
                        MissedRunPolicy::RunAll => "run-all",
                    }
                    .to_owned(),
                    last_fired,
                    next: s.next_after(last_fired.unwrap_or(now).max(now)),
                    runner: driver,
                }
            })
            .collect(),
    })
}

/// Parses every schedule of a configuration (already validated at load).
pub fn schedules(configs: &[CronScheduleConfig]) -> Result<Vec<Schedule>, String> {
    configs.iter().map(Schedule::parse).collect()
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use proptest::prelude::*;

    use super::config::CronTargetConfig;
    use super::*;

    fn schedule(expression: &str, policy: MissedRunPolicy, max_catch_up: usize) -> Schedule {
        Schedule::parse(&CronScheduleConfig {
            name: "s".to_owned(),
            expression: expression.to_owned(),
            time_zone: "UTC".to_owned(),
            policy,
            max_catch_up,
            target: CronTargetConfig {
                entity_type: "counter".to_owned(),
                entity_id: "c".to_owned(),
                message: "increment".to_owned(),
                payload: serde_json::json!({"at": "{{instant}}"}),
            },
        })
        .expect("valid")
    }

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + s, 0)
            .single()
            .expect("valid")
    }

    #[test]
    fn on_time_instants_fire_under_every_policy() {
        for policy in [
            MissedRunPolicy::Skip,
            MissedRunPolicy::RunOnce,
            MissedRunPolicy::RunAll,
        ] {
            let plan = schedule("* * * * * *", policy, 10).plan(t(0), t(1));
            assert_eq!(plan.fire, vec![t(1)], "{policy:?}");
            assert_eq!(plan.missed, 0);
            assert_eq!(plan.handled_through, Some(t(1)));
        }
    }

    #[test]
    fn missed_instants_follow_the_policy() {
        // Down from t(0) to t(10): instants 1..=10 are due, 10 is on time.
        let skip = schedule("* * * * * *", MissedRunPolicy::Skip, 100).plan(t(0), t(10));
        assert_eq!((skip.fire, skip.missed), (vec![t(10)], 9));
        // Every 5 s; the newest due instant (t(10)) is 1.5 s late: not on time.
        let late_skip = schedule("*/5 * * * * *", MissedRunPolicy::Skip, 100)
            .plan(t(0), t(10) + chrono::Duration::milliseconds(1500));
        assert_eq!((late_skip.fire.len(), late_skip.missed), (0, 2));
        assert_eq!(late_skip.handled_through, Some(t(10)));
        let once = schedule("* * * * * *", MissedRunPolicy::RunOnce, 100).plan(t(0), t(10));
        assert_eq!((once.fire, once.missed), (vec![t(10)], 9));
        let all = schedule("* * * * * *", MissedRunPolicy::RunAll, 100).plan(t(0), t(10));
        assert_eq!(all.fire, (1..=10).map(t).collect::<Vec<_>>());
        let bounded = schedule("* * * * * *", MissedRunPolicy::RunAll, 3).plan(t(0), t(10));
        assert_eq!((bounded.fire, bounded.missed), (vec![t(8), t(9), t(10)], 7));
    }

    #[test]
    fn instants_are_whole_seconds_whatever_the_start() {
        let s = schedule("*/10 * * * * *", MissedRunPolicy::Skip, 1);
        let start = t(3) + chrono::Duration::milliseconds(688);
        assert_eq!(s.next_after(start), Some(t(10)));
        let plan = s.plan(start, t(10) + chrono::Duration::milliseconds(5));
        assert_eq!((plan.fire, plan.missed), (vec![t(10)], 0));
    }

    #[test]
    fn the_instant_is_substituted_and_keyed() {
        let request = schedule("*/5 * * * * *", MissedRunPolicy::Skip, 1).request(t(5));
        assert_eq!(
            request.idempotency_key.as_deref(),
            Some("cron:s:2027-01-15T08:00:05.000Z")
        );
        assert_eq!(
            request.payload,
            serde_json::json!({"at": "2027-01-15T08:00:05.000Z"})
        );
    }

    #[test]
    fn time_zones_shift_instants() {
        let mut config = CronScheduleConfig {
            name: "tz".to_owned(),
            expression: "0 0 9 * * *".to_owned(),
            time_zone: "Europe/Paris".to_owned(),
            policy: MissedRunPolicy::Skip,
            max_catch_up: 1,
            target: CronTargetConfig {
                entity_type: "counter".to_owned(),
                entity_id: "c".to_owned(),
                message: "increment".to_owned(),
                payload: serde_json::json!({}),
            },
        };
        let paris = Schedule::parse(&config).expect("valid");
        config.time_zone = "UTC".to_owned();
        let utc = Schedule::parse(&config).expect("valid");
        let from = Utc
            .with_ymd_and_hms(2026, 1, 10, 0, 0, 0)
            .single()
            .expect("valid");
        assert_eq!(
            utc.next_after(from).map(|d| d.format("%H").to_string()),
            Some("09".to_owned())
        );
        assert_eq!(
            paris.next_after(from).map(|d| d.format("%H").to_string()),
            Some("08".to_owned())
        );
    }

    proptest! {
        #[test]
        fn plans_never_fire_outside_the_window_or_twice(
            gap in 0i64..500, late_ms in 0i64..3000, catch_up in 1usize..50,
            policy in prop_oneof![Just(MissedRunPolicy::Skip), Just(MissedRunPolicy::RunOnce), Just(MissedRunPolicy::RunAll)],
        ) {
            let s = schedule("*/5 * * * * *", policy, catch_up);
            let last = t(0);
            let now = t(gap) + chrono::Duration::milliseconds(late_ms);
            let plan = s.plan(last, now);
            let mut previous = last;
            for instant in &plan.fire {
                prop_assert!(*instant > previous && *instant <= now);
                previous = *instant;
            }
            let due = (1..=gap + 3).filter(|i| (1_800_000_000 + i) % 5 == 0 && t(*i) <= now).count();
            prop_assert_eq!(plan.fire.len() + plan.missed, due);
            if policy == MissedRunPolicy::RunAll {
                prop_assert_eq!(plan.fire.len(), due.min(catch_up));
            } else {
                prop_assert!(plan.fire.len() <= 1);
            }
        }
    }
}
