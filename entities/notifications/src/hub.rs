//! The gateway's subscriber hub: one task that owns, per tenant with subscribers on this
//! gateway, the last seq it delivered and the subscribers' bounded buffers.
//!
//! Ordering: a tenant's feed delivers seqs one by one, `last + 1` only. A push that does
//! not continue the feed is either old (dropped) or shows a gap; a gap, a new
//! subscription to the carrier, a lost push (the hub's own queue was full) and the
//! periodic sync each start a catch-up read of the history after `last`, so a missed push
//! costs latency, never an event, and nothing is delivered twice.
//!
//! Bounds: the command queue is bounded (pushes that find it full are dropped and force a
//! catch-up of every feed); each subscriber's buffer holds `subscriber-buffer` events,
//! and a subscriber whose buffer is full is dropped with its overflow flag set (its
//! stream sends `event: reset` and ends); the number of subscribers is capped, per
//! gateway and per tenant, by [`HubHandle::admit`] ([`super::slots`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::history::{Event, History};
use super::slots::{Refused, Slot, StreamSlots};
use super::{NotificationsConfig, Tenant};

/// Events read per catch-up query.
const SYNC_PAGE: u32 = 1000;
/// Capacity of the hub's command queue.
const COMMANDS: usize = 4096;

enum Command {
    Subscribe {
        tenant: Tenant,
        newest: u64,
        reply: oneshot::Sender<Joined>,
    },
    Push(Event),
    Synced {
        tenant: Tenant,
        events: Vec<Event>,
    },
    ResyncAll,
}

/// A subscriber's side of a feed: events after `live_from`, in order, without gaps.
#[derive(Debug)]
pub struct Joined {
    /// Live events (the channel ends when the subscriber is dropped or the hub stops).
    pub events: mpsc::Receiver<Arc<Event>>,
    /// The feed's last seq when the subscriber joined: live events start after it.
    pub live_from: u64,
    /// Set when the subscriber was dropped for being too slow.
    pub overflowed: Arc<AtomicBool>,
}

struct Subscriber {
    events: mpsc::Sender<Arc<Event>>,
    overflowed: Arc<AtomicBool>,
}

struct Feed {
    last: u64,
    subscribers: Vec<Subscriber>,
    syncing: bool,
}

/// The sending side of the hub (cheap to clone).
#[derive(Debug, Clone)]
pub struct HubHandle {
    commands: mpsc::Sender<Command>,
    lost: Arc<AtomicBool>,
    slots: StreamSlots,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

/// Why a subscription cannot start.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The hub has stopped (the gateway is shutting down): retry elsewhere.
    #[error("the gateway is shutting down")]
    Stopped,
}

impl HubHandle {
    /// A place for one more subscriber of `tenant`, or why not (the caps are shared with
    /// every other stream of the gateway: [`StreamSlots`]).
    pub fn admit(&self, tenant: &Tenant) -> Result<Slot, Refused> {
        self.slots.admit(Some(tenant.as_str()))
    }

    /// Streams on this gateway now.
    pub fn subscribers(&self) -> usize {
        self.slots.taken()
    }

    /// Joins `tenant`'s feed; `newest` is the newest seq the caller read from the history
    /// (where a new feed starts).
    pub async fn subscribe(&self, tenant: Tenant, newest: u64) -> Result<Joined, HubError> {
        let (reply, joined) = oneshot::channel();
        self.commands
            .send(Command::Subscribe {
                tenant,
                newest,
                reply,
            })
            .await
            .map_err(|_| HubError::Stopped)?;
        joined.await.map_err(|_| HubError::Stopped)
    }

    /// Hands the hub a pushed event (never waits: a full queue drops it and every feed
    /// catches up instead).
    pub fn push(&self, event: Event) {
        if self.commands.try_send(Command::Push(event)).is_err() {
            self.lost.store(true, Ordering::Release);
        }
    }

    /// Makes every feed catch up from the history (after the carrier (re)subscribed).
    pub fn resync_all(&self) {
        if self.commands.try_send(Command::ResyncAll).is_err() {
            self.lost.store(true, Ordering::Release);
        }
    }
}

/// Starts the hub; it stops at `shutdown` (every subscriber's stream then ends).
pub fn spawn_hub(
    history: History,
    config: &NotificationsConfig,
    slots: StreamSlots,
    shutdown: CancellationToken,
) -> HubHandle {
    let (commands, rx) = mpsc::channel(COMMANDS);
    let handle = HubHandle {
        commands: commands.clone(),
        lost: Arc::new(AtomicBool::new(false)),
        slots,
    };
    let hub = Hub {
        feeds: HashMap::new(),
        history,
        commands,
        lost: handle.lost.clone(),
        buffer: config.subscriber_buffer,
        sync_interval: config.sync_interval,
    };
    tokio::spawn(hub.run(rx, shutdown));
    handle
}

