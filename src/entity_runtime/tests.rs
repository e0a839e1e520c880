//! The runtime against in-memory message storage.

use std::num::{NonZeroU32, NonZeroUsize};

use tokio::time::Instant;

use serde::{Deserialize, Serialize};

use super::*;
use crate::entity::{Entity, EntityContext, EntityOptions, EntityProtocol, HandlerError};
use crate::ids::{EntityId, EntityType};
use crate::message_storage::memory::MemoryMessageStorage;
use crate::message_storage::{
    Completion, CompletionOutcome, MessageStorageError, NewMessage, SaveOutcome, StoredMessage,
};
use crate::snowflake::Snowflake;

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
enum TestMsg {
    Add { n: i64 },
    Get {},
    Sleep { ms: u64 },
    PanicFirst {},
}

/// Handler runs per entity id.
static HANDLED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn handled(entity: &str) -> usize {
    HANDLED
        .lock()
        .expect("not poisoned")
        .iter()
        .filter(|e| *e == entity)
        .count()
}

struct TestEntity {
    capacity: usize,
    max_idle: Duration,
}

impl EntityProtocol for TestEntity {
    const NAME: &'static str = "test";
    type Message = TestMsg;
    type Reply = i64;

    fn options(&self) -> EntityOptions {
        EntityOptions {
            mailbox_capacity: NonZeroUsize::new(self.capacity).expect("non-zero"),
            max_idle: self.max_idle,
            ..EntityOptions::default()
        }
    }

    fn is_persisted(message: &TestMsg) -> bool {
        matches!(message, TestMsg::Add { .. } | TestMsg::PanicFirst {})
    }
}

impl Entity for TestEntity {
    type State = i64;
    const PERSIST_STATE: bool = true;

    async fn handle(
        &self,
        ctx: &EntityContext,
        state: &mut i64,
        message: TestMsg,
    ) -> Result<i64, HandlerError> {
        HANDLED
            .lock()
            .expect("not poisoned")
            .push(ctx.address.entity_id.to_string());
        match message {
            TestMsg::Add { n } => *state += n,
            TestMsg::Get {} => {}
            TestMsg::Sleep { ms } => tokio::time::sleep(Duration::from_millis(ms)).await,
            TestMsg::PanicFirst {} => {
                assert!(ctx.attempts > 0, "first attempt of this message panics");
                *state += 1000;
            }
        }
        Ok(*state)
    }
}

const SHARDS: u32 = 4;

struct Fixture {
    runtime: EntityRuntime,
    storage: MemoryMessageStorage,
    ids: Snowflake,
    sharding: Sharding,
    counters: Arc<Counters>,
}

async fn fixture(capacity: usize, max_idle: Duration) -> Fixture {
    fixture_with(capacity, max_idle, Duration::ZERO).await
}

/// A fixture whose completions take `linger` more after they commit.
async fn fixture_with(capacity: usize, max_idle: Duration, linger: Duration) -> Fixture {
    fixture_config(capacity, max_idle, linger, |_| {}).await
}

/// A fixture with its runtime config adjusted by `tweak`.
async fn fixture_config(
    capacity: usize,
    max_idle: Duration,
    linger: Duration,
    tweak: impl FnOnce(&mut RuntimeConfig),
) -> Fixture {
    let f = unstarted(capacity, max_idle, linger, tweak);
    f.start().await;
    f
}

/// A fixture whose shards are not acquired yet (call [`Fixture::start`]).
fn unstarted(
    capacity: usize,
    max_idle: Duration,
    linger: Duration,
    tweak: impl FnOnce(&mut RuntimeConfig),
) -> Fixture {
    let storage = MemoryMessageStorage::new();
    let mut registry = EntityRegistry::new();
    registry
        .register(TestEntity { capacity, max_idle })
        .expect("registers")
        .register_concurrent(Wide)
        .expect("registers");
    let sharding = Sharding::new(NonZeroU32::new(SHARDS).expect("non-zero"));
    let (_tx, rx) = watch::channel(RunnerId::new(1).ok());
    let mut config = RuntimeConfig {
        sharding,
        scan_interval: Duration::from_millis(100),
        scan_grace: Duration::from_millis(200),
        restart_backoff: Duration::from_millis(20),
        ..RuntimeConfig::default()
    };
    tweak(&mut config);
    let counters = Arc::new(Counters::default());
    let runtime = EntityRuntime::new(
        registry,
        Arc::new(Lingering {
            inner: storage.clone(),
            linger,
            counters: counters.clone(),
        }),
        config,
        rx,
    );
    Fixture {
        runtime,
        storage,
        ids: Snowflake::new(1),
        sharding,
        counters,
    }
}

