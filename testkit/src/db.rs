//! A fresh PostgreSQL database per test, so tests run in parallel and rerun cleanly.
//!
//! [`TestDb`] creates `shoal_t_<uuid>` (or another prefix) on the server of
//! `SHOAL_TEST_DATABASE_URL` and drops it `WITH (FORCE)` when dropped, even when the test
//! panicked and connections to it are still open.

use std::time::Duration;

use anyhow::Context;
use sqlx::{Connection, PgConnection};

/// The server tests create their databases on, unless `SHOAL_TEST_DATABASE_URL` names one.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// How long connecting to the server may take (a machine without Postgres fails fast).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A fresh database, dropped (best effort, `WITH (FORCE)`) when this is dropped.
#[derive(Debug)]
pub struct TestDb {
    /// URL of the fresh database.
    pub url: String,
    /// Its name.
    pub name: String,
    admin_url: String,
}

/// `SHOAL_TEST_DATABASE_URL`, or [`DEFAULT_DATABASE_URL`].
pub fn server_url() -> String {
    std::env::var("SHOAL_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

impl TestDb {
    /// An empty `shoal_t_<uuid>` (no schema: for tests that migrate it themselves, with
    /// `shoal migrate` or the command under test).
    pub async fn create() -> anyhow::Result<Self> {
        Self::create_named("shoal_t").await
    }

    /// A fresh `shoal_t_<uuid>` with Shoal's schema ([`shoal::MIGRATOR`]).
    pub async fn migrated() -> anyhow::Result<Self> {
        let db = Self::create().await?;
        db.migrate().await?;
        Ok(db)
    }

    /// An empty `<prefix>_<uuid>` (benches use their own prefix, so leftovers are told
    /// apart).
    pub async fn create_named(prefix: &str) -> anyhow::Result<Self> {
        let admin_url = server_url();
        crate::connections::start_sampler(&admin_url);
        let name = format!("{prefix}_{}", uuid::Uuid::now_v7().simple());
        let mut admin = match connect(&admin_url).await {
            Ok(admin) => admin,
            Err(error) if crate::connections::is_too_many_clients(&error) => {
                let usage = crate::connections::latest().map_or_else(
                    || "no sample of who holds them".to_owned(),
                    |u| u.describe(),
                );
                return Err(error.context(format!(
                    "out of PostgreSQL connections, not a bug in the test: {usage}"
                )));
            }
            Err(error) => {
                return Err(error.context(
                    "set SHOAL_TEST_DATABASE_URL to a server tests may create databases on",
                ));
            }
        };
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .with_context(|| format!("creating database {name}"))?;
        let _ = admin.close().await;
        Ok(Self {
            url: shoal::runner_storage::postgres::url_with_database(&admin_url, &name)?,
            name,
            admin_url,
        })
    }

    /// Applies Shoal's migrations.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        let mut conn = connect(&self.url).await?;
        shoal::MIGRATOR
            .run(&mut conn)
            .await
            .with_context(|| format!("migrating {}", self.name))?;
        let _ = conn.close().await;
        Ok(())
    }
}

async fn connect(url: &str) -> anyhow::Result<PgConnection> {
    tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect(url))
        .await
        .with_context(|| format!("no answer from {url} within {CONNECT_TIMEOUT:?}"))?
        .with_context(|| format!("connecting to {url}"))
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // `drop` cannot await; a thread with its own runtime drops the database, so it goes
        // away even when the test panicked.
        let admin_url = self.admin_url.clone();
        let statement = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let dropper = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if let Ok(mut admin) = PgConnection::connect(&admin_url).await {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                        .execute(&mut admin)
                        .await;
                    let _ = admin.close().await;
                }
            });
        });
        let _ = dropper.join();
    }
}
