//! Handlers that reach the cluster through their context: one runtime, in-memory storage,
//! and a real client routing to it over the in-process transport.

use std::num::NonZeroU32;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::client::{ClientConfig, ClientError, ClientParts, Request, ShoalClient};
use crate::entity::{Entity, EntityContext, EntityProtocol, HandlerError};
use crate::ids::{EntityId, EntityType};
use crate::message_storage::memory::MemoryMessageStorage;
use crate::runner_storage::memory::MemoryRunnerStorage;
use crate::runner_storage::{LockSession, RunnerRegistration, RunnerStorage};
use crate::transport::local::LocalTransport;

const SHARDS: u32 = 4;
const DEADLINE: Duration = Duration::from_secs(15);

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
enum CallMsg {
    /// Appends `value` (and when it was handled) to the state.
    Record { value: i64 },
    /// The state.
    Get {},
    /// Asks `to` to record `value` and answers with its reply.
    Ask { to: String, value: i64 },
    /// Asks its own entity.
    AskSelf {},
    /// Schedules `record {value}` to itself `after_ms` from now.
    Remind { after_ms: u64, value: i64 },
    /// Sends `record {value}` to `to`, records `value`, then fails retryably on the first
    /// attempt (on every attempt when `always`).
    SendThenFail {
        to: String,
        value: i64,
        always: bool,
    },
    /// Schedules `record {value}` to itself `after_ms` from now, then fails retryably on
    /// the first attempt.
    RemindThenFail { after_ms: u64, value: i64 },
    /// Sends `record {value}` to `to` for each of `values`, in order, in one handling.
    SendMany { to: String, values: Vec<i64> },
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Recorded {
    values: Vec<i64>,
    /// Wall-clock milliseconds at which each value was handled.
    at_ms: Vec<i64>,
}

/// One type with its state in storage (`calls`: sends ride on the completion), one without
/// (`calls_direct`: sends go out at once).
struct Caller<const PERSIST: bool>;

impl<const PERSIST: bool> Caller<PERSIST> {
    const fn name() -> &'static str {
        if PERSIST { "calls" } else { "calls_direct" }
    }
}

impl<const PERSIST: bool> EntityProtocol for Caller<PERSIST> {
    const NAME: &'static str = Self::name();
    type Message = CallMsg;
    type Reply = serde_json::Value;

    fn is_persisted(message: &CallMsg) -> bool {
        !matches!(message, CallMsg::Get {} | CallMsg::AskSelf {})
    }
}

impl<const PERSIST: bool> Entity for Caller<PERSIST> {
    type State = Recorded;
    const PERSIST_STATE: bool = PERSIST;

    async fn handle(
        &self,
        ctx: &EntityContext,
        state: &mut Recorded,
        message: CallMsg,
    ) -> Result<serde_json::Value, HandlerError> {
        let record = |value: i64| {
            let address = entity(Self::NAME, &ctx.address.entity_id.to_string());
            Request::persisted(address, "record", serde_json::json!({ "value": value }))
        };
        match message {
            CallMsg::Record { value } => {
                state.values.push(value);
                state.at_ms.push(chrono::Utc::now().timestamp_millis());
            }
            CallMsg::Get {} => {}
            CallMsg::Ask { to, value } => {
                let mut request = record(value);
                request.address = entity(Self::NAME, &to);
                return match ctx.ask(request).await? {
                    Reply::Ok { value } => Ok(value),
                    Reply::Err { code, message } => Err(HandlerError::permanent(code, message)),
                };
            }
            CallMsg::AskSelf {} => {
                ctx.ask(record(0)).await?;
            }
            CallMsg::Remind { after_ms, value } => {
                ctx.schedule_after(record(value), Duration::from_millis(after_ms))
                    .await?;
            }
            CallMsg::RemindThenFail { after_ms, value } => {
                ctx.schedule_after(record(value), Duration::from_millis(after_ms))
                    .await?;
                if ctx.attempts == 0 {
                    return Err(HandlerError::retryable("flaky", "fails after scheduling"));
                }
            }
            CallMsg::SendThenFail { to, value, always } => {
                let mut request = record(value);
                request.address = entity(Self::NAME, &to);
                ctx.send(request).await?;
                state.values.push(value);
                if always || ctx.attempts == 0 {
                    return Err(HandlerError::retryable("flaky", "fails after sending"));
                }
            }
            CallMsg::SendMany { to, values } => {
                for value in values {
                    let mut request = record(value);
                    request.address = entity(Self::NAME, &to);
                    ctx.send(request).await?;
                }
            }
        }
        Ok(serde_json::to_value(&*state).expect("serializes"))
    }
}

