//! Runner storage on PostgreSQL advisory locks.
//!
//! Lock keys use the two-`int4` form `(namespace, n)`, which can never collide with sqlx's
//! migration lock (a single `bigint` key). Shard locks are `(shard_namespace, shard)`;
//! liveness locks are `(runner_namespace, runner_id)`. Both namespaces are derived from the
//! cluster name, so two clusters can share one database.
//!
//! The dedicated session is a `PgConnection` opened outside the pool (a pool recycles
//! connections and would silently drop session locks). It sets server-side TCP keepalives and
//! `tcp_user_timeout`, so the server frees the locks of a silent peer within seconds, and
//! turns off every timeout that could end the session on its own.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Row};
use xxhash_rust::xxh3::xxh3_64;

use super::{
    ClusterSnapshot, LockSession, ProgressMark, RunnerInfo, RunnerProgress, RunnerRegistration,
    RunnerStatus, RunnerStorage, StorageError,
};
use crate::ids::{ClusterName, Epoch, RunnerId, ShardId};

/// Server-side settings of the dedicated lock session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockSessionSettings {
    /// `tcp_keepalives_idle`.
    pub keepalive_idle: Duration,
    /// `tcp_keepalives_interval`.
    pub keepalive_interval: Duration,
    /// `tcp_keepalives_count`.
    pub keepalive_count: u32,
}

impl Default for LockSessionSettings {
    fn default() -> Self {
        Self {
            keepalive_idle: Duration::from_secs(3),
            keepalive_interval: Duration::from_secs(1),
            keepalive_count: 3,
        }
    }
}

impl LockSessionSettings {
    fn startup_options(&self) -> Vec<(&'static str, String)> {
        let user_timeout = self.keepalive_idle + self.keepalive_interval * self.keepalive_count;
        vec![
            ("tcp_keepalives_idle", secs(self.keepalive_idle)),
            ("tcp_keepalives_interval", secs(self.keepalive_interval)),
            ("tcp_keepalives_count", self.keepalive_count.to_string()),
            ("tcp_user_timeout", user_timeout.as_millis().to_string()),
            // Any of these would end the session by itself and silently free its locks.
            ("idle_session_timeout", "0".to_owned()),
            ("idle_in_transaction_session_timeout", "0".to_owned()),
            ("statement_timeout", "0".to_owned()),
            ("lock_timeout", "0".to_owned()),
            // A watcher blocked in a lock wait notices its client has gone within a second
            // instead of waiting for the lock (see `await_gone`).
            ("client_connection_check_interval", "1000".to_owned()),
        ]
    }
}

/// Names a process's sessions in `pg_stat_activity`, so that ending a hung runner can end
/// every session of its process (a pool connection frozen inside a completion would
/// otherwise hold its shard rows `FOR SHARE` and stall the new owner's epoch bump).
///
/// The lock session is `shoal-locks:<tag>:<cluster>`, the runner's pools `shoal-runner:<tag>`
/// and peer watchers `shoal-watch:<tag>:<cluster>` (each cut to Postgres' 63 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessTag(String);

impl ProcessTag {
    /// A fresh random tag (12 hex digits).
    pub fn random() -> Self {
        Self(format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff))
    }

    /// The application name of this process's pool connections.
    pub fn pool_application_name(&self) -> String {
        format!("shoal-runner:{}", self.0)
    }

    fn session_name(&self, kind: &str, cluster: &ClusterName) -> String {
        let mut name = format!("shoal-{kind}:{}:{cluster}", self.0);
        if name.len() > 63 {
            let mut cut = 63;
            while !name.is_char_boundary(cut) {
                cut -= 1;
            }
            name.truncate(cut);
        }
        name
    }
}

fn secs(d: Duration) -> String {
    d.as_secs().max(1).to_string()
}

/// The advisory-lock namespaces of one cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockNamespaces {
    /// First key half of shard locks.
    pub shards: i32,
    /// First key half of liveness locks.
    pub runners: i32,
}

impl LockNamespaces {
    /// Derives the namespaces from the cluster name (non-negative, so `pg_locks.classid`
    /// compares directly).
    pub fn for_cluster(cluster: &ClusterName) -> Self {
        let derive = |what: &str| {
            let hash = xxh3_64(format!("shoal:{what}:{cluster}").as_bytes());
            (hash & 0x7fff_ffff) as i32
        };
        let shards = derive("shards");
        let mut runners = derive("runners");
        if runners == shards {
            runners ^= 1;
        }
        Self { shards, runners }
    }
}

