//! The example application as its users run it: the `reminders` binary (a runner and a
//! gateway in one process) against a database of its own; a reminder set over HTTP is
//! delivered by the job system when due, and a second `set` of the same id is refused.

use std::time::Duration;

use anyhow::{Context, ensure};
use serde_json::{Value, json};
use shoal_testkit::process::shoal_command;
use shoal_testkit::{ChildProcess, DEADLINE, TestDb, free_port, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reminder_is_delivered_by_a_job_when_due() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let dir = std::env::temp_dir().join(format!("shoal-reminders-{}", db.name));
    std::fs::create_dir_all(&dir)?;
    let port = free_port()?;
    let mut command = shoal_command(env!("CARGO_BIN_EXE_reminders"), &dir);
    command
        // The `shoal` binary's diagnostic types are not this application's.
        .env_remove("SHOAL__DIAGNOSTICS__ENABLED")
        .env("SHOAL__DATABASE__URL", &db.url)
        .env("SHOAL__CLUSTER__NAME", "reminders")
        .env("SHOAL__CLUSTER__SHARDS_PER_GROUP", "4")
        .env("SHOAL__RUNNER__LISTEN", "127.0.0.1:0")
        .env("SHOAL__GATEWAY__LISTEN", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn");
    let mut process = ChildProcess::spawn("reminders", &mut command, dir.join("reminders.log"))?;
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    process
        .await_ready(DEADLINE, "ready", || async {
            let ready = http.get(format!("{base}/ready")).send().await?;
            Ok(ready.status().is_success())
        })
        .await
        .with_context(|| process.log_tail(40))?;

    let set = http
        .put(format!("{base}/reminders/standup"))
        .json(&json!({"text": "stand up", "after_ms": 300}))
        .send()
        .await?;
    ensure!(set.status() == 200, "{}", set.text().await?);
    let set: Value = set.json().await?;
    ensure!(
        set["job"].is_string(),
        "the delivery job is enqueued: {set}"
    );

    let again = http
        .put(format!("{base}/reminders/standup"))
        .json(&json!({"text": "again"}))
        .send()
        .await?;
    ensure!(again.status().is_client_error(), "set once only");

    let bad = http
        .put(format!("{base}/reminders/x"))
        .json(&json!({"text": ""}))
        .send()
        .await?;
    ensure!(bad.status() == 400, "an empty text is a 400");

    let last = std::sync::Mutex::new(Value::Null);
    wait_until(DEADLINE, "the reminder is delivered", || async {
        let view: Value = http
            .get(format!("{base}/reminders/standup"))
            .send()
            .await?
            .json()
            .await?;
        let done = view["status"] == "succeeded";
        *last.lock().unwrap_or_else(|e| e.into_inner()) = view;
        Ok(done)
    })
    .await
    .with_context(|| format!("{:?}; {}", last.lock(), process.log_tail(40)))?;
    let view = last.into_inner().unwrap_or_else(|e| e.into_inner());
    ensure!(
        view["delivered"]["message"] == "Reminder standup: stand up",
        "{view}"
    );
    process.terminate()?;
    let status = process.wait_exit(Duration::from_secs(20)).await?;
    ensure!(status.success(), "stops cleanly: {status}");
    Ok(())
}
