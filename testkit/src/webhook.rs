//! A webhook receiver that verifies signatures with an independent implementation of the
//! Standard Webhooks specification: the project's Python package (`standardwebhooks` from
//! PyPI), installed into a virtual environment under the target directory the first time
//! (idempotently, and safely when several test binaries start at once), running
//! `support/webhook_receiver.py` (its docstring lists the behaviours a path selects).
//!
//! [`Receiver::start`] spawns it; [`Receiver::log`] returns every POST it received, with
//! whether its signature verified. The process is killed on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context;

/// The verifier's version: the package is installed once per target directory.
pub const VERIFIER: &str = "standardwebhooks==1.1.0";

/// A Python interpreter with the verifier installed.
pub fn python() -> anyhow::Result<PathBuf> {
    crate::python::venv("standardwebhooks-venv", &[VERIFIER])
}

/// The verifying receiver process; killed on drop.
#[derive(Debug)]
pub struct Receiver {
    child: Child,
    port: u16,
    base: String,
}

impl Receiver {
    /// Starts a receiver that accepts only deliveries signed with `secret` (`whsec_…`).
    pub fn start(secret: &str) -> anyhow::Result<Self> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("support/webhook_receiver.py");
        let mut child = Command::new(python()?)
            .arg(script)
            .arg(secret)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().context("receiver stdout")?;
        let mut port = String::new();
        BufReader::new(stdout).read_line(&mut port)?;
        let port: u16 = port
            .trim()
            .parse()
            .context("receiver did not print its port")?;
        Ok(Self {
            child,
            port,
            base: format!("http://127.0.0.1:{port}"),
        })
    }

    /// The port it listens on (127.0.0.1), for URLs that spell the host otherwise.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `path` (with its query) on this receiver.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Every POST received so far, in order: `{path, id, timestamp, verified, body,
    /// received_at}` (`received_at` in Unix seconds).
    pub async fn log(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        Ok(reqwest::get(self.url("/log")).await?.json().await?)
    }

    /// The POSTs received on `path` (without the query).
    pub async fn log_of(&self, path: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let log = self.log().await?;
        Ok(log.into_iter().filter(|e| e["path"] == path).collect())
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