fn unavailable(error: sqlx::Error) -> StorageError {
    match &error {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => {
            StorageError::SchemaMissing(db.message().to_owned())
        }
        // The session broke or the server refuses sessions for now (connection exceptions,
        // administrator shutdown/termination, crash recovery, too many connections): the
        // same call may succeed later on a new session, as the memory backend reports too.
        sqlx::Error::Database(db)
            if db
                .code()
                .is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c == "53300") =>
        {
            StorageError::Unavailable(format!(
                "{} (SQLSTATE {})",
                db.message(),
                db.code().as_deref().unwrap_or("?")
            ))
        }
        sqlx::Error::Database(db) => StorageError::Other(format!(
            "{} (SQLSTATE {})",
            db.message(),
            db.code().as_deref().unwrap_or("?")
        )),
        _ => StorageError::Unavailable(error.to_string()),
    }
}

/// Runner storage backed by PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgRunnerStorage {
    pool: PgPool,
    connect: PgConnectOptions,
    cluster: ClusterName,
    namespaces: LockNamespaces,
    settings: LockSessionSettings,
    tag: ProcessTag,
}

impl PgRunnerStorage {
    /// Storage for `cluster` using `pool` for shared queries and `url` for dedicated
    /// sessions.
    pub fn new(
        pool: PgPool,
        url: &str,
        cluster: ClusterName,
        settings: LockSessionSettings,
    ) -> Result<Self, StorageError> {
        let connect = PgConnectOptions::from_str(url)
            .map_err(|e| StorageError::Other(format!("invalid database url: {e}")))?;
        Ok(Self {
            pool,
            connect,
            namespaces: LockNamespaces::for_cluster(&cluster),
            cluster,
            settings,
            tag: ProcessTag::random(),
        })
    }

    /// Names this process's sessions with `tag` (the one its pools are named with, see
    /// [`connect_pool_named`]).
    pub fn with_process_tag(mut self, tag: ProcessTag) -> Self {
        self.tag = tag;
        self
    }

    /// The lock namespaces in use.
    pub fn namespaces(&self) -> LockNamespaces {
        self.namespaces
    }

    /// [`RunnerStorage::register`] with the concrete session type, whose
    /// [`PgLockSession::show`] lets tests check the session's server settings.
    pub async fn register_pg(
        &self,
        registration: &RunnerRegistration,
    ) -> Result<PgLockSession, StorageError> {
        let mut conn = self.open_session().await?;
        let id: i32 = sqlx::query_scalar(
            "INSERT INTO shoal_runners (cluster, address, version) VALUES ($1, $2, $3)
             RETURNING id",
        )
        .bind(self.cluster.as_str())
        .bind(&registration.address)
        .bind(&registration.version)
        .fetch_one(&mut conn)
        .await
        .map_err(unavailable)?;
        let runner_id = RunnerId::new(id).map_err(|e| StorageError::Other(e.to_string()))?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
            .bind(self.namespaces.runners)
            .bind(id)
            .fetch_one(&mut conn)
            .await
            .map_err(unavailable)?;
        if !locked {
            return Err(StorageError::AlreadyRegistered(runner_id));
        }
        Ok(PgLockSession {
            conn,
            runner_id,
            cluster: self.cluster.clone(),
            namespaces: self.namespaces,
        })
    }

    async fn open_session(&self) -> Result<PgConnection, StorageError> {
        self.open_dedicated("locks").await
    }

    async fn open_dedicated(&self, kind: &str) -> Result<PgConnection, StorageError> {
        let options = self
            .connect
            .clone()
            .application_name(&self.tag.session_name(kind, &self.cluster))
            .options(self.settings.startup_options());
        PgConnection::connect_with(&options)
            .await
            .map_err(unavailable)
    }
}

/// `url` naming `database` instead (user, host, port and parameters kept): how tests,
/// benches and drills reach a database of their own on the same server.
pub fn url_with_database(url: &str, database: &str) -> Result<String, StorageError> {
    let mut parsed = reqwest::Url::parse(url)
        .map_err(|e| StorageError::Other(format!("database url does not parse: {e}")))?;
    parsed.set_path(&format!("/{database}"));
    Ok(parsed.into())
}

/// Connects a pool with sensible timeouts.
pub async fn connect_pool(
    url: &str,
    max_connections: u32,
    connect_timeout: Duration,
) -> Result<PgPool, StorageError> {
    connect_pool_named(url, max_connections, connect_timeout, "shoal").await
}

