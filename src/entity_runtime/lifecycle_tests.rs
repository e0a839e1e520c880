//! The activation and passivation hooks, against in-memory storage: what the activation
//! hook sees, its timeout, and when the passivation hook runs.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::*;
use crate::entity::{
    ActivationContext, Entity, EntityContext, EntityOptions, EntityProtocol, HandlerError,
};
use crate::ids::{EntityId, EntityType};
use crate::message_storage::memory::MemoryMessageStorage;
use crate::message_storage::{NewMessage, SaveOutcome, StoredMessage};
use crate::snowflake::Snowflake;

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
enum HookedMsg {
    Add { n: i64 },
    Get {},
}

/// What the hooks saw.
#[derive(Debug, Clone, PartialEq)]
enum Event {
    Activated {
        address: EntityAddress,
        stored: Option<i64>,
    },
    Passivated {
        address: EntityAddress,
        state: i64,
    },
}

/// Records its hooks; its activation sleeps past the timeout while `slow` is set.
#[derive(Clone, Default)]
struct Hooked {
    events: Arc<Mutex<Vec<Event>>>,
    activations: Arc<AtomicUsize>,
    slow: Arc<AtomicBool>,
    /// The passivation hook sleeps an hour while set.
    slow_passivation: Arc<AtomicBool>,
    passivations: Arc<AtomicUsize>,
    max_idle: Duration,
}

impl Hooked {
    fn events(&self) -> Vec<Event> {
        self.events.lock().expect("not poisoned").clone()
    }
}

impl EntityProtocol for Hooked {
    const NAME: &'static str = "hooked";
    type Message = HookedMsg;
    type Reply = i64;

    fn options(&self) -> EntityOptions {
        EntityOptions {
            max_idle: self.max_idle,
            activation_timeout: Duration::from_secs(1),
            passivation_timeout: Duration::from_secs(1),
            ..EntityOptions::default()
        }
    }

    fn is_persisted(message: &HookedMsg) -> bool {
        matches!(message, HookedMsg::Add { .. })
    }
}

impl Entity for Hooked {
    type State = i64;
    const PERSIST_STATE: bool = true;

    async fn on_activate(
        &self,
        ctx: &ActivationContext,
        stored: Option<i64>,
    ) -> Result<i64, HandlerError> {
        self.activations.fetch_add(1, Ordering::SeqCst);
        if self.slow.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        self.events
            .lock()
            .expect("not poisoned")
            .push(Event::Activated {
                address: ctx.address.clone(),
                stored,
            });
        Ok(stored.unwrap_or_default())
    }

    async fn handle(
        &self,
        _: &EntityContext,
        state: &mut i64,
        message: HookedMsg,
    ) -> Result<i64, HandlerError> {
        if let HookedMsg::Add { n } = message {
            *state += n;
        }
        Ok(*state)
    }

    async fn on_passivate(&self, ctx: &ActivationContext, state: i64) {
        self.passivations.fetch_add(1, Ordering::SeqCst);
        if self.slow_passivation.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        self.events
            .lock()
            .expect("not poisoned")
            .push(Event::Passivated {
                address: ctx.address.clone(),
                state,
            });
    }
}

struct Fixture {
    runtime: EntityRuntime,
    storage: MemoryMessageStorage,
    ids: Snowflake,
    sharding: Sharding,
}

async fn fixture(hooked: Hooked) -> Fixture {
    fixture_sleeping(hooked, RuntimeConfig::default().sleep_after).await
}

/// A fixture whose idle entities go to sleep after `sleep_after`.
async fn fixture_sleeping(hooked: Hooked, sleep_after: Duration) -> Fixture {
    let mut registry = EntityRegistry::new();
    registry.register(hooked).expect("registers");
    let sharding = Sharding::new(NonZeroU32::new(2).expect("non-zero"));
    let config = RuntimeConfig {
        sharding,
        scan_interval: Duration::from_millis(100),
        restart_backoff: Duration::from_millis(50),
        sleep_after,
        ..RuntimeConfig::default()
    };
    let (runtime, storage) = EntityRuntime::standalone(registry, config).await;
    Fixture {
        runtime,
        storage,
        ids: Snowflake::new(1),
        sharding,
    }
}

fn address(id: &str) -> EntityAddress {
    EntityAddress {
        entity_type: EntityType::new("hooked").expect("valid"),
        entity_id: EntityId::new(id).expect("valid"),
    }
}

impl Fixture {
    async fn add(&self, entity: &str, n: i64) -> Result<Reply, DeliveryError> {
        let message = NewMessage {
            id: self.ids.next_id(),
            shard: self.sharding.shard_of(&address(entity).entity_id),
            address: address(entity),
            tag: "add".to_owned(),
            payload: serde_json::json!({ "n": n }),
            idempotency_key: None,
            deliver_at: None,
        };
        let saved = self.storage.save(message.clone()).await.expect("saved");
        let duplicate = matches!(saved, SaveOutcome::Duplicate { .. });
        let message: StoredMessage = message.into();
        self.runtime
            .deliver(Delivery::Persisted { message, duplicate })
            .await
    }

