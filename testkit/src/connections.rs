//! The PostgreSQL connection budget, made visible. The server allows `max_connections`
//! (100 here) and every test cluster spends some of them; when a suite shares the server
//! with another cluster, a shortage shows up as "too many clients" in whichever test opens
//! the next connection. So that it is never mistaken for a bug:
//!
//! - the first [`TestDb`](crate::TestDb) of a test binary starts a sampler holding one
//!   connection of its own, which records the binary's peak (connections to the suite's
//!   `shoal_t_*` databases, and what else was using the server at that moment) in
//!   `target/tmp/pg-connections/<binary>.json`; `.ci/run` prints them after the suite;
//! - when the server comes within [`HEADROOM`] connections of its limit, the sampler
//!   says so on stderr (uncaptured), naming the budget and who holds it;
//! - a test database that cannot be created for lack of connections fails with the same
//!   account instead of the bare server error.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::json;
use sqlx::{Connection, PgConnection};

/// The prefix of the suite's own databases.
pub const SUITE_PREFIX: &str = "shoal_t_";
/// Free connections below which the sampler warns.
pub const HEADROOM: i64 = 10;
const EVERY: Duration = Duration::from_millis(200);

/// Who holds the server's connections at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionUse {
    /// `max_connections`.
    pub max: i64,
    /// Connections to the suite's `shoal_t_*` databases.
    pub suite: i64,
    /// Every other client connection, by database.
    pub others: BTreeMap<String, i64>,
}

impl ConnectionUse {
    /// Client connections in use.
    pub fn in_use(&self) -> i64 {
        self.suite + self.others.values().sum::<i64>()
    }

    /// One line for a person.
    pub fn describe(&self) -> String {
        let others = if self.others.is_empty() {
            "nothing else".to_owned()
        } else {
            self.others
                .iter()
                .map(|(db, n)| format!("{n} on {db}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "PostgreSQL has {} of its {} connections in use: {} by this suite's test databases, \
             {others}",
            self.in_use(),
            self.max,
            self.suite
        )
    }
}

/// Reads who holds the server's connections, over `conn`.
pub async fn connection_use(conn: &mut PgConnection) -> sqlx::Result<ConnectionUse> {
    let max: i32 = sqlx::query_scalar("SELECT current_setting('max_connections')::int")
        .fetch_one(&mut *conn)
        .await?;
    let rows: Vec<(Option<String>, i64)> = sqlx::query_as(
        "SELECT datname, count(*) FROM pg_stat_activity
         WHERE backend_type = 'client backend' GROUP BY datname",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut usage = ConnectionUse {
        max: i64::from(max),
        ..ConnectionUse::default()
    };
    for (db, count) in rows {
        let db = db.unwrap_or_else(|| "(no database)".to_owned());
        if db.starts_with(SUITE_PREFIX) {
            usage.suite += count;
        } else {
            *usage.others.entry(db).or_default() += count;
        }
    }
    Ok(usage)
}

/// Whether `error` is the server refusing a connection for lack of slots (SQLSTATE 53300).
pub fn is_too_many_clients(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<sqlx::Error>()
            .and_then(|e| e.as_database_error())
            .and_then(|e| e.code())
            .is_some_and(|code| code == "53300")
            || cause.to_string().contains("too many clients")
    })
}

/// The latest sample, for explaining a failure.
pub fn latest() -> Option<ConnectionUse> {
    SAMPLER.get()?.lock().ok()?.latest.clone()
}

#[derive(Debug, Default)]
struct Samples {
    latest: Option<ConnectionUse>,
    peak: Option<ConnectionUse>,
    warned: bool,
}

static SAMPLER: OnceLock<std::sync::Mutex<Samples>> = OnceLock::new();

/// Starts this binary's sampler on the server of `admin_url`, once.
pub(crate) fn start_sampler(admin_url: &str) {
    let mut started = false;
    SAMPLER.get_or_init(|| {
        started = true;
        std::sync::Mutex::default()
    });
    if !started {
        return;
    }
    let admin_url = admin_url.to_owned();
    // A thread of its own with its own runtime: it outlives any one test's runtime.
    let _ = std::thread::Builder::new()
        .name("pg-connections".to_owned())
        .spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(sample(admin_url));
        });
}

async fn sample(admin_url: String) {
    let Ok(mut conn) = PgConnection::connect(&admin_url).await else {
        return;
    };
    let out = crate::python::target_tmp()
        .ok()
        .map(|tmp| tmp.join("pg-connections"));
    let binary = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "unknown".to_owned());
    loop {
        if let Ok(usage) = connection_use(&mut conn).await {
            record(usage, out.as_deref(), &binary);
        }
        tokio::time::sleep(EVERY).await;
    }
}

fn record(usage: ConnectionUse, out: Option<&std::path::Path>, binary: &str) {
    let Some(samples) = SAMPLER.get() else { return };
    let mut samples = samples.lock().unwrap_or_else(|e| e.into_inner());
    let near_limit = usage.max - usage.in_use() < HEADROOM;
    if near_limit && !samples.warned {
        samples.warned = true;
        // Straight to the process's stderr: the test harness captures only `eprintln!`.
        let _ = writeln!(
            std::io::stderr(),
            "testkit: {}; fewer than {HEADROOM} are free, so tests may fail with \"too many \
             clients\" for lack of connections, not for a bug",
            usage.describe()
        );
    }
    let new_peak = samples
        .peak
        .as_ref()
        .is_none_or(|peak| usage.suite > peak.suite);
    if new_peak {
        samples.peak = Some(usage.clone());
        if let Some(dir) = out {
            let others: BTreeMap<_, _> = usage.others.clone();
            let report = json!({
                "binary": binary,
                "peak_suite_connections": usage.suite,
                "others_at_peak": others,
                "max_connections": usage.max,
            });
            let _ = std::fs::create_dir_all(dir);
            let _ = std::fs::write(dir.join(format!("{binary}.json")), report.to_string());
        }
    }
    samples.latest = Some(usage);
}

#[cfg(test)]
mod tests {
    use sqlx::Connection;

    use super::latest;
    use crate::{DEADLINE, TestDb, wait_until};

    #[tokio::test]
    async fn the_sampler_counts_connections_to_test_databases_and_records_the_peak()
    -> anyhow::Result<()> {
        let db = TestDb::create().await?;
        let _held = sqlx::PgConnection::connect(&db.url).await?;
        wait_until(DEADLINE, "the sampler sees the held connection", || async {
            Ok(latest().is_some_and(|usage| usage.suite >= 1 && usage.max > 0))
        })
        .await?;
        let dir = crate::python::target_tmp()?.join("pg-connections");
        wait_until(DEADLINE, "the peak is written", || async {
            Ok(std::fs::read_dir(&dir)?.flatten().any(|entry| {
                std::fs::read_to_string(entry.path()).is_ok_and(|report| {
                    serde_json::from_str::<serde_json::Value>(&report)
                        .is_ok_and(|report| report["peak_suite_connections"].as_i64() >= Some(1))
                })
            }))
        })
        .await?;
        Ok(())
    }

    #[test]
    fn a_refused_connection_is_recognised() {
        let error = anyhow::anyhow!("FATAL: sorry, too many clients already");
        assert!(super::is_too_many_clients(&error));
        assert!(!super::is_too_many_clients(&anyhow::anyhow!(
            "connection refused"
        )));
    }
}