/// [`connect_pool`] with the connections' `application_name` (a runner names its pools
/// after its [`ProcessTag`]).
pub async fn connect_pool_named(
    url: &str,
    max_connections: u32,
    connect_timeout: Duration,
    application_name: &str,
) -> Result<PgPool, StorageError> {
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| StorageError::Other(format!("invalid database url: {e}")))?
        .application_name(application_name);
    // One direct connection first, so a wrong URL reports its real cause (refused, unknown
    // database, bad password) instead of the pool's generic time-out.
    let probe = tokio::time::timeout(connect_timeout, PgConnection::connect_with(&options))
        .await
        .map_err(|_| StorageError::Unavailable(format!("no answer within {connect_timeout:?}")))?
        .map_err(unavailable)?;
    let _ = probe.close().await;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(connect_timeout)
        .connect_with(options)
        .await
        .map_err(unavailable)
}

const LIVE_LOCKS: &str = "
    SELECT l.pid, l.classid::int8 AS k1, l.objid::int8 AS k2
      FROM pg_locks l
     WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND l.granted
       AND l.mode = 'ExclusiveLock'
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())";

/// A lock session's progress mark: the microsecond of its last state change.
const MARK: &str =
    "(extract(epoch FROM coalesce(a.state_change, a.backend_start)) * 1000000)::int8";

