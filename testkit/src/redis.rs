//! Redis for tests: the shared server's URL, a key prefix per test (so tests share one Redis
//! and rerun cleanly) and its cleanup, and [`OwnRedis`], a `redis-server` of a test's own for
//! the tests that stop Redis (the shared one is never stopped).

use std::time::Duration;

use anyhow::Context;
use shoal::redis::RedisClient;
use tokio::process::{Child, Command};

use crate::wait::{DEADLINE, wait_until};

/// The Redis tests share, unless `SHOAL_TEST_REDIS_URL` names another.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// Keys deleted per `DEL` by [`delete_prefixed`].
const DELETE_CHUNK: usize = 500;

/// `SHOAL_TEST_REDIS_URL`, or [`DEFAULT_REDIS_URL`].
pub fn redis_url() -> String {
    std::env::var("SHOAL_TEST_REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.to_owned())
}

/// A key prefix no other test uses: `shoal-test:<uuid>`.
pub fn unique_prefix() -> String {
    format!("shoal-test:{}", uuid::Uuid::now_v7().simple())
}

/// Deletes every key under `client`'s prefix (best effort).
pub async fn delete_prefixed(client: &RedisClient) {
    let mut keys = redis::cmd("KEYS");
    keys.arg(format!("{}:*", client.prefix()));
    let Ok(keys) = client.command::<Vec<String>>("keys", &keys).await else {
        return;
    };
    for chunk in keys.chunks(DELETE_CHUNK) {
        let mut del = redis::cmd("DEL");
        del.arg(chunk);
        let _ = client.command::<i64>("del", &del).await;
    }
}

/// A `redis-server` of this test's own on a free port, restartable on the same port (empty:
/// nothing is saved), killed when dropped.
#[derive(Debug)]
pub struct OwnRedis {
    port: u16,
    child: Option<Child>,
}

impl OwnRedis {
    /// Starts it and waits until it accepts connections.
    pub async fn start() -> anyhow::Result<Self> {
        let mut server = Self {
            port: crate::free_port()?,
            child: None,
        };
        server.restart().await?;
        Ok(server)
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server again on its port (after [`OwnRedis::kill`]) and waits until it
    /// accepts connections.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting redis-server")?;
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        wait_until(DEADLINE, "redis-server accepts connections", || async {
            Ok(tokio::net::TcpStream::connect(&addr).await.is_ok())
        })
        .await?;
        Ok(())
    }

    /// SIGKILL, and waits until it is gone.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.start_kill()?;
            tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .context("redis-server did not exit after SIGKILL")??;
        }
        Ok(())
    }
}
