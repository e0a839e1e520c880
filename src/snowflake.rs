//! Snowflake ids for messages: 41 bits of milliseconds since 2025-01-01, 10 bits of machine
//! id, 12 bits of sequence. Ids from one generator strictly increase, so a sender's messages
//! sort in the order it sent them. A runner's machine id is its registered runner id (low 10
//! bits: live runners share one only if 1,024 registrations happened between theirs); a
//! client-only node (gateway, CLI) takes a random one. A clash is still caught by storage
//! (`IdTaken`: the sender saves again under a fresh id).

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::ids::MessageId;

/// Unix milliseconds of the snowflake epoch (2025-01-01T00:00:00Z).
pub const EPOCH_MS: u64 = 1_735_689_600_000;
const MACHINE_BITS: u32 = 10;
const SEQUENCE_BITS: u32 = 12;
const MAX_SEQUENCE: u64 = (1 << SEQUENCE_BITS) - 1;

/// Generates strictly increasing ids for one node.
#[derive(Debug)]
pub struct Snowflake {
    // A std Mutex, never held across an await.
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    machine: u64,
    /// The machine id the last id was made with.
    last_machine: u64,
    last_ms: u64,
    seq: u64,
}

fn machine_bits(machine: u32) -> u64 {
    u64::from(machine) & ((1 << MACHINE_BITS) - 1)
}

impl Snowflake {
    /// A generator for `machine` (only its low 10 bits are used).
    pub fn new(machine: u32) -> Self {
        let machine = machine_bits(machine);
        Self {
            state: Mutex::new(State {
                machine,
                last_machine: machine,
                last_ms: 0,
                seq: 0,
            }),
        }
    }

    /// Switches to another machine id (a runner's, once it has registered). Ids keep
    /// increasing: the next one moves on to a fresh millisecond.
    pub fn set_machine(&self, machine: u32) {
        self.lock().machine = machine_bits(machine);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next id.
    pub fn next_id(&self) -> MessageId {
        let now = now_ms();
        let mut state = self.lock();
        let (mut ms, mut seq) = (state.last_ms, state.seq);
        if state.machine != state.last_machine {
            // A lower machine id in the same millisecond would make a smaller id.
            ms = now.max(ms + 1);
            seq = 0;
        } else if now > ms {
            ms = now;
            seq = 0;
        } else if seq < MAX_SEQUENCE {
            seq += 1;
        } else {
            // Sequence exhausted (or the clock went back): borrow the next millisecond.
            ms += 1;
            seq = 0;
        }
        state.last_ms = ms;
        state.seq = seq;
        state.last_machine = state.machine;
        let id = (ms << (MACHINE_BITS + SEQUENCE_BITS)) | (state.machine << SEQUENCE_BITS) | seq;
        MessageId::new(id as i64)
    }
}

/// A random 10-bit machine id for a node. Process ids are no good: in containers every
/// node is pid 1. A clash between two live nodes is still caught by storage (`IdTaken`, and
/// the client saves again under a fresh id); random ids make it rare.
pub fn random_machine_id() -> u32 {
    // The low bits of a v7 uuid are random.
    (uuid::Uuid::now_v7().as_u128() as u32) & ((1 << MACHINE_BITS) - 1)
}

/// The smallest id a generator could produce `age` ago: every id below it is older.
pub fn id_before(age: std::time::Duration) -> MessageId {
    let ms = now_ms().saturating_sub(age.as_millis() as u64);
    MessageId::new((ms << (MACHINE_BITS + SEQUENCE_BITS)) as i64)
}

/// The smallest id a generator could produce at `at`: every id below it was generated
/// earlier (an instant before the snowflake epoch gives 0).
pub fn first_id_at(at: chrono::DateTime<chrono::Utc>) -> MessageId {
    let ms = u64::try_from(at.timestamp_millis())
        .unwrap_or(0)
        .saturating_sub(EPOCH_MS);
    MessageId::new((ms.min((1 << 41) - 1) << (MACHINE_BITS + SEQUENCE_BITS)) as i64)
}

/// When `id` was generated.
pub fn created_at(id: MessageId) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp_millis((created_ms(id) + EPOCH_MS) as i64)
}

/// Milliseconds since the snowflake epoch at which `id` was generated.
pub fn created_ms(id: MessageId) -> u64 {
    (id.get() as u64) >> (MACHINE_BITS + SEQUENCE_BITS)
}

/// Milliseconds since the snowflake epoch, now.
pub fn now_ms() -> u64 {
    let since_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(EPOCH_MS);
    since_unix.saturating_sub(EPOCH_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_id_at_bounds_ids_by_time() {
        let ids = Snowflake::new(7);
        let before = chrono::Utc::now() - chrono::TimeDelta::milliseconds(2);
        let id = ids.next_id();
        let after = chrono::Utc::now() + chrono::TimeDelta::milliseconds(2);
        assert!(first_id_at(before) <= id && id < first_id_at(after));
        assert_eq!(first_id_at(chrono::DateTime::UNIX_EPOCH), MessageId::new(0));
        let made = created_at(id).map(|t| t.timestamp_millis());
        assert!(made.is_some_and(|ms| ms >= before.timestamp_millis()));
    }

    #[test]
    fn ids_strictly_increase_and_carry_the_machine() {
        let ids = Snowflake::new(5);
        let mut prev = ids.next_id();
        for _ in 0..20_000 {
            let id = ids.next_id();
            assert!(id > prev);
            assert_eq!((id.get() >> SEQUENCE_BITS) & 0x3ff, 5);
            prev = id;
        }
    }

    #[test]
    fn a_new_machine_id_keeps_ids_increasing() {
        let ids = Snowflake::new(1000);
        let before = ids.next_id();
        ids.set_machine(3);
        let after = ids.next_id();
        assert!(after > before, "{after:?} after {before:?}");
        assert_eq!((after.get() >> SEQUENCE_BITS) & 0x3ff, 3);
        assert!(ids.next_id() > after);
    }

    #[test]
    fn machines_do_not_collide() {
        let a = Snowflake::new(1);
        let b = Snowflake::new(2);
        let ids: std::collections::HashSet<_> =
            (0..1000).flat_map(|_| [a.next_id(), b.next_id()]).collect();
        assert_eq!(ids.len(), 2000);
    }
}
