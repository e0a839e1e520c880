//! What a shard actor's mailbox carries ([`ShardMsg`]): deliveries from the runtime, work
//! outcomes from its entity actors, scan results and control. Below both the shard and
//! the entity actor, which send each other these.

use chrono::Utc;
use tokio::sync::oneshot;

use crate::ids::{EntityAddress, MessageId};
use crate::message_storage::{Reply, StoredMessage};
use crate::transport::{Delivery, DeliveryError, EntityStatus};

/// Where a volatile delivery's answer goes.
pub(crate) type ReplyTx = oneshot::Sender<Result<Reply, DeliveryError>>;

/// What became of one piece of work.
#[derive(Debug)]
pub(crate) enum WorkOutcome {
    /// A persisted message's final reply (committed now or earlier).
    Replied(Reply),
    /// A volatile message's reply.
    Volatile(Reply),
    /// The shard's epoch moved on: this runner no longer owns it.
    Fenced,
    /// Completion could not be written; the message stays in storage.
    StorageFailed(String),
}

pub(crate) enum ShardMsg {
    Deliver(Delivery, ReplyTx),
    Done {
        address: EntityAddress,
        seq: u64,
        id: Option<MessageId>,
        outcome: WorkOutcome,
    },
    Scan(ScanKind),
    Scanned {
        messages: Vec<StoredMessage>,
        next_due: Option<chrono::DateTime<Utc>>,
    },
    ScanFailed(String),
    /// What storage holds for a message callers wait on (`None`: not processed yet).
    StoredReply {
        id: MessageId,
        reply: Option<Reply>,
    },
    /// A message waiting for its type was postponed in storage (or could not be).
    Postponed(MessageId),
    Tick,
    Status(EntityAddress, oneshot::Sender<EntityStatus>),
    Drain(oneshot::Sender<()>),
    Fence,
}

/// Why a shard scans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum ScanKind {
    /// Periodic, after a restart, when room frees: young rows are left to their pushes.
    Settled,
    /// On acquisition: everything due, young or not (nobody else will push it here).
    Acquired,
}