impl Fixture {
    /// Starts the sweep and acquires every shard under epoch 1.
    async fn start(&self) {
        tokio::spawn(
            self.runtime
                .clone()
                .sweep_backlog(tokio_util::sync::CancellationToken::new()),
        );
        for shard in self.sharding.all() {
            self.storage.set_epoch(shard, Epoch::new(1));
            self.runtime.acquired(shard, Epoch::new(1));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.runtime.shards().len() < SHARDS as usize {
            assert!(Instant::now() < deadline, "shards did not start");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn address(id: &str) -> EntityAddress {
    EntityAddress {
        entity_type: EntityType::new("test").expect("valid"),
        entity_id: EntityId::new(id).expect("valid"),
    }
}

impl Fixture {
    async fn persist(
        &self,
        entity: &str,
        tag: &str,
        payload: serde_json::Value,
        key: Option<&str>,
    ) -> (StoredMessage, bool) {
        self.persist_at(address(entity), tag, payload, key).await
    }

    async fn persist_at(
        &self,
        address: EntityAddress,
        tag: &str,
        payload: serde_json::Value,
        key: Option<&str>,
    ) -> (StoredMessage, bool) {
        let message = NewMessage {
            id: self.ids.next_id(),
            shard: self.sharding.shard_of(&address.entity_id),
            address,
            tag: tag.to_owned(),
            payload,
            idempotency_key: key.map(str::to_owned),
            deliver_at: None,
        };
        let outcome = self.storage.save(message.clone()).await.expect("saved");
        let duplicate = matches!(outcome, SaveOutcome::Duplicate { .. });
        let mut stored: StoredMessage = message.into();
        stored.id = outcome.id();
        (stored, duplicate)
    }

    async fn ask_persisted(
        &self,
        entity: &str,
        tag: &str,
        payload: serde_json::Value,
    ) -> Result<Reply, DeliveryError> {
        let (message, duplicate) = self.persist(entity, tag, payload, None).await;
        self.runtime
            .deliver(Delivery::Persisted { message, duplicate })
            .await
    }

    /// A persisted message to a `wide` entity.
    async fn ask_wide(
        &self,
        entity: &str,
        payload: serde_json::Value,
    ) -> Result<Reply, DeliveryError> {
        let (message, duplicate) = self.persist_at(wide(entity), "work", payload, None).await;
        self.runtime
            .deliver(Delivery::Persisted { message, duplicate })
            .await
    }

    async fn ask_volatile(
        &self,
        entity: &str,
        tag: &str,
        payload: serde_json::Value,
    ) -> Result<Reply, DeliveryError> {
        self.runtime
            .deliver(Delivery::Volatile {
                address: address(entity),
                tag: tag.to_owned(),
                payload,
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

#[tokio::test]
async fn persisted_messages_update_state_and_volatile_reads_it() {
    let f = fixture(8, Duration::from_secs(60)).await;
    assert_eq!(
        value(
            f.ask_persisted("a", "add", serde_json::json!({"n": 2}))
                .await
        ),
        2
    );
    assert_eq!(
        value(
            f.ask_persisted("a", "add", serde_json::json!({"n": 3}))
                .await
        ),
        5
    );
    assert_eq!(
        value(f.ask_volatile("a", "get", serde_json::json!({})).await),
        5
    );
    let stored = f.storage.load_state(&address("a")).await.expect("loads");
    assert_eq!(stored, Some(serde_json::json!(5)));
}

#[tokio::test]
async fn a_full_mailbox_refuses_volatile_and_keeps_persisted() {
    let f = Arc::new(fixture(2, Duration::from_secs(60)).await);
    // Two slow volatile requests fill the mailbox of "m".
    let mut slow = Vec::new();
    for _ in 0..2 {
        let f = f.clone();
        slow.push(tokio::spawn(async move {
            f.ask_volatile("m", "sleep", serde_json::json!({"ms": 300}))
                .await
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.runtime.entity_status(&address("m")).await.mailbox_depth < 2 {
        assert!(Instant::now() < deadline, "mailbox did not fill");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let refused = f.ask_volatile("m", "get", serde_json::json!({})).await;
    assert!(
        matches!(refused, Err(DeliveryError::MailboxFull(_))),
        "{refused:?}"
    );
    // A persisted message waits in storage and is processed once room frees.
    let persisted = f
        .ask_persisted("m", "add", serde_json::json!({"n": 7}))
        .await;
    assert_eq!(value(persisted), 7);
    for handle in slow {
        assert!(handle.await.expect("joins").is_ok());
    }
}

#[tokio::test]
async fn idle_entities_passivate_and_come_back_with_their_state() {
    let f = fixture(8, Duration::from_millis(100)).await;
    assert_eq!(
        value(
            f.ask_persisted("p", "add", serde_json::json!({"n": 4}))
                .await
        ),
        4
    );
    assert!(f.runtime.entity_status(&address("p")).await.resident);
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.runtime.entity_status(&address("p")).await.resident {
        assert!(Instant::now() < deadline, "entity was not passivated");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(f.runtime.resident(), 0);
    // Reactivation loads the persisted state.
    assert_eq!(
        value(f.ask_volatile("p", "get", serde_json::json!({})).await),
        4
    );
    assert_eq!(f.runtime.resident(), 1);
}

#[tokio::test]
async fn a_panicking_handler_restarts_its_entity_and_replays_the_message() {
    let f = fixture(8, Duration::from_secs(60)).await;
    assert_eq!(
        value(
            f.ask_persisted("x", "add", serde_json::json!({"n": 1}))
                .await
        ),
        1
    );
    // Panics on its first attempt; the entity restarts and the message is replayed.
    let replayed = f
        .ask_persisted("x", "panic_first", serde_json::json!({}))
        .await;
    assert_eq!(value(replayed), 1001);
    let status = f.runtime.entity_status(&address("x")).await;
    assert!(
        status
            .last_error
            .is_some_and(|e| e.contains("first attempt"))
    );
    // And the entity keeps working.
    assert_eq!(
        value(
            f.ask_persisted("x", "add", serde_json::json!({"n": 1}))
                .await
        ),
        1002
    );
}

#[tokio::test]
async fn duplicates_wait_for_the_first_message_and_run_it_once() {
    let f = Arc::new(fixture(8, Duration::from_secs(60)).await);
    let mut callers = Vec::new();
    for _ in 0..10 {
        let f = f.clone();
        callers.push(tokio::spawn(async move {
            let (message, duplicate) = f
                .persist("d", "add", serde_json::json!({"n": 5}), Some("once"))
                .await;
            f.runtime
                .deliver(Delivery::Persisted { message, duplicate })
                .await
        }));
    }
    for caller in callers {
        assert_eq!(value(caller.await.expect("joins")), 5);
    }
    assert_eq!(
        handled("d"),
        1,
        "ten callers with one key ran the handler once"
    );
    assert_eq!(
        value(f.ask_volatile("d", "get", serde_json::json!({})).await),
        5
    );
}

#[tokio::test]
async fn a_fenced_shard_completes_nothing() {
    let f = fixture(8, Duration::from_secs(60)).await;
    let (message, _) = f
        .persist("f", "add", serde_json::json!({"n": 1}), None)
        .await;
    // Another owner took the shard over.
    f.storage.set_epoch(message.shard, Epoch::new(2));
    let id = message.id;
    let result = f
        .runtime
        .deliver(Delivery::Persisted {
            message,
            duplicate: false,
        })
        .await;
    assert!(
        matches!(result, Err(DeliveryError::ShardMoving(_))),
        "{result:?}"
    );
    assert!(!f.storage.is_processed(id));
    assert_eq!(f.storage.reply(id).await.expect("reads"), None);
    assert_eq!(
        f.storage.load_state(&address("f")).await.expect("reads"),
        None
    );
}

#[tokio::test]
async fn unknown_types_and_bad_bodies_are_refused() {
    let f = fixture(8, Duration::from_secs(60)).await;
    let unknown = f
        .runtime
        .deliver(Delivery::Volatile {
            address: EntityAddress {
                entity_type: EntityType::new("nope").expect("valid"),
                entity_id: EntityId::new("a").expect("valid"),
            },
            tag: "get".to_owned(),
            payload: serde_json::json!({}),
        })
        .await;
    assert!(matches!(unknown, Err(DeliveryError::UnknownEntityType(_))));
    // A stored message whose body does not decode gets an error reply, once.
    let reply = f
        .ask_persisted("b", "add", serde_json::json!({"n": "not a number"}))
        .await;
    assert!(
        matches!(&reply, Ok(Reply::Err { code, .. }) if code == "bad_message"),
        "{reply:?}"
    );
}

/// A side-by-side entity: up to 3 `work` messages at once, counting how many ran together.
struct Wide;

#[derive(Default)]
struct WideState {
    running: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
enum WideMsg {
    /// Sleeps `ms`, then replies with the most handlers seen running at once. `panic_first`
    /// panics on the message's first delivery.
    Work {
        ms: u64,
        #[serde(default)]
        panic_first: bool,
    },
}

impl EntityProtocol for Wide {
    const NAME: &'static str = "wide";
    type Message = WideMsg;
    type Reply = usize;

    fn is_persisted(_: &WideMsg) -> bool {
        true
    }
}

impl crate::entity::ConcurrentEntity for Wide {
    type State = WideState;
    const CONCURRENCY: usize = 3;

    async fn handle(
        &self,
        ctx: &EntityContext,
        state: &WideState,
        message: WideMsg,
    ) -> Result<usize, HandlerError> {
        use std::sync::atomic::Ordering::SeqCst;
        let WideMsg::Work { ms, panic_first } = message;
        let now = state.running.fetch_add(1, SeqCst) + 1;
        state.most.fetch_max(now, SeqCst);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        state.running.fetch_sub(1, SeqCst);
        assert!(!panic_first || ctx.attempts > 0, "first delivery panics");
        Ok(state.most.load(SeqCst))
    }
}

fn wide(id: &str) -> EntityAddress {
    EntityAddress {
        entity_type: EntityType::new("wide").expect("valid"),
        entity_id: EntityId::new(id).expect("valid"),
    }
}

fn count(reply: Result<Reply, DeliveryError>) -> u64 {
    match reply {
        Ok(Reply::Ok { value }) => value.as_u64().expect("a count"),
        other => panic!("expected a count, got {other:?}"),
    }
}

#[tokio::test]
async fn a_concurrent_entity_runs_up_to_its_concurrency_at_once() {
    let f = Arc::new(fixture(8, Duration::from_secs(60)).await);
    let mut volatile = Vec::new();
    for _ in 0..7 {
        let f = f.clone();
        volatile.push(tokio::spawn(async move {
            f.runtime
                .deliver(Delivery::Volatile {
                    address: wide("w"),
                    tag: "work".to_owned(),
                    payload: serde_json::json!({"ms": 150}),
                })
                .await
        }));
    }
    let mut most = 0;
    for handle in volatile {
        most = most.max(count(handle.await.expect("joins")));
    }
    // Seven messages of 150 ms: three ran side by side, never a fourth.
    assert_eq!(most, 3);

    // Persisted ones too, each completed with its own reply.
    let mut persisted = Vec::new();
    for _ in 0..4 {
        let f = f.clone();
        persisted.push(tokio::spawn(async move {
            f.ask_wide("p", serde_json::json!({"ms": 100})).await
        }));
    }
    for handle in persisted {
        assert!(count(handle.await.expect("joins")) <= 3);
    }
    assert_eq!(
        f.storage.entity_backlog(&wide("p")).await.expect("reads").0,
        0
    );
}

#[tokio::test]
async fn a_concurrent_entity_wakes_from_sleep_with_the_state_its_handlers_shared() {
    let f = Arc::new(
        fixture_config(8, Duration::from_secs(60), Duration::ZERO, |config| {
            config.sleep_after = Duration::from_millis(50);
        })
        .await,
    );
    let mut asks = Vec::new();
    for _ in 0..3 {
        let f = f.clone();
        asks.push(tokio::spawn(async move {
            f.ask_wide("s", serde_json::json!({"ms": 150})).await
        }));
    }
    for handle in asks {
        count(handle.await.expect("joins"));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while f.runtime.awake() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "never fell asleep");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(f.runtime.resident(), 1);
    // One quick message after waking still sees the most that ever ran at once (3): the
    // state slept with the entity (a fresh one would say 1).
    assert_eq!(
        count(f.ask_wide("s", serde_json::json!({"ms": 1})).await),
        3
    );
}

#[tokio::test]
async fn a_panic_in_a_concurrent_handler_restarts_the_entity_and_replays_it() {
    let f = Arc::new(fixture(8, Duration::from_secs(60)).await);
    let boom = {
        let f = f.clone();
        tokio::spawn(async move {
            f.ask_wide("b", serde_json::json!({"ms": 10, "panic_first": true}))
                .await
        })
    };
    let fine = {
        let f = f.clone();
        tokio::spawn(async move { f.ask_wide("b", serde_json::json!({"ms": 10})).await })
    };
    // The panicking message runs again after the restart and succeeds; the other one is
    // replayed or had already completed. Both end with exactly one reply.
    assert!(count(boom.await.expect("joins")) >= 1);
    assert!(count(fine.await.expect("joins")) >= 1);
    assert!(
        f.runtime
            .entity_status(&wide("b"))
            .await
            .last_error
            .is_some_and(|e| e.contains("first delivery panics")),
        "the panic is reported"
    );
}

/// One-at-a-time types cannot name a concurrency and side-by-side types cannot keep their
/// state in Postgres (the traits have no such options); what is left to check at
/// registration is a concurrency of zero.
#[test]
fn a_concurrent_type_needs_a_concurrency_of_at_least_one() {
    struct Idle;
    impl EntityProtocol for Idle {
        const NAME: &'static str = "idle";
        type Message = WideMsg;
        type Reply = usize;
        fn is_persisted(_: &WideMsg) -> bool {
            true
        }
    }
    impl crate::entity::ConcurrentEntity for Idle {
        type State = WideState;
        const CONCURRENCY: usize = 0;
        async fn handle(
            &self,
            _: &EntityContext,
            _: &WideState,
            _: WideMsg,
        ) -> Result<usize, HandlerError> {
            Ok(0)
        }
    }
    let mut registry = EntityRegistry::new();
    let refused = registry.register_concurrent(Idle).expect_err("refused");
    assert!(refused.to_string().contains("CONCURRENCY"), "{refused}");
}

/// Memory storage whose completions return `linger` after they commit (a slow network),
/// counting scans.
#[derive(Debug)]
struct Lingering {
    inner: MemoryMessageStorage,
    linger: Duration,
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    /// Backlog scan pages read, and the rows they returned.
    scans: std::sync::atomic::AtomicUsize,
    rows: std::sync::atomic::AtomicUsize,
    /// Completions commit, then report an I/O error.
    fail_after_commit: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl MessageStorage for Lingering {
    async fn save(&self, message: NewMessage) -> Result<SaveOutcome, MessageStorageError> {
        self.inner.save(message).await
    }
    async fn unprocessed_after(
        &self,
        shard: ShardId,
        now: chrono::DateTime<chrono::Utc>,
        after: Option<MessageId>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, MessageStorageError> {
        let page = self
            .inner
            .unprocessed_after(shard, now, after, limit)
            .await?;
        self.counters.scans.fetch_add(1, Ordering::SeqCst);
        self.counters.rows.fetch_add(page.len(), Ordering::SeqCst);
        Ok(page)
    }
    async fn postpone(
        &self,
        id: MessageId,
        until: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), MessageStorageError> {
        self.inner.postpone(id, until).await
    }
    async fn next_due(
        &self,
        shard: ShardId,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, MessageStorageError> {
        self.inner.next_due(shard, now).await
    }
    async fn complete(
        &self,
        completion: Completion,
    ) -> Result<CompletionOutcome, MessageStorageError> {
        let outcome = self.inner.complete(completion).await;
        tokio::time::sleep(self.linger).await;
        if self.counters.fail_after_commit.load(Ordering::SeqCst) {
            return Err(MessageStorageError::Unavailable(
                "connection reset after commit".into(),
            ));
        }
        outcome
    }
    async fn shards_with_backlog(
        &self,
        shards: &[ShardId],
        created_before: MessageId,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<ShardId>, MessageStorageError> {
        self.inner
            .shards_with_backlog(shards, created_before, now)
            .await
    }
    async fn entity_backlog(
        &self,
        address: &EntityAddress,
    ) -> Result<(u64, Option<chrono::DateTime<chrono::Utc>>), MessageStorageError> {
        self.inner.entity_backlog(address).await
    }
    async fn checkpoint_state(
        &self,
        checkpoint: crate::message_storage::StateCheckpoint,
    ) -> Result<bool, MessageStorageError> {
        self.inner.checkpoint_state(checkpoint).await
    }
    async fn pending_with_key(
        &self,
        address: &EntityAddress,
        key: &str,
    ) -> Result<Option<StoredMessage>, MessageStorageError> {
        self.inner.pending_with_key(address, key).await
    }
    async fn record_attempts(&self, ids: &[MessageId]) -> Result<(), MessageStorageError> {
        self.inner.record_attempts(ids).await
    }
    async fn reply(&self, id: MessageId) -> Result<Option<Reply>, MessageStorageError> {
        self.inner.reply(id).await
    }
    async fn load_state(
        &self,
        address: &EntityAddress,
    ) -> Result<Option<serde_json::Value>, MessageStorageError> {
        self.inner.load_state(address).await
    }
    async fn purge(
        &self,
        before: chrono::DateTime<chrono::Utc>,
        limit: usize,
    ) -> Result<u64, MessageStorageError> {
        self.inner.purge(before, limit).await
    }
    async fn stats(&self) -> Result<crate::message_storage::StorageStats, MessageStorageError> {
        self.inner.stats().await
    }
}

#[tokio::test]
async fn a_sibling_failure_does_not_swallow_a_committed_reply() {
    // Completions return 300 ms after they commit; meanwhile a sibling handler panics and
    // the entity restarts. The committed message is never scanned again, so its caller is
    // answered only if the completion was not aborted with the failed entity.
    let f = Arc::new(fixture_with(8, Duration::from_secs(60), Duration::from_millis(300)).await);
    let committed = {
        let f = f.clone();
        tokio::spawn(async move { f.ask_wide("s", serde_json::json!({"ms": 10})).await })
    };
    let failing = {
        let f = f.clone();
        tokio::spawn(async move {
            f.ask_wide("s", serde_json::json!({"ms": 60, "panic_first": true}))
                .await
        })
    };
    let answered = tokio::time::timeout(Duration::from_secs(5), committed)
        .await
        .expect("the committed message's caller is answered");
    assert!(count(answered.expect("joins")) >= 1);
    assert!(count(failing.await.expect("joins")) >= 1);
}

/// Waits for `done` with a deadline, checking every few milliseconds.
async fn eventually(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_backlog_scan_pages_forward_and_never_rereads_a_page_it_cannot_deliver_from() {
    // 5,000 stored messages for 5,000 entities, slow handlers: the first page (1,000 rows)
    // is all in flight at once. No periodic sweep finds them (interval and grace of an
    // hour): only the acquisition scan runs.
    const BACKLOG: usize = 5_000;
    let f = unstarted(8, Duration::from_secs(60), Duration::ZERO, |c| {
        c.scan_interval = Duration::from_secs(3600);
        c.scan_grace = Duration::from_secs(3600);
    });
    let mut ids = Vec::new();
    for n in 0..BACKLOG {
        let (message, _) = f
            .persist(
                &format!("s{n}"),
                "sleep",
                serde_json::json!({"ms": 300}),
                None,
            )
            .await;
        ids.push(message.id);
    }
    f.start().await;
    eventually("every message completes", async || {
        ids.iter().all(|id| f.storage.is_processed(*id))
    })
    .await;
    let rows = f.counters.rows.load(Ordering::SeqCst);
    let scans = f.counters.scans.load(Ordering::SeqCst);
    // One pass per shard: 1,250 rows in a full page and the rest. A scan that re-read its
    // first page while it was in flight would read thousands of pages.
    assert!(rows <= 2 * BACKLOG, "{rows} rows read in {scans} scans");
    assert!(scans <= 4 * SHARDS as usize, "{scans} scans");
}

fn ghost(id: &str) -> EntityAddress {
    EntityAddress {
        entity_type: EntityType::new("ghost").expect("valid"),
        entity_id: EntityId::new(id).expect("valid"),
    }
}

#[tokio::test]
async fn a_stored_message_of_a_type_the_owner_lacks_waits_with_backoff_then_gets_an_error_reply() {
    let f = fixture_config(8, Duration::from_secs(60), Duration::ZERO, |c| {
        c.type_wait_backoff = Duration::from_millis(40);
    })
    .await;
    let (message, duplicate) = f
        .persist_at(ghost("g"), "boo", serde_json::json!({}), None)
        .await;
    let id = message.id;
    // The caller hears that it waits, retryably; the message stays stored.
    let answer = f
        .runtime
        .deliver(Delivery::Persisted { message, duplicate })
        .await;
    assert_eq!(
        answer,
        Err(DeliveryError::TypeNotDeployed("ghost".to_owned()))
    );
    assert!(answer.expect_err("refused").is_retryable());
    assert!(!f.storage.is_processed(id));
    let status = f.runtime.entity_status(&ghost("g")).await;
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("not deployed on this runner")),
        "{status:?}"
    );
    // Postponed in storage: not due, so neither scans nor readiness count it now.
    eventually("the message is postponed", async || {
        f.storage
            .unprocessed(
                f.sharding.shard_of(&ghost("g").entity_id),
                chrono::Utc::now(),
                100,
            )
            .await
            .expect("reads")
            .iter()
            .all(|m| m.id != id)
    })
    .await;
    // After the bounded attempts it is completed with the error the caller then reads.
    eventually("the message gets its final reply", async || {
        f.storage.is_processed(id)
    })
    .await;
    let reply = f.storage.reply(id).await.expect("reads");
    assert!(
        matches!(&reply, Some(Reply::Err { code, .. }) if code == "unknown_entity_type"),
        "{reply:?}"
    );
    let attempts = f.storage.attempts(id);
    assert_eq!(attempts, 5, "one attempt per backoff, not one per tick");
    let status = f.runtime.entity_status(&ghost("g")).await;
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("unknown_entity_type")),
        "{status:?}"
    );
}

#[tokio::test]
async fn a_message_given_up_on_by_a_fenced_owner_is_not_answered_with_an_unstored_reply() {
    let f = fixture(8, Duration::from_secs(60)).await;
    let (message, _) = f
        .persist("gu", "add", serde_json::json!({"n": 1}), None)
        .await;
    for _ in 0..5 {
        f.storage
            .record_attempts(&[message.id])
            .await
            .expect("counts");
    }
    let mut message = message;
    message.attempts = 5;
    // Another owner took the shard over: the give-up completion is refused.
    f.storage.set_epoch(message.shard, Epoch::new(2));
    let id = message.id;
    let answer = f
        .runtime
        .deliver(Delivery::Persisted {
            message,
            duplicate: false,
        })
        .await;
    assert!(
        matches!(answer, Err(DeliveryError::ShardMoving(_))),
        "{answer:?}"
    );
    assert_eq!(f.storage.reply(id).await.expect("reads"), None);
}

#[tokio::test]
async fn a_duplicate_whose_original_completed_elsewhere_gets_the_stored_reply() {
    let f = fixture(8, Duration::from_secs(60)).await;
    let (message, _) = f
        .persist("dup", "add", serde_json::json!({"n": 1}), Some("k"))
        .await;
    // An earlier owner completed it: this runtime never saw it.
    let stored = Reply::Ok {
        value: serde_json::json!(41),
    };
    f.storage
        .complete(Completion {
            message_id: message.id,
            shard: message.shard,
            epoch: Epoch::new(1),
            reply: stored.clone(),
            state: None,
            outbox: Vec::new(),
        })
        .await
        .expect("completes");
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        f.runtime.deliver(Delivery::Persisted {
            message,
            duplicate: true,
        }),
    )
    .await
    .expect("answered from storage, not parked until the caller's deadline");
    assert_eq!(answer, Ok(stored));
}

#[tokio::test]
async fn a_completion_that_committed_but_reported_an_error_answers_with_the_stored_reply() {
    let f = fixture(8, Duration::from_secs(60)).await;
    f.counters.fail_after_commit.store(true, Ordering::SeqCst);
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        f.ask_persisted("io", "add", serde_json::json!({"n": 3})),
    )
    .await
    .expect("answered from storage, not parked until the caller's deadline");
    assert_eq!(value(answer), 3);
}

#[tokio::test]
async fn a_shard_remembers_a_bounded_number_of_last_errors() {
    let f = fixture(8, Duration::from_secs(60)).await;
    let shard = ShardId::new(0);
    let failing: Vec<String> = (0..)
        .map(|n| format!("e{n}"))
        .filter(|id| {
            f.sharding
                .shard_of(&EntityId::new(id.as_str()).expect("valid"))
                == shard
        })
        .take(shard::LAST_ERRORS_PER_SHARD + 8)
        .collect();
    for id in &failing {
        // A volatile `panic_first` panics every time (volatile messages have no attempts).
        let failed = f
            .ask_volatile(id, "panic_first", serde_json::json!({}))
            .await;
        assert!(failed.is_err(), "{failed:?}");
        let entity = address(id);
        eventually("the failure is recorded", async || {
            f.runtime.entity_status(&entity).await.last_error.is_some()
        })
        .await;
    }
    let first = f.runtime.entity_status(&address(&failing[0])).await;
    assert_eq!(first.last_error, None, "the oldest entry was forgotten");
    let last = f
        .runtime
        .entity_status(&address(&failing[failing.len() - 1]))
        .await;
    assert!(last.last_error.is_some());
}

#[tokio::test]
async fn the_recent_reply_memory_stays_within_its_bytes_across_many_shards() {
    const BUDGET: usize = 32 * 1024;
    let mut registry = EntityRegistry::new();
    registry
        .register(TestEntity {
            capacity: 8,
            max_idle: Duration::from_secs(60),
        })
        .expect("registers");
    let sharding = Sharding::new(NonZeroU32::new(64).expect("non-zero"));
    let config = RuntimeConfig {
        sharding,
        recent_replies_bytes: BUDGET,
        ..RuntimeConfig::default()
    };
    let (runtime, storage) = EntityRuntime::standalone(registry, config).await;
    let ids = Snowflake::new(2);
    for n in 0..3_000 {
        let address = address(&format!("r{}", n % 500));
        let message = NewMessage {
            id: ids.next_id(),
            shard: sharding.shard_of(&address.entity_id),
            address,
            tag: "add".to_owned(),
            payload: serde_json::json!({"n": 1}),
            idempotency_key: None,
            deliver_at: None,
        };
        storage.save(message.clone()).await.expect("saved");
        let reply = runtime
            .deliver(Delivery::Persisted {
                message: message.into(),
                duplicate: false,
            })
            .await;
        assert!(matches!(reply, Ok(Reply::Ok { .. })), "{reply:?}");
        assert!(runtime.recent_replies_bytes() <= BUDGET);
    }
    // 3,000 replies over 64 shards: a count per shard (4,096) would have kept them all.
    assert!(runtime.recent_replies_bytes() > BUDGET / 2);
    assert!(runtime.shared.recent.len() < 3_000 / 4);
}