struct Hub {
    feeds: HashMap<Tenant, Feed>,
    history: History,
    /// For catch-up reads to report back.
    commands: mpsc::Sender<Command>,
    lost: Arc<AtomicBool>,
    buffer: usize,
    sync_interval: Duration,
}

impl Hub {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.sync_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let command = tokio::select! {
                command = rx.recv() => command,
                _ = tick.tick() => {
                    self.sweep();
                    continue;
                }
                () = shutdown.cancelled() => None,
            };
            let Some(command) = command else { break };
            if self.lost.swap(false, Ordering::AcqRel) {
                self.sync_all();
            }
            match command {
                Command::Subscribe {
                    tenant,
                    newest,
                    reply,
                } => self.join(tenant, newest, reply),
                Command::Push(event) => self.pushed(event),
                Command::Synced { tenant, events } => self.synced(&tenant, events),
                Command::ResyncAll => self.sync_all(),
            }
        }
        tracing::info!("notification hub stopped");
    }

    fn join(&mut self, tenant: Tenant, newest: u64, reply: oneshot::Sender<Joined>) {
        let (events, rx) = mpsc::channel(self.buffer);
        let overflowed = Arc::new(AtomicBool::new(false));
        let feed = self.feeds.entry(tenant).or_insert_with(|| Feed {
            last: newest,
            subscribers: Vec::new(),
            syncing: false,
        });
        feed.subscribers.push(Subscriber {
            events,
            overflowed: overflowed.clone(),
        });
        let _ = reply.send(Joined {
            events: rx,
            live_from: feed.last,
            overflowed,
        });
    }

    fn pushed(&mut self, event: Event) {
        let Ok(tenant) = event.tenant.parse::<Tenant>() else {
            return;
        };
        let Some(feed) = self.feeds.get_mut(&tenant) else {
            return;
        };
        if event.seq <= feed.last {
            return;
        }
        if event.seq == feed.last + 1 {
            deliver(feed, Arc::new(event));
        } else {
            self.sync(&tenant);
        }
    }

    fn synced(&mut self, tenant: &Tenant, events: Vec<Event>) {
        let Some(feed) = self.feeds.get_mut(tenant) else {
            return;
        };
        feed.syncing = false;
        let full = events.len() >= SYNC_PAGE as usize;
        for event in events {
            if event.seq == feed.last + 1 {
                deliver(feed, Arc::new(event));
            } else if event.seq > feed.last + 1 {
                // Events the history no longer keeps: subscribers that need them learn it
                // when they resume (their reset); the feed goes on from what is kept.
                feed.last = event.seq - 1;
                deliver(feed, Arc::new(event));
            }
        }
        if full {
            self.sync(tenant);
        }
    }

    /// Drops closed subscribers and empty feeds, then catches every feed up.
    fn sweep(&mut self) {
        self.feeds.retain(|_, feed| {
            feed.subscribers.retain(|s| !s.events.is_closed());
            !feed.subscribers.is_empty()
        });
        self.sync_all();
    }

    fn sync_all(&mut self) {
        let tenants: Vec<Tenant> = self.feeds.keys().cloned().collect();
        for tenant in tenants {
            self.sync(&tenant);
        }
    }

    /// Starts a catch-up read for `tenant` unless one is running.
    fn sync(&mut self, tenant: &Tenant) {
        let Some(feed) = self.feeds.get_mut(tenant) else {
            return;
        };
        if feed.syncing {
            return;
        }
        feed.syncing = true;
        let after = feed.last;
        let history = self.history.clone();
        let commands = self.commands.clone();
        let tenant = tenant.clone();
        tokio::spawn(async move {
            let events = match history.read(&tenant, after, u64::MAX, SYNC_PAGE).await {
                Ok(events) => events,
                Err(error) => {
                    tracing::warn!(%error, %tenant, "catching up from the history failed");
                    Vec::new()
                }
            };
            let _ = commands.send(Command::Synced { tenant, events }).await;
        });
    }
}

/// Hands `event` (the feed's next) to every subscriber; a full buffer drops its
/// subscriber with the overflow flag set.
fn deliver(feed: &mut Feed, event: Arc<Event>) {
    feed.last = event.seq;
    feed.subscribers.retain(
        |subscriber| match subscriber.events.try_send(event.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                subscriber.overflowed.store(true, Ordering::Release);
                super::metrics::slow_dropped();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        },
    );
}