fn entity(entity_type: &str, id: &str) -> EntityAddress {
    EntityAddress {
        entity_type: EntityType::new(entity_type).expect("valid"),
        entity_id: EntityId::new(id).expect("valid"),
    }
}

struct Cluster {
    runtime: EntityRuntime,
    storage: MemoryMessageStorage,
    client: ShoalClient,
    /// Keeps the runner registered (its session ends when dropped).
    _session: Box<dyn LockSession>,
}

/// A runtime owning every shard, connected to a client that routes to it in process.
async fn cluster() -> Cluster {
    let storage = MemoryMessageStorage::new();
    let mut registry = EntityRegistry::new();
    registry
        .register(Caller::<true>)
        .expect("registers")
        .register(Caller::<false>)
        .expect("registers");
    let sharding = Sharding::new(NonZeroU32::new(SHARDS).expect("non-zero"));
    let (_tx, rx) = watch::channel(RunnerId::new(1).ok());
    let config = RuntimeConfig {
        sharding,
        scan_interval: Duration::from_millis(100),
        scan_grace: Duration::from_millis(200),
        restart_backoff: Duration::from_millis(20),
        ..RuntimeConfig::default()
    };
    let runtime = EntityRuntime::new(registry, Arc::new(storage.clone()), config, rx);
    let runners = MemoryRunnerStorage::new();
    runners.ensure_cluster(SHARDS).await.expect("cluster");
    let registration = RunnerRegistration {
        address: "local".to_owned(),
        version: "test".to_owned(),
    };
    let session = runners.register(&registration).await.expect("registers");
    let transport = LocalTransport::new();
    transport.add("local", runtime.clone());
    let client = ShoalClient::start(
        ClientParts {
            sharding,
            runners: Arc::new(runners),
            messages: Arc::new(storage.clone()),
            transport: Arc::new(transport),
            machine_id: 2,
            config: ClientConfig {
                default_timeout: Duration::from_secs(10),
                ..ClientConfig::default()
            },
        },
        CancellationToken::new(),
    );
    assert!(client.wait_for_runners(DEADLINE).await, "no routing");
    assert!(runtime.connect(client.clone()));
    tokio::spawn(runtime.clone().sweep_backlog(CancellationToken::new()));
    for shard in sharding.all() {
        storage.set_epoch(shard, Epoch::new(1));
        runtime.acquired(shard, Epoch::new(1));
    }
    let deadline = Instant::now() + DEADLINE;
    while runtime.shards().len() < SHARDS as usize {
        assert!(Instant::now() < deadline, "shards did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Cluster {
        runtime,
        storage,
        client,
        _session: session,
    }
}

impl Cluster {
    async fn ask(&self, to: EntityAddress, message: serde_json::Value) -> Reply {
        let (tag, payload) = match message {
            serde_json::Value::Object(map) => map.into_iter().next().expect("one message"),
            other => panic!("not a message: {other}"),
        };
        let request = if tag == "get" || tag == "ask_self" {
            Request::volatile(to, tag, payload)
        } else {
            Request::persisted(to, tag, payload)
        };
        self.client.ask(request).await.expect("answered")
    }

    async fn state(&self, of: &EntityAddress) -> Recorded {
        match self.ask(of.clone(), serde_json::json!({"get": {}})).await {
            Reply::Ok { value } => serde_json::from_value(value).expect("state"),
            other => panic!("get failed: {other:?}"),
        }
    }

    /// Waits until `of` has recorded something, or the deadline.
    async fn recorded(&self, of: &EntityAddress) -> Recorded {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let state = self.state(of).await;
            if !state.values.is_empty() {
                return state;
            }
            assert!(Instant::now() < deadline, "{of} recorded nothing in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stored `record` messages to `of`.
    fn records_to(&self, of: &EntityAddress) -> usize {
        let messages = self.storage.messages_of(of);
        messages.iter().filter(|m| m.tag == "record").count()
    }
}

#[tokio::test]
async fn a_handler_asks_another_entity_and_gets_its_reply() {
    let c = cluster().await;
    let (a, b) = (entity("calls", "a"), entity("calls", "b"));
    let reply = c
        .ask(
            a.clone(),
            serde_json::json!({"ask": {"to": "b", "value": 7}}),
        )
        .await;
    let Reply::Ok { value } = reply else {
        panic!("the ask failed: {reply:?}");
    };
    let answered: Recorded = serde_json::from_value(value).expect("b's state");
    assert_eq!(answered.values, vec![7], "a answers with b's reply");
    assert_eq!(c.state(&b).await.values, vec![7]);
    // The ask was persisted under the key derived from a's message.
    let asked = c.storage.messages_of(&b);
    let key = asked[0].idempotency_key.as_deref().expect("a derived key");
    assert!(key.ends_with("/0"), "{key}");
    assert!(c.state(&a).await.values.is_empty());
}

#[tokio::test]
async fn an_entity_asking_itself_is_refused_at_once() {
    let c = cluster().await;
    let started = Instant::now();
    let reply = c
        .ask(entity("calls", "a"), serde_json::json!({"ask_self": {}}))
        .await;
    match reply {
        Reply::Err { code, message } => {
            assert_eq!(code, "self_ask");
            assert!(message.contains("asked itself"), "{message}");
        }
        other => panic!("a self-ask must fail: {other:?}"),
    }
    // Refused, not waited out (the client's deadline is 10 s).
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let retry = ClientError::SelfAsk(entity("calls", "a")).retry_class();
    assert_eq!(retry, crate::retry::RetryClass::Never);
}

#[tokio::test]
async fn a_message_scheduled_to_itself_arrives_once_and_not_before_its_time() {
    let c = cluster().await;
    for entity_type in ["calls", "calls_direct"] {
        let me = entity(entity_type, "timer");
        let asked_ms = chrono::Utc::now().timestamp_millis();
        let reply = c
            .ask(
                me.clone(),
                serde_json::json!({"remind": {"after_ms": 2000, "value": 5}}),
            )
            .await;
        assert!(matches!(reply, Reply::Ok { .. }), "{reply:?}");
        assert!(c.state(&me).await.values.is_empty(), "not yet");
        let state = c.recorded(&me).await;
        assert_eq!(state.values, vec![5], "{entity_type}");
        let late = state.at_ms[0] - asked_ms;
        assert!(
            late >= 2000,
            "{entity_type}: delivered {late} ms after asking"
        );
        assert!(
            late < 2000 + 1500,
            "{entity_type}: {late} ms is past the scan tick"
        );
        // Stored once, processed once: no scan or push runs it again.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(c.state(&me).await.values, vec![5], "{entity_type}");
        assert_eq!(c.records_to(&me), 1, "{entity_type}");
    }
}

#[tokio::test]
async fn a_replayed_handler_schedules_once() {
    let c = cluster().await;
    for entity_type in ["calls", "calls_direct"] {
        let me = entity(entity_type, "replayed-timer");
        let asked_ms = chrono::Utc::now().timestamp_millis();
        // The first attempt schedules, then fails; the replay schedules again and succeeds.
        let reply = c
            .ask(
                me.clone(),
                serde_json::json!({"remind_then_fail": {"after_ms": 1000, "value": 8}}),
            )
            .await;
        assert!(matches!(reply, Reply::Ok { .. }), "{reply:?}");
        let state = c.recorded(&me).await;
        assert_eq!(state.values, vec![8], "{entity_type}");
        assert!(state.at_ms[0] - asked_ms >= 1000, "{entity_type}: early");
        assert_eq!(c.records_to(&me), 1, "{entity_type}: scheduled once");
    }
}

#[tokio::test]
async fn a_replayed_handler_sends_once() {
    let c = cluster().await;
    for entity_type in ["calls", "calls_direct"] {
        let sender = entity(entity_type, "flaky");
        let sink = entity(entity_type, "sink");
        let message =
            serde_json::json!({"send_then_fail": {"to": "sink", "value": 3, "always": false}});
        // The first attempt sends, then fails; the replay sends again and succeeds.
        let reply = c.ask(sender.clone(), message).await;
        assert!(matches!(reply, Reply::Ok { .. }), "{reply:?}");
        assert_eq!(c.recorded(&sink).await.values, vec![3], "{entity_type}");
        assert_eq!(c.records_to(&sink), 1, "{entity_type}: sent once");
        let sent = c.storage.messages_of(&sink);
        let key = sent[0].idempotency_key.as_deref().expect("derived key");
        assert!(key.ends_with("/0"), "{key}");
    }
}

#[tokio::test]
async fn a_handler_that_never_commits_sends_nothing_from_its_outbox() {
    let c = cluster().await;
    let (sender, sink) = (entity("calls", "doomed"), entity("calls", "sink2"));
    let message =
        serde_json::json!({"send_then_fail": {"to": "sink2", "value": 9, "always": true}});
    let request = match message {
        serde_json::Value::Object(map) => {
            let (tag, payload) = map.into_iter().next().expect("one");
            Request::persisted(sender.clone(), tag, payload)
        }
        _ => unreachable!(),
    };
    // Every attempt fails after sending; the runtime gives up with an error reply.
    let reply = c.client.ask(request).await.expect("answered");
    assert!(matches!(reply, Reply::Err { .. }), "{reply:?}");
    assert_eq!(
        c.records_to(&sink),
        0,
        "an uncommitted handler's sends are not written"
    );
    assert!(c.state(&sink).await.values.is_empty());
    // The type without stored state sent at once, once under its derived key.
    let (direct, direct_sink) = (
        entity("calls_direct", "doomed"),
        entity("calls_direct", "sink2"),
    );
    let request = Request::persisted(
        direct,
        "send_then_fail",
        serde_json::json!({"to": "sink2", "value": 9, "always": true}),
    );
    let reply = c.client.ask(request).await.expect("answered");
    assert!(matches!(reply, Reply::Err { .. }), "{reply:?}");
    assert_eq!(
        c.records_to(&direct_sink),
        1,
        "sent at once, deduplicated across attempts"
    );
    drop(c.runtime);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handlers_sends_to_one_entity_arrive_in_the_order_sent() {
    let c = cluster().await;
    let sent: Vec<i64> = (0..200).collect();
    for entity_type in ["calls", "calls_direct"] {
        let (sender, sink) = (entity(entity_type, "burst"), entity(entity_type, "ordered"));
        let message = serde_json::json!({"send_many": {"to": "ordered", "values": sent}});
        let reply = c.ask(sender, message).await;
        assert!(matches!(reply, Reply::Ok { .. }), "{reply:?}");
        let deadline = Instant::now() + DEADLINE;
        let state = loop {
            let state = c.state(&sink).await;
            if state.values.len() >= sent.len() {
                break state;
            }
            assert!(Instant::now() < deadline, "{entity_type}: {state:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(state.values, sent, "{entity_type}: handled out of order");
    }
}
