//! A real browser for tests: headless Chromium driven over WebDriver (Debian's `chromium`
//! and `chromium-driver`, installed with `apt-get` the first time if missing, idempotently
//! and safely when several test binaries start at once).
//!
//! The WebDriver protocol is a handful of JSON requests (new session, navigate, execute a
//! script, delete the session), spoken here with reqwest; what is under test is the
//! browser's own behaviour (e.g. its `EventSource`), not the driver. [`Browser`] kills
//! its `chromedriver` (and so its Chromium) on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// Installs `chromium` and `chromium-driver` unless both are there.
pub fn install() -> anyhow::Result<()> {
    if Path::new(CHROMEDRIVER).exists() && Path::new(CHROMIUM).exists() {
        return Ok(());
    }
    let lock = std::env::temp_dir().join("shoal-testkit-chromium.lock");
    let deadline = Instant::now() + Duration::from_secs(900);
    while std::fs::create_dir(&lock).is_err() {
        if Path::new(CHROMEDRIVER).exists() && Path::new(CHROMIUM).exists() {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "another test holds {lock:?} for too long; remove it if no test runs"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let result = (|| {
        if !Path::new(CHROMEDRIVER).exists() || !Path::new(CHROMIUM).exists() {
            for args in [
                vec!["update", "-q"],
                vec!["install", "-y", "-q", "chromium", "chromium-driver"],
            ] {
                let output = Command::new("apt-get")
                    .args(&args)
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .output()
                    .context("running apt-get")?;
                anyhow::ensure!(
                    output.status.success(),
                    "apt-get {args:?} failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
        anyhow::Ok(())
    })();
    let _ = std::fs::remove_dir(&lock);
    result
}

/// A headless Chromium session; the driver process is killed on drop.
#[derive(Debug)]
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
    _profile: PathBuf,
}

impl Browser {
    /// Installs Chromium if needed, starts `chromedriver` and opens a headless session.
    pub async fn start() -> anyhow::Result<Self> {
        tokio::task::spawn_blocking(install).await??;
        let port = crate::free_port()?;
        let profile = std::env::temp_dir().join(format!("shoal-chromium-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&profile)?;
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromedriver")?;
        let http = reqwest::Client::builder().no_proxy().build()?;
        let base = format!("http://127.0.0.1:{port}");
        let mut browser = Self {
            driver,
            base,
            session: String::new(),
            http,
            _profile: profile.clone(),
        };
        browser.await_driver().await?;
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", format!("--user-data-dir={}", profile.display())],
            },
        }}});
        let created = browser.call("POST", "/session", capabilities).await?;
        browser.session = created["sessionId"]
            .as_str()
            .with_context(|| format!("no session id in {created}"))?
            .to_owned();
        Ok(browser)
    }

    async fn await_driver(&self) -> anyhow::Result<()> {
        let until = Instant::now() + crate::DEADLINE;
        loop {
            if let Ok(response) = self.http.get(format!("{}/status", self.base)).send().await
                && let Ok(status) = response.json::<Value>().await
                && status["value"]["ready"] == json!(true)
            {
                return Ok(());
            }
            if Instant::now() > until {
                bail!(
                    "chromedriver did not get ready within {:?}",
                    crate::DEADLINE
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn call(&self, method: &str, path: &str, body: Value) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let request = match method {
            "POST" => self.http.post(url).json(&body),
            "DELETE" => self.http.delete(url),
            _ => self.http.get(url),
        };
        let answer: Value = request.send().await?.json().await?;
        if answer["value"]["error"].is_string() {
            bail!("webdriver {method} {path}: {}", answer["value"]);
        }
        Ok(answer["value"].clone())
    }

    /// Navigates to `url`.
    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        let path = format!("/session/{}/url", self.session);
        self.call("POST", &path, json!({"url": url})).await?;
        Ok(())
    }

    /// Runs `script` (a function body; `return` gives the result) in the page.
    pub async fn execute(&self, script: &str) -> anyhow::Result<Value> {
        let path = format!("/session/{}/execute/sync", self.session);
        self.call("POST", &path, json!({"script": script, "args": []}))
            .await
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