#[async_trait]
impl RunnerStorage for PgRunnerStorage {
    async fn ensure_cluster(&self, shards_per_group: u32) -> Result<(), StorageError> {
        let configured = i32::try_from(shards_per_group)
            .map_err(|_| StorageError::Other("shards-per-group too large".to_owned()))?;
        sqlx::query(
            "INSERT INTO shoal_clusters (name, shards_per_group) VALUES ($1, $2)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(self.cluster.as_str())
        .bind(configured)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        let stored: i32 =
            sqlx::query_scalar("SELECT shards_per_group FROM shoal_clusters WHERE name = $1")
                .bind(self.cluster.as_str())
                .fetch_one(&self.pool)
                .await
                .map_err(unavailable)?;
        if stored != configured {
            return Err(StorageError::ShardCountMismatch {
                cluster: self.cluster.clone(),
                stored: stored.max(0) as u32,
                configured: shards_per_group,
            });
        }
        Ok(())
    }

    async fn register(
        &self,
        registration: &RunnerRegistration,
    ) -> Result<Box<dyn LockSession>, StorageError> {
        Ok(Box::new(self.register_pg(registration).await?))
    }

    async fn live_runners(&self) -> Result<Vec<RunnerInfo>, StorageError> {
        let query = format!(
            "WITH locks AS ({LIVE_LOCKS})
             SELECT r.id, r.address, r.started_at FROM shoal_runners r
              WHERE r.cluster = $1
                AND EXISTS (SELECT 1 FROM locks WHERE k1 = $2 AND k2 = r.id)
              ORDER BY r.id"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(query))
            .bind(self.cluster.as_str())
            .bind(i64::from(self.namespaces.runners))
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        rows.into_iter()
            .map(|row| {
                Ok(RunnerInfo {
                    id: runner_id(row.try_get("id").map_err(unavailable)?)?,
                    address: row.try_get("address").map_err(unavailable)?,
                    started_at: row.try_get("started_at").map_err(unavailable)?,
                })
            })
            .collect()
    }

    async fn snapshot(&self) -> Result<ClusterSnapshot, StorageError> {
        // One statement, so runners, locks and epochs are read from one snapshot of pg_locks.
        let query = format!(
            "WITH locks AS ({LIVE_LOCKS}),
                  live AS (SELECT k2 AS runner_id, pid FROM locks WHERE k1 = $2),
                  owned AS (SELECT s.k2 AS shard, live.runner_id
                              FROM locks s JOIN live ON live.pid = s.pid WHERE s.k1 = $3)
             SELECT 'runner' AS kind, r.id::int8 AS a, (live.pid IS NOT NULL) AS alive,
                    (SELECT count(*) FROM owned o WHERE o.runner_id = r.id) AS b,
                    r.address, r.started_at
               FROM shoal_runners r LEFT JOIN live ON live.runner_id = r.id
              WHERE r.cluster = $1
             UNION ALL
             SELECT 'owner', shard, true, runner_id, NULL, NULL FROM owned
             UNION ALL
             SELECT 'epoch', shard::int8, true, epoch, NULL, NULL
               FROM shoal_shards WHERE cluster = $1"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(query))
            .bind(self.cluster.as_str())
            .bind(i64::from(self.namespaces.runners))
            .bind(i64::from(self.namespaces.shards))
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        let mut snapshot = ClusterSnapshot::default();
        for row in rows {
            let kind: String = row.try_get("kind").map_err(unavailable)?;
            let a: i64 = row.try_get("a").map_err(unavailable)?;
            let b: i64 = row.try_get("b").map_err(unavailable)?;
            match kind.as_str() {
                "runner" => snapshot.runners.push(RunnerStatus {
                    id: runner_id(a as i32)?,
                    address: row.try_get("address").map_err(unavailable)?,
                    alive: row.try_get("alive").map_err(unavailable)?,
                    shards: b.max(0) as usize,
                    started_at: row
                        .try_get::<Option<DateTime<Utc>>, _>("started_at")
                        .map_err(unavailable)?
                        .unwrap_or_default(),
                }),
                "owner" => {
                    snapshot
                        .owners
                        .insert(ShardId::new(a as u32), runner_id(b as i32)?);
                }
                _ => {
                    snapshot
                        .epochs
                        .insert(ShardId::new(a as u32), Epoch::new(b));
                }
            }
        }
        snapshot.runners.sort_by_key(|r| r.id);
        Ok(snapshot)
    }

    async fn prune_dead(&self, older_than: DateTime<Utc>) -> Result<u64, StorageError> {
        let query = format!(
            "WITH locks AS ({LIVE_LOCKS})
             DELETE FROM shoal_runners r
              WHERE r.cluster = $1 AND r.started_at < $3
                AND NOT EXISTS (SELECT 1 FROM locks WHERE k1 = $2 AND k2 = r.id)"
        );
        let result = sqlx::query(sqlx::AssertSqlSafe(query))
            .bind(self.cluster.as_str())
            .bind(i64::from(self.namespaces.runners))
            .bind(older_than)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(result.rows_affected())
    }

    async fn progress(&self) -> Result<Vec<RunnerProgress>, StorageError> {
        let query = format!(
            "WITH locks AS ({LIVE_LOCKS})
             SELECT l.k2::int4 AS id, {MARK} AS mark
               FROM locks l JOIN pg_stat_activity a ON a.pid = l.pid
              WHERE l.k1 = $1
              ORDER BY l.k2"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(query))
            .bind(i64::from(self.namespaces.runners))
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        rows.into_iter()
            .map(|row| {
                Ok(RunnerProgress {
                    id: runner_id(row.try_get("id").map_err(unavailable)?)?,
                    mark: ProgressMark(row.try_get("mark").map_err(unavailable)?),
                })
            })
            .collect()
    }

    async fn end_hung(&self, runner: RunnerId, mark: ProgressMark) -> Result<bool, StorageError> {
        // The lock session, only if it still shows the same mark, and every session of its
        // process (named after the same tag).
        let query = format!(
            "WITH locks AS ({LIVE_LOCKS}),
                  target AS (
                    SELECT a.pid, split_part(a.application_name, ':', 2) AS tag
                      FROM locks l JOIN pg_stat_activity a ON a.pid = l.pid
                     WHERE l.k1 = $1 AND l.k2 = $2 AND {MARK} = $3),
                  victims AS (
                    SELECT t.pid FROM target t
                    UNION
                    SELECT b.pid FROM pg_stat_activity b JOIN target t
                        ON t.tag <> '' AND b.application_name = 'shoal-runner:' || t.tag)
             SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) AS ended FROM victims"
        );
        let ended: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(query))
            .bind(i64::from(self.namespaces.runners))
            .bind(i64::from(runner.get()))
            .bind(mark.0)
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(ended > 0)
    }

    async fn await_gone(&self, runner: RunnerId) -> Result<(), StorageError> {
        let mut conn = self.open_dedicated("watch").await?;
        // Shared mode: the runner holds its liveness lock exclusively, and live-runner reads
        // count only exclusive holders, so this wait never makes anyone look alive.
        sqlx::query("SELECT pg_advisory_lock_shared($1, $2)")
            .bind(self.namespaces.runners)
            .bind(runner.get())
            .execute(&mut conn)
            .await
            .map_err(unavailable)?;
        let _ = conn.close().await;
        Ok(())
    }
}

fn runner_id(id: i32) -> Result<RunnerId, StorageError> {
    RunnerId::new(id).map_err(|e| StorageError::Other(e.to_string()))
}

fn lock_keys(shards: &[ShardId]) -> Vec<i32> {
    shards.iter().map(|s| s.lock_key()).collect()
}

/// A runner's dedicated Postgres session.
#[derive(Debug)]
pub struct PgLockSession {
    conn: PgConnection,
    runner_id: RunnerId,
    cluster: ClusterName,
    namespaces: LockNamespaces,
}

impl PgLockSession {
    /// Reads a server setting as this session sees it (used to check the session's
    /// keepalive settings in tests).
    pub async fn show(&mut self, setting: &'static str) -> Result<String, StorageError> {
        let query = format!("SELECT current_setting('{setting}')");
        sqlx::query_scalar(sqlx::AssertSqlSafe(query))
            .fetch_one(&mut self.conn)
            .await
            .map_err(unavailable)
    }
}

#[async_trait]
impl LockSession for PgLockSession {
    fn runner_id(&self) -> RunnerId {
        self.runner_id
    }

    async fn try_acquire(
        &mut self,
        shards: &[ShardId],
    ) -> Result<Vec<(ShardId, Epoch)>, StorageError> {
        if shards.is_empty() {
            return Ok(Vec::new());
        }
        let locked: Vec<i32> = sqlx::query_scalar(
            "SELECT s FROM unnest($2::int4[]) AS s WHERE pg_try_advisory_lock($1, s)",
        )
        .bind(self.namespaces.shards)
        .bind(lock_keys(shards))
        .fetch_all(&mut self.conn)
        .await
        .map_err(unavailable)?;
        if locked.is_empty() {
            return Ok(Vec::new());
        }
        // The bump runs on the lock session after the lock is held: an in-flight completion
        // of the previous owner holds the shard row FOR SHARE, so this waits for it.
        let rows = sqlx::query(
            "INSERT INTO shoal_shards (cluster, shard, epoch, runner_id)
             SELECT $1, s, 1, $2 FROM unnest($3::int4[]) AS s
             ON CONFLICT (cluster, shard) DO UPDATE
                SET epoch = shoal_shards.epoch + 1, runner_id = EXCLUDED.runner_id,
                    acquired_at = now()
             RETURNING shard, epoch",
        )
        .bind(self.cluster.as_str())
        .bind(self.runner_id.get())
        .bind(&locked)
        .fetch_all(&mut self.conn)
        .await
        .map_err(unavailable)?;
        let mut acquired = rows
            .into_iter()
            .map(|row| {
                let shard: i32 = row.try_get("shard").map_err(unavailable)?;
                let epoch: i64 = row.try_get("epoch").map_err(unavailable)?;
                Ok((ShardId::new(shard as u32), Epoch::new(epoch)))
            })
            .collect::<Result<Vec<_>, StorageError>>()?;
        acquired.sort();
        Ok(acquired)
    }

    async fn release(&mut self, shards: &[ShardId]) -> Result<(), StorageError> {
        if shards.is_empty() {
            return Ok(());
        }
        sqlx::query("SELECT pg_advisory_unlock($1, s) FROM unnest($2::int4[]) AS s")
            .bind(self.namespaces.shards)
            .bind(lock_keys(shards))
            .execute(&mut self.conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn confirm(&mut self, held: usize) -> Result<bool, StorageError> {
        let row = sqlx::query(
            "SELECT count(*) FILTER (WHERE classid::int8 = $1) AS shards,
                    count(*) FILTER (WHERE classid::int8 = $2 AND objid::int8 = $3) AS me
               FROM pg_locks
              WHERE pid = pg_backend_pid() AND locktype = 'advisory' AND objsubid = 2
                AND granted",
        )
        .bind(i64::from(self.namespaces.shards))
        .bind(i64::from(self.namespaces.runners))
        .bind(i64::from(self.runner_id.get()))
        .fetch_one(&mut self.conn)
        .await
        .map_err(unavailable)?;
        let shards: i64 = row.try_get("shards").map_err(unavailable)?;
        let me: i64 = row.try_get("me").map_err(unavailable)?;
        Ok(me == 1 && shards == held as i64)
    }

    async fn close(mut self: Box<Self>) -> Result<(), StorageError> {
        sqlx::query("DELETE FROM shoal_runners WHERE id = $1")
            .bind(self.runner_id.get())
            .execute(&mut self.conn)
            .await
            .map_err(unavailable)?;
        sqlx::query("SELECT pg_advisory_unlock_all()")
            .execute(&mut self.conn)
            .await
            .map_err(unavailable)?;
        self.conn.close().await.map_err(unavailable)
    }
}

#[cfg(test)]
mod url_tests {
    use super::url_with_database;

    #[test]
    fn another_database_keeps_everything_else() {
        let url = "postgres://postgres:pw@127.0.0.1:5432/postgres?sslmode=disable";
        assert_eq!(
            url_with_database(url, "shoal_t1").expect("parses"),
            "postgres://postgres:pw@127.0.0.1:5432/shoal_t1?sslmode=disable"
        );
        assert_eq!(
            url_with_database("postgres://db.internal", "x").expect("parses"),
            "postgres://db.internal/x"
        );
        assert!(url_with_database("not a url", "x").is_err());
    }
}
