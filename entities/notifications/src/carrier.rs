//! The fan-out carrier: Redis pub/sub on one channel per cluster,
//! `<redis prefix>:notifications`.
//!
//! The owner of a tenant's entity `PUBLISH`es each event (as JSON) after storing it; every
//! gateway keeps one subscribed connection and hands what arrives to its hub. Pub/sub is
//! at-most-once: a push lost while a connection is down, or dropped by a full hub, is
//! found again from the history (the hub catches up by seq on a gap, after every
//! (re)subscription, and on its periodic sync), so the carrier decides latency, never
//! correctness. Why Redis and not Postgres `LISTEN/NOTIFY` or the runner transport: see
//! docs/ARCHITECTURE.md "Built-in entities → notification".

use std::time::Duration;

use futures::StreamExt;
use shoal::redis::RedisClient;
use tokio_util::sync::CancellationToken;

use super::history::Event;
use super::hub::HubHandle;

/// The channel's name under `prefix`.
pub fn channel(prefix: &str) -> String {
    format!("{prefix}:notifications")
}

/// The publishing side (on runners).
#[derive(Debug, Clone)]
pub struct Carrier {
    redis: RedisClient,
    channel: String,
}

impl Carrier {
    /// Publishes on `redis`'s cluster channel.
    pub fn new(redis: RedisClient) -> Self {
        let channel = channel(redis.prefix());
        Self { redis, channel }
    }

    /// Pushes `event` to every subscribed gateway (best effort: a failure is logged and
    /// counted; gateways catch up from the history).
    pub async fn push(&self, event: &Event) {
        let payload = match serde_json::to_string(event) {
            Ok(payload) => payload,
            Err(error) => {
                tracing::warn!(%error, "an event does not encode");
                return;
            }
        };
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(&self.channel).arg(payload);
        if let Err(error) = self.redis.command::<i64>("notify_publish", &cmd).await {
            super::metrics::push_failed();
            tracing::warn!(%error, tenant = %event.tenant, seq = event.seq, "pushing an event failed");
        }
    }
}

/// Another channel on the gateway's subscription.
pub trait Side: Send + Sync {
    /// A message arrived on the channel.
    fn on_message(&self, payload: &str);
    /// The subscription is (again) up: what was published while it was down is lost.
    fn on_subscribed(&self);
}

/// Keeps one subscription to the channel at `url` open until `shutdown`, handing every
/// event to `hub` and every message of a side channel to its [`Side`]; after each
/// (re)subscription the hub catches every tenant up and each side is told.
pub async fn listen(
    url: String,
    channel: String,
    hub: HubHandle,
    sides: Vec<(String, std::sync::Arc<dyn Side>)>,
    shutdown: CancellationToken,
) {
    let mut backoff =
        shoal::backoff::Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        let run = async {
            let client = redis::Client::open(url.as_str())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            for (side, _) in &sides {
                pubsub.subscribe(side).await?;
            }
            tracing::info!(%channel, "subscribed to the notification channel");
            hub.resync_all();
            for (_, side) in &sides {
                side.on_subscribed();
            }
            let mut messages = pubsub.on_message();
            while let Some(message) = messages.next().await {
                if let Some((_, side)) = sides.iter().find(|(c, _)| c == message.get_channel_name())
                {
                    match message.get_payload::<String>() {
                        Ok(payload) => side.on_message(&payload),
                        Err(error) => tracing::warn!(%error, "an undecodable wake-up"),
                    }
                    continue;
                }
                match message
                    .get_payload::<String>()
                    .map_err(|e| e.to_string())
                    .and_then(|p| serde_json::from_str::<Event>(&p).map_err(|e| e.to_string()))
                {
                    Ok(event) => hub.push(event),
                    Err(error) => tracing::warn!(%error, "an undecodable push"),
                }
            }
            redis::RedisResult::Ok(())
        };
        tokio::select! {
            result = run => {
                match result {
                    Ok(()) => tracing::warn!("the notification subscription ended; resubscribing"),
                    Err(error) => tracing::warn!(%error, "the notification subscription failed; retrying"),
                }
            }
            () = shutdown.cancelled() => return,
        }
        tokio::select! {
            () = backoff.wait() => {}
            () = shutdown.cancelled() => return,
        }
    }
}
