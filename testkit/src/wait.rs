//! Waiting for a condition under a deadline, instead of sleeping for a guessed time.

use std::future::Future;
use std::time::Duration;

use anyhow::bail;
use tokio::time::Instant;

/// A generous bound for anything a test waits for (the drill measures timing; the tests only
/// check that it happens).
pub const DEADLINE: Duration = Duration::from_secs(30);

/// How often [`wait_until`] re-checks its condition.
pub const POLL: Duration = Duration::from_millis(20);

/// Re-checks `condition` every [`POLL`] until it returns `Ok(true)`; returns the time it
/// took. An `Err` counts as "not yet" (a server still starting, a killed one not answering)
/// and is reported if `deadline` passes.
pub async fn wait_until<F, Fut>(
    deadline: Duration,
    what: &str,
    mut condition: F,
) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let started = Instant::now();
    let mut last_error = None;
    loop {
        match condition().await {
            Ok(true) => return Ok(started.elapsed()),
            Ok(false) => {}
            Err(error) => last_error = Some(error),
        }
        if started.elapsed() > deadline {
            match last_error {
                Some(error) => {
                    bail!("timed out after {deadline:?} waiting until {what}: {error:#}")
                }
                None => bail!("timed out after {deadline:?} waiting until {what}"),
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn returns_once_the_condition_holds_and_reports_the_last_error_on_timeout() {
        let mut calls = 0;
        let took = wait_until(DEADLINE, "the third call", || {
            calls += 1;
            let done = calls >= 3;
            async move { Ok(done) }
        })
        .await;
        assert_eq!(took.ok(), Some(POLL * 2));

        let error = wait_until(Duration::from_secs(1), "never", || async {
            anyhow::Result::<bool>::Err(anyhow::anyhow!("still starting"))
        })
        .await
        .expect_err("times out");
        let message = format!("{error:#}");
        assert!(
            message.contains("waiting until never: still starting"),
            "{message}"
        );
    }
}