    async fn get(&self, entity: &str) -> Result<Reply, DeliveryError> {
        self.runtime
            .deliver(Delivery::Volatile {
                address: address(entity),
                tag: "get".to_owned(),
                payload: serde_json::json!({}),
            })
            .await
    }
}

fn value(reply: Result<Reply, DeliveryError>) -> i64 {
    match reply {
        Ok(Reply::Ok { value }) => value.as_i64().expect("an integer reply"),
        other => panic!("expected a value, got {other:?}"),
    }
}

/// Waits (on tokio's clock) until `done`, failing after `within`.
async fn until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn the_activation_hook_sees_its_address_and_the_stored_state() {
    let hooked = Hooked {
        max_idle: Duration::from_millis(100),
        ..Hooked::default()
    };
    let f = fixture(hooked.clone()).await;
    assert_eq!(value(f.add("a1", 5).await), 5);
    assert_eq!(
        hooked.events().first(),
        Some(&Event::Activated {
            address: address("a1"),
            stored: None
        })
    );
    // Passivated for idleness; the next message activates it again from storage.
    until("a1 passivates", Duration::from_secs(5), || {
        f.runtime.resident() == 0
    })
    .await;
    assert_eq!(value(f.get("a1").await), 5);
    let activations: Vec<Event> = hooked
        .events()
        .into_iter()
        .filter(|e| matches!(e, Event::Activated { .. }))
        .collect();
    assert_eq!(
        activations,
        vec![
            Event::Activated {
                address: address("a1"),
                stored: None
            },
            Event::Activated {
                address: address("a1"),
                stored: Some(5)
            },
        ]
    );
}

#[tokio::test]
async fn the_passivation_hook_runs_when_an_idle_entity_passivates() {
    let hooked = Hooked {
        max_idle: Duration::from_millis(100),
        ..Hooked::default()
    };
    let f = fixture(hooked.clone()).await;
    assert_eq!(value(f.add("p1", 3).await), 3);
    assert_eq!(value(f.add("p1", 4).await), 7);
    let passivated = Event::Passivated {
        address: address("p1"),
        state: 7,
    };
    until("the passivation hook runs", Duration::from_secs(5), || {
        hooked.events().contains(&passivated)
    })
    .await;
    assert_eq!(f.runtime.resident(), 0);
    let count = hooked
        .events()
        .iter()
        .filter(|e| matches!(e, Event::Passivated { .. }))
        .count();
    assert_eq!(count, 1, "{:?}", hooked.events());
}

#[tokio::test(start_paused = true)]
async fn a_passivation_hook_that_overruns_its_timeout_is_cut_off_and_the_entity_stops() {
    let hooked = Hooked {
        max_idle: Duration::from_millis(100),
        ..Hooked::default()
    };
    hooked.slow_passivation.store(true, Ordering::SeqCst);
    let f = fixture(hooked.clone()).await;
    assert_eq!(value(f.add("h1", 3).await), 3);
    // The hook would sleep an hour; its 1 s timeout ends it and the entity stops.
    until("the hung hook cut off", Duration::from_secs(30), || {
        hooked.passivations.load(Ordering::SeqCst) == 1 && f.runtime.resident() == 0
    })
    .await;
    assert!(
        !hooked
            .events()
            .iter()
            .any(|e| matches!(e, Event::Passivated { .. })),
        "the hook ran to its end: {:?}",
        hooked.events()
    );
    // The next message activates it again from the stored state.
    hooked.slow_passivation.store(false, Ordering::SeqCst);
    assert_eq!(value(f.add("h1", 4).await), 7);
}

