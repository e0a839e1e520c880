//! The drill's load: persisted `counter increment`s at a fixed rate through the gateway,
//! each with its own idempotency key, retried with the same key on a retryable error as a
//! careful client would.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal::backoff::Backoff;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Most requests in flight; past it a tick is skipped (and not counted as sent).
const MAX_IN_FLIGHT: usize = 2000;

#[derive(Debug, Default)]
struct Tally {
    sent: usize,
    acknowledged: Vec<String>,
    failed: usize,
    /// Entity → keys sent to it.
    per_entity: HashMap<String, usize>,
}

/// What the load did.
#[derive(Debug)]
pub(super) struct Outcome {
    /// Requests sent.
    pub(super) sent: usize,
    /// Keys whose request got a 200.
    pub(super) acknowledged: Vec<String>,
    /// Requests that never got a 200.
    pub(super) failed: usize,
    per_entity: HashMap<String, usize>,
}

impl Outcome {
    /// Distinct keys sent to each entity.
    pub(super) fn sent_per_entity(&self) -> &HashMap<String, usize> {
        &self.per_entity
    }
}

/// A running load.
pub(super) struct Load {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    tally: Arc<Mutex<Tally>>,
}

impl Load {
    /// Starts sending `rate` messages per second to `entities` counters named `<tag>-<n>`.
    pub(super) fn start(gateway: String, tag: String, rate: u32, entities: usize) -> Self {
        let stop = CancellationToken::new();
        let tally = Arc::new(Mutex::new(Tally::default()));
        let task = tokio::spawn(run(
            gateway,
            tag,
            rate.max(1),
            entities.max(1),
            stop.clone(),
            tally.clone(),
        ));
        Self { stop, task, tally }
    }

    /// Stops sending and waits for the requests in flight.
    pub(super) async fn stop(self) -> Outcome {
        self.stop.cancel();
        let _ = self.task.await;
        let mut tally = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        Outcome {
            sent: tally.sent,
            acknowledged: std::mem::take(&mut tally.acknowledged),
            failed: tally.failed,
            per_entity: std::mem::take(&mut tally.per_entity),
        }
    }
}

async fn run(
    gateway: String,
    tag: String,
    rate: u32,
    entities: usize,
    stop: CancellationToken,
    tally: Arc<Mutex<Tally>>,
) {
    let client = reqwest::Client::new();
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut requests = JoinSet::new();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut seq = 0usize;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            continue;
        };
        let entity = format!("{tag}-{}", seq % entities);
        let key = format!("{tag}-{seq}");
        seq += 1;
        {
            let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
            t.sent += 1;
            *t.per_entity.entry(entity.clone()).or_default() += 1;
        }
        let url = format!("{gateway}/entities/counter/{entity}/increment");
        let (client, tally) = (client.clone(), tally.clone());
        requests.spawn(async move {
            let acknowledged = send(&client, &url, &key).await;
            let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
            if acknowledged {
                t.acknowledged.push(key);
            } else {
                t.failed += 1;
            }
            drop(permit);
        });
        while requests.try_join_next().is_some() {}
    }
    while requests.join_next().await.is_some() {}
}

/// Sends one increment, retrying retryable failures with the same key for up to 30 s.
async fn send(client: &reqwest::Client, url: &str, key: &str) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    while tokio::time::Instant::now() < deadline {
        let response = client
            .post(url)
            .header("idempotency-key", key)
            .header("x-request-timeout", "10s")
            .json(&serde_json::json!({}))
            .timeout(Duration::from_secs(12))
            .send()
            .await;
        match response {
            Ok(r) if r.status().is_success() => return true,
            Ok(r) if r.status().is_client_error() && r.status().as_u16() != 429 => return false,
            _ => {}
        }
        backoff.wait().await;
    }
    false
}
