//! Pushes from an entity to another, one after another per pair, in the order they were made.
//!
//! A stored message's owner is told with a delivery that waits for the handler, off the
//! caller's task. Pushes made side by side can overtake each other on the way (each is its
//! own task, and a runner runs a batch of deliveries side by side), so an entity sending
//! `a` then `b` to another could have `b` handled first. A *lane* per (sender, target) pair
//! delivers that pair's pushes one at a time instead, so what an entity sends to another is
//! handled in the order it was sent (through the outbox or directly); senders stay side by
//! side with each other.
//!
//! A lane exists while it has pushes to make: its task takes them in order and, finding its
//! queue empty, removes the lane (under the map's lock, so a push either joins the queue or
//! starts a new lane). Both are bounded: past [`MAX_LANES`] a push goes out on its own, as a
//! caller's `send` does; a push that finds its lane's queue full is dropped. Either way the
//! message is stored, and the owner's scan delivers it, in id order with what else waits,
//! after the scan grace: order then holds only as far as the scan's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc::{self, error::TryRecvError, error::TrySendError};

use super::ShoalClient;
use crate::ids::EntityAddress;
use crate::transport::Envelope;

/// Lanes open at once per client; past it pushes go out unordered.
pub const MAX_LANES: usize = 4096;
/// Pushes one lane queues; past it they are left to the owner's scan.
pub const LANE_CAPACITY: usize = 1024;

type Pair = (EntityAddress, EntityAddress);

/// The open lanes of one client.
#[derive(Debug, Default)]
pub(crate) struct Lanes {
    open: Arc<Mutex<HashMap<Pair, mpsc::Sender<Envelope>>>>,
}

impl Lanes {
    /// Queues `envelope` (a stored message `sender` sent) behind the pair's earlier pushes.
    pub(crate) fn push(&self, client: &ShoalClient, sender: &EntityAddress, envelope: Envelope) {
        let pair = (sender.clone(), envelope.address());
        let mut open = lock(&self.open);
        let envelope = match open.get(&pair) {
            None => envelope,
            Some(queue) => match queue.try_send(envelope) {
                Ok(()) => return,
                Err(TrySendError::Full(_)) => {
                    tracing::debug!(
                        sender = %pair.0, target = %pair.1,
                        "push lane full: the owner's scan delivers the message"
                    );
                    return;
                }
                // Its task was dropped (the runtime is shutting down): open a new one.
                Err(TrySendError::Closed(envelope)) => {
                    open.remove(&pair);
                    envelope
                }
            },
        };
        if open.len() >= MAX_LANES {
            drop(open);
            client.push(envelope);
            return;
        }
        let (queue, pushes) = mpsc::channel(LANE_CAPACITY);
        queue.try_send(envelope).expect("a new lane has room");
        open.insert(pair.clone(), queue);
        tokio::spawn(run_lane(client.clone(), self.open.clone(), pair, pushes));
    }
}

/// Delivers one pair's pushes in order until none is queued, then closes the lane.
async fn run_lane(
    client: ShoalClient,
    open: Arc<Mutex<HashMap<Pair, mpsc::Sender<Envelope>>>>,
    pair: Pair,
    mut pushes: mpsc::Receiver<Envelope>,
) {
    loop {
        let envelope = match pushes.try_recv() {
            Ok(envelope) => envelope,
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => {
                let mut open = lock(&open);
                match pushes.try_recv() {
                    Ok(envelope) => envelope,
                    Err(_) => {
                        open.remove(&pair);
                        return;
                    }
                }
            }
        };
        client.deliver_pushed(envelope).await;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Never held across an await, and nothing panics while it is held.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