#[tokio::test(start_paused = true)]
async fn a_slow_activation_fails_the_delivery_and_the_next_works_once_the_hook_is_fast() {
    let hooked = Hooked {
        max_idle: Duration::from_secs(600),
        ..Hooked::default()
    };
    hooked.slow.store(true, Ordering::SeqCst);
    let f = Arc::new(fixture(hooked.clone()).await);
    // Volatile: the caller is told the handler failed, at once, not after 10 s.
    let started = tokio::time::Instant::now();
    let refused = f.get("s1").await.expect_err("activation timed out");
    assert!(
        matches!(&refused, DeliveryError::HandlerFailed(m) if m.contains("activation took longer")),
        "{refused:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // Persisted: retried with backoff while the hook is slow, run once it is fast.
    let asked = tokio::spawn({
        let f = f.clone();
        async move { f.add("s1", 9).await }
    });
    let before = hooked.activations.load(Ordering::SeqCst);
    until("activation is retried", Duration::from_secs(30), || {
        hooked.activations.load(Ordering::SeqCst) >= before + 2
    })
    .await;
    hooked.slow.store(false, Ordering::SeqCst);
    assert_eq!(value(asked.await.expect("joins")), 9);
    assert_eq!(value(f.get("s1").await), 9);
    assert!(
        hooked.events().contains(&Event::Activated {
            address: address("s1"),
            stored: None
        }),
        "{:?}",
        hooked.events()
    );
}

#[tokio::test]
async fn an_idle_entity_sleeps_as_data_and_wakes_with_its_state_without_the_hooks() {
    let hooked = Hooked {
        max_idle: Duration::from_secs(600),
        ..Hooked::default()
    };
    let f = fixture_sleeping(hooked.clone(), Duration::from_millis(50)).await;
    assert_eq!(value(f.add("z1", 5).await), 5);
    assert_eq!(value(f.get("z2").await), 0);
    assert_eq!((f.runtime.resident(), f.runtime.awake()), (2, 2));
    // Idle past `sleep_after`: no actor is left, but both stay resident.
    until("both fall asleep", Duration::from_secs(5), || {
        f.runtime.awake() == 0
    })
    .await;
    assert_eq!(f.runtime.resident(), 2);
    assert!(f.runtime.entity_status(&address("z1")).await.resident);
    // Woken by the next message with the state they slept with: the activation hook ran
    // once each (a reload would run it again), the passivation hook never.
    assert_eq!(value(f.add("z1", 4).await), 9);
    assert_eq!(value(f.get("z2").await), 0);
    assert_eq!(f.runtime.awake(), 2);
    assert_eq!(hooked.activations.load(Ordering::SeqCst), 2);
    assert_eq!(hooked.passivations.load(Ordering::SeqCst), 0);
    // And again: asleep, woken, the same state.
    until("both fall asleep again", Duration::from_secs(5), || {
        f.runtime.awake() == 0
    })
    .await;
    assert_eq!(value(f.get("z1").await), 9);
    assert_eq!(hooked.activations.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_sleeping_entity_past_max_idle_runs_its_passivation_hook_with_its_state() {
    let hooked = Hooked {
        max_idle: Duration::from_millis(600),
        ..Hooked::default()
    };
    let f = fixture_sleeping(hooked.clone(), Duration::from_millis(50)).await;
    assert_eq!(value(f.add("q1", 3).await), 3);
    until("q1 falls asleep", Duration::from_secs(5), || {
        f.runtime.awake() == 0
    })
    .await;
    assert_eq!(f.runtime.resident(), 1);
    let passivated = Event::Passivated {
        address: address("q1"),
        state: 3,
    };
    until(
        "the sleeping entity passivates",
        Duration::from_secs(5),
        || hooked.events().contains(&passivated),
    )
    .await;
    until("q1 is gone", Duration::from_secs(5), || {
        f.runtime.resident() == 0
    })
    .await;
    assert_eq!(hooked.passivations.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_drained_shard_runs_the_passivation_hooks_of_its_sleeping_entities() {
    use crate::ownership::ShardLifecycle;
    let hooked = Hooked {
        max_idle: Duration::from_secs(600),
        ..Hooked::default()
    };
    let f = fixture_sleeping(hooked.clone(), Duration::from_millis(50)).await;
    assert_eq!(value(f.add("d1", 2).await), 2);
    until("d1 falls asleep", Duration::from_secs(5), || {
        f.runtime.awake() == 0
    })
    .await;
    f.runtime
        .drain(f.sharding.shard_of(&address("d1").entity_id))
        .await;
    assert!(
        hooked.events().contains(&Event::Passivated {
            address: address("d1"),
            state: 2,
        }),
        "{:?}",
        hooked.events()
    );
    assert_eq!(f.runtime.resident(), 0);
}

#[tokio::test]
async fn sleeping_entities_count_against_the_resident_cap() {
    let hooked = Hooked {
        max_idle: Duration::from_secs(600),
        ..Hooked::default()
    };
    let mut registry = EntityRegistry::new();
    registry.register(hooked).expect("registers");
    let sharding = Sharding::new(NonZeroU32::new(2).expect("non-zero"));
    let config = RuntimeConfig {
        sharding,
        scan_interval: Duration::from_millis(100),
        sleep_after: Duration::from_millis(50),
        max_resident_entities: 2,
        ..RuntimeConfig::default()
    };
    let (runtime, storage) = EntityRuntime::standalone(registry, config).await;
    let f = Fixture {
        runtime,
        storage,
        ids: Snowflake::new(1),
        sharding,
    };
    assert_eq!(value(f.get("c1").await), 0);
    assert_eq!(value(f.get("c2").await), 0);
    until("both fall asleep", Duration::from_secs(5), || {
        f.runtime.awake() == 0
    })
    .await;
    // A flood of new ids finds the cap full although no actor runs: sleeping is cheaper,
    // not unbounded.
    let refused = f.get("c3").await.expect_err("the cap is full");
    assert!(matches!(refused, DeliveryError::Overloaded), "{refused:?}");
    assert_eq!(value(f.get("c1").await), 0, "a sleeping entity still wakes");
}
