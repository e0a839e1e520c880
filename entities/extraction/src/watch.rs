//! Wake-ups for the readers of extraction journals, over the notification carrier.
//!
//! The journal in Postgres is what `GET /extractions/{id}/events` (and `?wait=true`) serve;
//! this decides only *when* a reader looks again. The runner that appends an event
//! `PUBLISH`es the extraction's id on `<redis prefix>:extraction-events`, next to the
//! notification channel and on the same per-gateway subscription ([`super::super::
//! notifications::carrier::listen`]); the gateway's [`JournalWatch`] wakes that
//! extraction's readers, which read the journal after the seq they hold. As with
//! notifications, the push decides latency, never correctness: a lost wake-up is made up by
//! the reader's fallback read every `notifications.sync-interval` (and every reader reads
//! again after each (re)subscription); a gateway with no Redis reads every 100 ms.
//!
//! Bounded: each reader takes one of the gateway's [`StreamSlots`], the caps it shares with
//! the tenant streams (`notifications.max-subscribers` per gateway, past it a 503, and
//! `notifications.max-subscribers-per-tenant` per tenant, past it a 429), and the map holds
//! one entry per followed extraction, removed with its last reader.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use shoal::redis::RedisClient;
use tokio::sync::watch;

use shoal_notifications::carrier::Side;
use shoal_notifications::slots::{Refused, Slot, StreamSlots};

/// How often a reader reads the journal when no wake-ups arrive (no Redis).
pub const POLL: Duration = Duration::from_millis(100);

/// The channel's name under `prefix`.
pub fn channel(prefix: &str) -> String {
    format!("{prefix}:extraction-events")
}

/// The publishing side (runners): says an extraction's journal grew.
#[derive(Debug, Clone)]
pub struct JournalHints {
    redis: RedisClient,
    channel: String,
}

impl JournalHints {
    /// Publishes on `redis`'s cluster channel.
    pub fn new(redis: RedisClient) -> Self {
        let channel = channel(redis.prefix());
        Self { redis, channel }
    }

    /// Wakes the readers of `id` on every gateway (best effort: a failure is logged; the
    /// readers' fallback reads find the event).
    pub async fn appended(&self, id: &str) {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(&self.channel).arg(id);
        if let Err(error) = self.redis.command::<i64>("extraction_hint", &cmd).await {
            tracing::debug!(%error, extraction = id, "waking the journal's readers failed");
        }
    }
}

/// The readers this gateway follows, by extraction. Cheap to clone.
#[derive(Debug, Clone)]
pub struct JournalWatch {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    followed: Mutex<HashMap<String, Followed>>,
    readers: AtomicUsize,
    slots: StreamSlots,
    /// Set once the gateway's subscription is up: wake-ups arrive, so readers may wait long.
    subscribed: AtomicBool,
    fallback: Duration,
}

#[derive(Debug)]
struct Followed {
    wake: watch::Sender<u64>,
    readers: usize,
}

impl Default for JournalWatch {
    /// The notification defaults' cap and sync interval.
    fn default() -> Self {
        let defaults = shoal_notifications::NotificationsConfig::default();
        Self::new(StreamSlots::of(&defaults), defaults.sync_interval)
    }
}

