//! Typed calls through a real [`ShoalClient`] over the in-process transport, to a runtime on
//! memory storage that owns every shard.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::client::{ClientConfig, ClientError, ClientParts, ShoalClient};
use crate::entity::{Entity, EntityContext, EntityProtocol, EntityRegistry, HandlerError};
use crate::entity_runtime::{EntityRuntime, RuntimeConfig};
use crate::message_storage::memory::MemoryMessageStorage;
use crate::message_storage::{MessageStorage, Reply};
use crate::runner_storage::memory::MemoryRunnerStorage;
use crate::runner_storage::{LockSession, RunnerRegistration, RunnerStorage};
use crate::sharding::Sharding;
use crate::transport::local::LocalTransport;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum LedgerMessage {
    /// Persisted: adds `n`.
    Add { n: i64 },
    /// Volatile: reads the total.
    Get {},
    /// Volatile: answers with a final error.
    Refuse {},
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
struct LedgerReply {
    total: i64,
}

struct Ledger;

impl EntityProtocol for Ledger {
    const NAME: &'static str = "ledger";
    type Message = LedgerMessage;
    type Reply = LedgerReply;

    fn is_persisted(message: &LedgerMessage) -> bool {
        matches!(message, LedgerMessage::Add { .. })
    }
}

impl Entity for Ledger {
    type State = i64;
    const PERSIST_STATE: bool = true;

    async fn handle(
        &self,
        _: &EntityContext,
        total: &mut i64,
        message: LedgerMessage,
    ) -> Result<LedgerReply, HandlerError> {
        match message {
            LedgerMessage::Add { n } => *total += n,
            LedgerMessage::Get {} => {}
            LedgerMessage::Refuse {} => {
                return Err(HandlerError::permanent("refused", "this ledger says no"));
            }
        }
        Ok(LedgerReply { total: *total })
    }
}

/// A caller built against a later version of `ledger`, whose reply has a field the
/// runner's version does not send.
struct LedgerV2;

#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
struct LedgerReplyV2 {
    total: i64,
    owner: String,
}

impl EntityProtocol for LedgerV2 {
    const NAME: &'static str = "ledger";
    type Message = LedgerMessage;
    type Reply = LedgerReplyV2;

    fn is_persisted(message: &LedgerMessage) -> bool {
        Ledger::is_persisted(message)
    }
}

struct Cluster {
    client: ShoalClient,
    storage: MemoryMessageStorage,
    _session: Box<dyn LockSession>,
    _stop: tokio_util::sync::DropGuard,
}

/// One runtime hosting `ledger`, reachable at `local`, and a client routing to it.
async fn cluster() -> Cluster {
    let sharding = Sharding::new(NonZeroU32::new(4).expect("non-zero"));
    let mut registry = EntityRegistry::new();
    registry.register(Ledger).expect("registers");
    let config = RuntimeConfig {
        sharding,
        ..RuntimeConfig::default()
    };
    let (runtime, storage) = EntityRuntime::standalone(registry, config).await;
    let transport = LocalTransport::new();
    transport.add("local", runtime);
    let runners = MemoryRunnerStorage::new();
    let session = runners
        .register(&RunnerRegistration {
            address: "local".to_owned(),
            version: "test".to_owned(),
        })
        .await
        .expect("registers");
    let stop = CancellationToken::new();
    let client = ShoalClient::start(
        ClientParts {
            sharding,
            runners: Arc::new(runners),
            messages: Arc::new(storage.clone()),
            transport: Arc::new(transport),
            machine_id: 2,
            config: ClientConfig::default(),
        },
        stop.clone(),
    );
    assert!(client.wait_for_runners(Duration::from_secs(5)).await);
    Cluster {
        client,
        storage,
        _session: session,
        _stop: stop.drop_guard(),
    }
}

#[tokio::test]
async fn typed_asks_and_sends_round_trip_persisted_and_volatile() {
    let c = cluster().await;
    let ledger = c.client.entity::<Ledger>("books");
    let reply = ledger.ask(LedgerMessage::Add { n: 2 }).await.expect("asks");
    assert_eq!(reply, LedgerReply { total: 2 });

    let id = ledger
        .send(LedgerMessage::Add { n: 3 })
        .await
        .expect("sends");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let stored = loop {
        if let Some(reply) = c.client.reply_of(id).await.expect("reads") {
            break reply;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sent message ran"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        stored,
        Reply::Ok {
            value: serde_json::json!({"total": 5})
        }
    );

    // Volatile: read from memory, nothing stored for it.
    let read = ledger.ask(LedgerMessage::Get {}).await.expect("asks");
    assert_eq!(read, LedgerReply { total: 5 });
    let address = ledger.address().expect("valid").clone();
    assert_eq!(
        c.storage.load_state(&address).await.expect("loads"),
        Some(serde_json::json!(5))
    );

    // A key deduplicates: the second ask reads the first one's reply.
    let keyed = ledger.clone().with_key("once");
    let first = keyed.ask(LedgerMessage::Add { n: 10 }).await.expect("asks");
    let again = keyed.ask(LedgerMessage::Add { n: 10 }).await.expect("asks");
    assert_eq!((first.total, again.total), (15, 15));
    let read = ledger.ask(LedgerMessage::Get {}).await.expect("asks");
    assert_eq!(read.total, 15);
}

#[tokio::test]
async fn a_scheduled_typed_message_runs_no_earlier_than_asked() {
    let c = cluster().await;
    let ledger = c.client.entity::<Ledger>("later");
    let started = tokio::time::Instant::now();
    let reply = ledger
        .clone()
        .after(Duration::from_millis(400))
        .with_timeout(Duration::from_secs(10))
        .ask(LedgerMessage::Add { n: 1 })
        .await
        .expect("asks");
    assert_eq!(reply.total, 1);
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "ran after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_error_reply_and_an_undecodable_reply_are_client_errors() {
    let c = cluster().await;
    let refused = c
        .client
        .entity::<Ledger>("strict")
        .ask(LedgerMessage::Refuse {})
        .await
        .expect_err("refused");
    let ClientError::ErrorReply { code, message } = &refused else {
        panic!("expected an error reply, got {refused:?}");
    };
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("refused", "this ledger says no")
    );
    assert!(!refused.is_retryable());

    let undecodable = c
        .client
        .entity::<LedgerV2>("strict")
        .ask(LedgerMessage::Get {})
        .await
        .expect_err("does not decode");
    let ClientError::BadReply {
        entity_type,
        problem,
    } = &undecodable
    else {
        panic!("expected a bad reply, got {undecodable:?}");
    };
    assert_eq!(entity_type.as_str(), "ledger");
    assert!(problem.contains("owner"), "{problem}");
}

#[tokio::test]
async fn requests_a_typed_handle_cannot_make_are_refused_before_sending() {
    let c = cluster().await;
    let bad_id = c
        .client
        .entity::<Ledger>("tab\tin the id")
        .ask(LedgerMessage::Get {})
        .await
        .expect_err("refused");
    assert!(
        matches!(&bad_id, ClientError::InvalidRequest(m) if m.contains("entity id")),
        "{bad_id:?}"
    );
    let ledger = c.client.entity::<Ledger>("rules");
    let scheduled_volatile = ledger
        .clone()
        .after(Duration::from_secs(1))
        .ask(LedgerMessage::Get {})
        .await
        .expect_err("refused");
    assert!(
        matches!(&scheduled_volatile, ClientError::InvalidRequest(m) if m.contains("volatile")),
        "{scheduled_volatile:?}"
    );
    let sent_volatile = ledger
        .send(LedgerMessage::Get {})
        .await
        .expect_err("refused");
    assert!(
        matches!(&sent_volatile, ClientError::InvalidRequest(m) if m.contains("send")),
        "{sent_volatile:?}"
    );
}

#[tokio::test]
async fn a_typed_request_is_the_request_the_gateway_builds() {
    let c = cluster().await;
    let request = c
        .client
        .entity::<Ledger>("wire")
        .with_key("k1")
        .request(&LedgerMessage::Add { n: 2 })
        .expect("builds");
    assert_eq!(request.tag, "add");
    assert_eq!(request.payload, serde_json::json!({"n": 2}));
    assert!(request.persisted);
    assert_eq!(request.idempotency_key.as_deref(), Some("k1"));
    assert_eq!(request.address.to_string(), "ledger/wire");
}