impl JournalWatch {
    /// Readers within `slots`; each reads at least every `fallback` once wake-ups arrive
    /// (every [`POLL`] until then).
    pub fn new(slots: StreamSlots, fallback: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                followed: Mutex::default(),
                readers: AtomicUsize::new(0),
                slots,
                subscribed: AtomicBool::new(false),
                fallback,
            }),
        }
    }

    /// A reader of `id`'s journal for a caller of `tenant`, or why the caps refuse it.
    pub fn follow(&self, id: &str, tenant: Option<&str>) -> Result<Reader, Refused> {
        let inner = &self.inner;
        let slot = inner.slots.admit(tenant)?;
        inner.readers.fetch_add(1, Ordering::AcqRel);
        let mut followed = lock(&inner.followed);
        let entry = followed.entry(id.to_owned()).or_insert_with(|| Followed {
            wake: watch::Sender::new(0),
            readers: 0,
        });
        entry.readers += 1;
        let mut woken = entry.wake.subscribe();
        woken.mark_unchanged();
        Ok(Reader {
            id: id.to_owned(),
            woken,
            watch: self.clone(),
            _slot: slot,
        })
    }

    /// Readers followed now.
    pub fn readers(&self) -> usize {
        self.inner.readers.load(Ordering::Acquire)
    }

    /// Wakes the readers of `id`.
    pub fn wake(&self, id: &str) {
        if let Some(entry) = lock(&self.inner.followed).get(id) {
            entry.wake.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    fn wake_all(&self) {
        for entry in lock(&self.inner.followed).values() {
            entry.wake.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    fn wait_at_most(&self) -> Duration {
        if self.inner.subscribed.load(Ordering::Acquire) {
            self.inner.fallback
        } else {
            POLL
        }
    }
}

impl Side for JournalWatch {
    fn on_message(&self, payload: &str) {
        self.wake(payload);
    }

    fn on_subscribed(&self) {
        self.inner.subscribed.store(true, Ordering::Release);
        // What was appended while the subscription was down has no wake-up on its way.
        self.wake_all();
    }
}

/// One reader of one extraction's journal; leaves the watch when dropped.
#[derive(Debug)]
pub struct Reader {
    id: String,
    woken: watch::Receiver<u64>,
    watch: JournalWatch,
    /// Its place under the gateway's stream cap, released with the reader.
    _slot: Slot,
}

impl Reader {
    /// Marks every wake-up so far as seen: call before reading the journal, so one that
    /// arrives during the read makes the next [`Self::wait`] return at once.
    pub fn seen(&mut self) {
        self.woken.mark_unchanged();
    }

    /// Waits for a wake-up since [`Self::seen`], the fallback interval, or `until`.
    pub async fn wait(&mut self, until: Option<tokio::time::Instant>) {
        let mut at = tokio::time::Instant::now() + self.watch.wait_at_most();
        if let Some(until) = until {
            at = at.min(until);
        }
        tokio::select! {
            _ = self.woken.changed() => {}
            () = tokio::time::sleep_until(at) => {}
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let inner = &self.watch.inner;
        let mut followed = lock(&inner.followed);
        if let Some(entry) = followed.get_mut(&self.id) {
            entry.readers -= 1;
            if entry.readers == 0 {
                followed.remove(&self.id);
            }
        }
        inner.readers.fetch_sub(1, Ordering::AcqRel);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Never held across an await, and nothing panics while it is held.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_wake_up_ends_the_wait_and_the_map_forgets_the_last_reader() {
        let watch = JournalWatch::new(StreamSlots::new(2, 2), Duration::from_secs(60));
        watch.on_subscribed();
        let mut reader = watch.follow("x", None).expect("admitted");
        let mut other = watch.follow("x", None).expect("admitted");
        assert!(watch.follow("y", None).is_err(), "capped at two");
        reader.seen();
        // A wake-up that arrives between `seen` and `wait` is not missed.
        watch.wake("x");
        let started = tokio::time::Instant::now();
        reader.wait(None).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        // With none, the wait lasts the fallback.
        reader.seen();
        reader.wait(None).await;
        assert_eq!(started.elapsed(), Duration::from_secs(60));
        other.seen();
        drop(reader);
        drop(other);
        assert_eq!(watch.readers(), 0);
        assert!(lock(&watch.inner.followed).is_empty());
        assert!(watch.follow("y", None).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_subscription_readers_poll() {
        let watch = JournalWatch::new(StreamSlots::new(1, 1), Duration::from_secs(60));
        let mut reader = watch.follow("x", None).expect("admitted");
        let started = tokio::time::Instant::now();
        reader.wait(None).await;
        assert_eq!(started.elapsed(), POLL);
    }

    #[test]
    fn readers_share_the_gateways_stream_caps_with_tenant_streams() {
        let slots = StreamSlots::new(3, 2);
        let watch = JournalWatch::new(slots.clone(), Duration::from_secs(60));
        let tenant_stream = slots.admit(Some("acme")).expect("a tenant stream");
        let reader = watch.follow("x", Some("acme")).expect("admitted");
        assert!(
            matches!(watch.follow("y", Some("acme")), Err(Refused::Tenant { .. })),
            "one per-tenant cap for both kinds"
        );
        let beta = watch.follow("y", Some("beta")).expect("another tenant's");
        assert!(
            matches!(
                watch.follow("z", Some("gamma")),
                Err(Refused::Gateway { .. })
            ),
            "one gateway cap for both kinds"
        );
        drop(tenant_stream);
        let other = watch.follow("y", Some("acme")).expect("a place was freed");
        drop((reader, other, beta));
        assert_eq!(slots.taken(), 0);
    }
}
