//! The HTTP/2 transport against a real runtime served on a local port.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::*;
use crate::entity::{Entity, EntityContext, EntityProtocol, EntityRegistry, HandlerError};
use crate::entity_runtime::{EntityRuntime, RuntimeConfig};
use crate::ids::{EntityId, EntityType};
use crate::sharding::Sharding;
use crate::transport::ENVELOPE_VERSION;

const SECRET: &str = "the-secret";

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
enum SleepyMsg {
    /// Replies `ms` after sleeping that long.
    Sleep { ms: u64 },
}

struct Sleepy;

impl EntityProtocol for Sleepy {
    const NAME: &'static str = "sleepy";
    type Message = SleepyMsg;
    type Reply = u64;

    fn is_persisted(_message: &SleepyMsg) -> bool {
        false
    }
}

impl Entity for Sleepy {
    type State = ();

    async fn handle(
        &self,
        _ctx: &EntityContext,
        _state: &mut (),
        message: SleepyMsg,
    ) -> Result<u64, HandlerError> {
        let SleepyMsg::Sleep { ms } = message;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(ms)
    }
}

/// HTTP requests that reached a test runner, by path.
#[derive(Debug, Default)]
struct Requests {
    batch: AtomicUsize,
    single: AtomicUsize,
}

impl Requests {
    fn count(&self, path: &str) {
        match path {
            DELIVER_BATCH_PATH => self.batch.fetch_add(1, Ordering::SeqCst),
            DELIVER_PATH => self.single.fetch_add(1, Ordering::SeqCst),
            _ => 0,
        };
    }

    fn batches(&self) -> usize {
        self.batch.load(Ordering::SeqCst)
    }

    fn singles(&self) -> usize {
        self.single.load(Ordering::SeqCst)
    }
}

/// A runtime owning every shard, served at the returned address. With `batch_route: false`
/// it answers the batch route with 404, as a runner from before batching does.
async fn serve(batch_route: bool) -> (String, Arc<Requests>) {
    let mut registry = EntityRegistry::new();
    registry.register(Sleepy).expect("registers");
    let config = RuntimeConfig {
        sharding: Sharding::new(NonZeroU32::new(4).expect("non-zero")),
        ..RuntimeConfig::default()
    };
    let (runtime, _) = EntityRuntime::standalone(registry, config).await;
    let requests = Arc::new(Requests::default());
    let counted = requests.clone();
    let app = router(runtime, SECRET.to_owned()).layer(axum::middleware::from_fn(
        move |request: Request, next: Next| {
            let counted = counted.clone();
            async move {
                counted.count(request.uri().path());
                if !batch_route && request.uri().path() == DELIVER_BATCH_PATH {
                    return StatusCode::NOT_FOUND.into_response();
                }
                next.run(request).await
            }
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let address = listener.local_addr().expect("bound").to_string();
    tokio::spawn(async move { axum::serve(without_nagle(listener), app).await });
    (address, requests)
}

fn sleep_envelope(entity: &str, ms: u64) -> Envelope {
    Envelope {
        version: ENVELOPE_VERSION,
        entity_type: EntityType::new("sleepy").expect("valid"),
        entity_id: EntityId::new(entity).expect("valid"),
        tag: "sleep".to_owned(),
        payload: serde_json::json!({ "ms": ms }),
        persisted: None,
        request_id: None,
    }
}

fn value(reply: Result<Reply, TransportError>) -> u64 {
    match reply {
        Ok(Reply::Ok { value }) => value.as_u64().expect("a number"),
        other => panic!("expected a reply, got {other:?}"),
    }
}

#[tokio::test]
async fn a_batch_streams_each_answer_as_it_finishes() {
    let (address, _) = serve(true).await;
    let mut unknown = sleep_envelope("c", 0);
    unknown.entity_type = EntityType::new("nobody").expect("valid");
    let batch = DeliveryBatch {
        items: vec![
            BatchItem {
                timeout_ms: 10_000,
                envelope: sleep_envelope("a", 600),
            },
            BatchItem {
                timeout_ms: 10_000,
                envelope: sleep_envelope("b", 0),
            },
            BatchItem {
                timeout_ms: 10_000,
                envelope: unknown,
            },
        ],
    };
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let started = Instant::now();
    let mut response = client
        .post(format!("http://{address}{DELIVER_BATCH_PATH}"))
        .header(SECRET_HEADER, SECRET)
        .json(&batch)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::OK);
    let mut answers: Vec<(BatchAnswer, Duration)> = Vec::new();
    let mut buffer = Vec::new();
    while let Some(chunk) = response.chunk().await.expect("reads") {
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let answer = serde_json::from_slice(&line).expect("an answer line");
            answers.push((answer, started.elapsed()));
        }
    }
    let order: Vec<usize> = answers.iter().map(|(a, _)| a.index).collect();
    assert_eq!(
        order.last(),
        Some(&0),
        "the slow envelope answers last: {order:?}"
    );
    let fast = answers
        .iter()
        .find(|(a, _)| a.index == 1)
        .expect("answered");
    assert_eq!(fast.0.reply, Some(Reply::Ok { value: 0.into() }));
    assert!(
        fast.1 < Duration::from_millis(600),
        "the fast answer waited for the slow one ({:?})",
        fast.1
    );
    let refused = answers
        .iter()
        .find(|(a, _)| a.index == 2)
        .expect("answered");
    assert_eq!(
        refused.0.error,
        Some(DeliveryError::UnknownEntityType("nobody".to_owned()))
    );
}

#[tokio::test]
async fn the_batch_route_refuses_a_wrong_secret() {
    let (address, _) = serve(true).await;
    let refused = HttpTransport::new("not-the-secret")
        .expect("client")
        .deliver(&address, sleep_envelope("a", 0), Duration::from_secs(5))
        .await;
    assert_eq!(refused, Err(TransportError::Unauthorized(address.clone())));
    let raw = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client")
        .post(format!("http://{address}{DELIVER_BATCH_PATH}"))
        .json(&DeliveryBatch { items: Vec::new() })
        .send()
        .await
        .expect("sent");
    assert_eq!(raw.status(), StatusCode::UNAUTHORIZED);
}

/// Delivers `n` envelopes at once (`i` → entity, sleep); returns each `i` with its reply.
async fn deliver_all(
    transport: &HttpTransport,
    address: &str,
    n: u64,
    envelope: impl Fn(u64) -> (String, u64),
) -> Vec<(u64, Result<Reply, TransportError>)> {
    let sends = (0..n).map(|i| {
        let (entity, ms) = envelope(i);
        async move {
            let reply = transport
                .deliver(
                    address,
                    sleep_envelope(&entity, ms),
                    Duration::from_secs(10),
                )
                .await;
            (i, reply)
        }
    });
    futures::future::join_all(sends).await
}

#[tokio::test]
async fn concurrent_deliveries_to_one_runner_share_requests() {
    let (address, requests) = serve(true).await;
    let transport = HttpTransport::new(SECRET).expect("client");
    let replies = deliver_all(&transport, &address, 300, |i| {
        (format!("e{}", i % 50), i % 3)
    });
    for (i, reply) in replies.await {
        assert_eq!(value(reply), i % 3);
    }
    assert_eq!(requests.singles(), 0);
    let sent = requests.batches();
    assert!(
        sent <= 60,
        "300 concurrent deliveries took {sent} requests; batching should need far fewer"
    );
}

#[tokio::test]
async fn a_runner_without_the_batch_route_gets_one_request_per_envelope() {
    let (address, requests) = serve(false).await;
    let transport = HttpTransport::new(SECRET).expect("client");
    for (i, reply) in deliver_all(&transport, &address, 20, |i| (format!("e{i}"), i)).await {
        assert_eq!(value(reply), i);
    }
    // The first batches were refused (nothing ran), then every envelope went on its own,
    // once; later deliveries go singly at once.
    assert_eq!(requests.singles(), 20);
    let refused = requests.batches();
    assert!((1..=2).contains(&refused), "{refused} batches were tried");
    let again = transport
        .deliver(&address, sleep_envelope("late", 1), Duration::from_secs(10))
        .await;
    assert_eq!(value(again), 1);
    assert_eq!(requests.batches(), refused);
    assert_eq!(requests.singles(), 21);
}

#[tokio::test]
async fn slow_handlers_do_not_hold_up_other_deliveries() {
    let (address, _) = serve(true).await;
    let transport = HttpTransport::new(SECRET).expect("client");
    let slow = |entity: &'static str| {
        let transport = transport.clone();
        let address = address.clone();
        tokio::spawn(async move {
            transport
                .deliver(
                    &address,
                    sleep_envelope(entity, 3_000),
                    Duration::from_secs(10),
                )
                .await
        })
    };
    // Each takes one of the two sending slots, and would keep it for 3 s.
    let first = slow("slow-1");
    let second = slow("slow-2");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let fast = transport
        .deliver(&address, sleep_envelope("fast", 0), Duration::from_secs(10))
        .await;
    assert_eq!(value(fast), 0);
    assert!(
        !first.is_finished() && !second.is_finished(),
        "the fast delivery waited for the slow ones"
    );
    assert_eq!(value(first.await.expect("joins")), 3_000);
    assert_eq!(value(second.await.expect("joins")), 3_000);
}

#[tokio::test]
async fn a_bad_envelope_fails_alone() {
    let (address, _) = serve(true).await;
    let good = serde_json::to_value(BatchItem {
        timeout_ms: 5_000,
        envelope: sleep_envelope("a", 0),
    })
    .expect("encodes");
    let body =
        serde_json::json!({ "items": [good, { "timeout_ms": 5000, "envelope": { "tag": 7 } }] });
    let response = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client")
        .post(format!("http://{address}{DELIVER_BATCH_PATH}"))
        .header(SECRET_HEADER, SECRET)
        .json(&body)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.expect("reads");
    let mut answers: Vec<BatchAnswer> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("an answer line"))
        .collect();
    answers.sort_by_key(|a| a.index);
    assert_eq!(answers.len(), 2);
    assert_eq!(answers[0].reply, Some(Reply::Ok { value: 0.into() }));
    assert!(
        matches!(&answers[1].error, Some(DeliveryError::BadMessage(m)) if m.contains("envelope 1")),
        "{:?}",
        answers[1]
    );
}

/// Forwards one TCP connection to `upstream` until the returned handle is aborted, which
/// drops both sockets.
async fn proxy(upstream: String) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let address = listener.local_addr().expect("bound").to_string();
    let task = tokio::spawn(async move {
        let (mut inbound, _) = listener.accept().await.expect("accepts");
        let mut outbound = tokio::net::TcpStream::connect(upstream)
            .await
            .expect("connects");
        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
    });
    (address, task)
}

#[tokio::test]
async fn a_connection_lost_mid_batch_is_reported_lost() {
    let (address, _) = serve(true).await;
    let (via, proxy) = proxy(address).await;
    let transport = HttpTransport::new(SECRET).expect("client");
    let pending = {
        let transport = transport.clone();
        let via = via.clone();
        tokio::spawn(async move {
            transport
                .deliver(&via, sleep_envelope("a", 2_000), Duration::from_secs(10))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.abort();
    let lost = pending.await.expect("joins");
    assert!(
        matches!(lost, Err(TransportError::Lost { .. })),
        "it was sent, so it may have run: {lost:?}"
    );
    // The peer is gone (the proxy no longer listens). A delivery sent after the failure was
    // seen must not be written into the dead connection: it finds nobody, which is safe.
    for round in 0..20 {
        let next = transport
            .deliver(&via, sleep_envelope("b", 0), Duration::from_secs(2))
            .await;
        assert!(
            matches!(next, Err(TransportError::Unreachable { .. })),
            "round {round}: nothing can have run it: {next:?}"
        );
    }
}

/// Forwards one TCP connection to `upstream` and then listens no more; once `freeze` fires
/// it stops forwarding but keeps both sockets open, like a hung runner's.
async fn freezable_proxy(upstream: String) -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let address = listener.local_addr().expect("bound").to_string();
    let (freeze, frozen) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut inbound, _) = listener.accept().await.expect("accepts");
        drop(listener);
        let mut outbound = tokio::net::TcpStream::connect(upstream)
            .await
            .expect("connects");
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
            _ = frozen => std::future::pending::<()>().await,
        }
    });
    (address, freeze)
}

#[tokio::test]
async fn nothing_is_sent_into_a_connection_that_failed() {
    let (address, _) = serve(true).await;
    let (via, freeze) = freezable_proxy(address).await;
    let transport = HttpTransport::new(SECRET).expect("client");
    let warm = transport
        .deliver(&via, sleep_envelope("a", 0), Duration::from_secs(5))
        .await;
    assert_eq!(value(warm), 0, "the pooled connection works");
    freeze.send(()).expect("the proxy runs");
    let lost = transport
        .deliver(&via, sleep_envelope("a", 0), Duration::from_millis(300))
        .await;
    assert!(
        matches!(lost, Err(TransportError::Lost { .. })),
        "written into a hung connection, it may yet run: {lost:?}"
    );
    // The old connection still looks open, but it failed: the next delivery opens a new
    // one, which nobody accepts, so nothing can have run it.
    let next = transport
        .deliver(&via, sleep_envelope("b", 0), Duration::from_millis(300))
        .await;
    assert!(
        matches!(next, Err(TransportError::Unreachable { .. })),
        "sent after the failure was seen: {next:?}"
    );
}

#[tokio::test]
async fn an_unreachable_runner_is_reported_as_such() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
    let address = listener.local_addr().expect("bound").to_string();
    drop(listener);
    let failed = HttpTransport::new(SECRET)
        .expect("client")
        .deliver(&address, sleep_envelope("a", 0), Duration::from_secs(5))
        .await;
    assert!(
        matches!(failed, Err(TransportError::Unreachable { .. })),
        "{failed:?}"
    );
}

/// Accepts connections and reads what arrives, answering nothing; after `hold` each
/// connection is dropped. So behaves a runner's port between SIGKILL and the kernel closing
/// it (the backlog still completes connects), or a frozen runner's.
async fn mute_listener(hold: Duration) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let address = listener.local_addr().expect("bound").to_string();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut sink = Vec::new();
                let read = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut sink);
                let _ = tokio::time::timeout(hold, read).await;
            });
        }
    });
    address
}

#[tokio::test]
async fn a_delivery_to_a_peer_that_never_answers_was_never_sent() {
    // Reset soon after the connect, as by a dying runner's kernel.
    let dying = mute_listener(Duration::from_millis(50)).await;
    let transport = HttpTransport::new(SECRET).expect("client");
    for round in 0..5 {
        let failed = transport
            .deliver(&dying, sleep_envelope("a", 0), Duration::from_secs(2))
            .await;
        assert!(
            matches!(failed, Err(TransportError::Unreachable { .. })),
            "round {round}: nothing was written that a runner could run: {failed:?}"
        );
    }
    // Holds the connection without a word, as a frozen runner's kernel does: the delivery
    // is never written, so even a runner that wakes up later cannot run it.
    let frozen = mute_listener(Duration::from_secs(60)).await;
    let failed = transport
        .deliver(&frozen, sleep_envelope("a", 0), Duration::from_millis(300))
        .await;
    assert!(
        matches!(failed, Err(TransportError::Unreachable { .. })),
        "{failed:?}"
    );
    // A short and a long deadline waiting on the same new connection: the hello waits no
    // longer than the shortest, so neither caller's timer overtakes it.
    let frozen = mute_listener(Duration::from_secs(60)).await;
    let (short, long) = tokio::join!(
        transport.deliver(&frozen, sleep_envelope("a", 0), Duration::from_millis(300)),
        transport.deliver(&frozen, sleep_envelope("b", 0), Duration::from_secs(30)),
    );
    for (what, result) in [("short", short), ("long", long)] {
        assert!(
            matches!(result, Err(TransportError::Unreachable { .. })),
            "{what}: {result:?}"
        );
    }
}

/// A runtime served at the returned address that records, per TCP connection (by the
/// client's address), the paths of the requests it carried, in order.
async fn serve_recording_connections() -> (
    String,
    Arc<std::sync::Mutex<std::collections::HashMap<std::net::SocketAddr, Vec<String>>>>,
) {
    let mut registry = EntityRegistry::new();
    registry.register(Sleepy).expect("registers");
    let config = RuntimeConfig {
        sharding: Sharding::new(NonZeroU32::new(4).expect("non-zero")),
        ..RuntimeConfig::default()
    };
    let (runtime, _) = EntityRuntime::standalone(registry, config).await;
    let seen = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        std::net::SocketAddr,
        Vec<String>,
    >::new()));
    let record = seen.clone();
    let app = router(runtime, SECRET.to_owned()).layer(axum::middleware::from_fn(
        move |axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<
            std::net::SocketAddr,
        >,
              request: Request,
              next: Next| {
            let record = record.clone();
            async move {
                record
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(peer)
                    .or_default()
                    .push(request.uri().path().to_owned());
                next.run(request).await
            }
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let address = listener.local_addr().expect("bound").to_string();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await
    });
    (address, seen)
}

/// Forwards every connection to `upstream`; `cut` drops the ones open now (both sockets),
/// as a keep-alive timeout or a GOAWAY would, while the proxy goes on listening.
async fn cuttable_proxy(upstream: String) -> (String, Arc<tokio::sync::Notify>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let address = listener.local_addr().expect("bound").to_string();
    let cut = Arc::new(tokio::sync::Notify::new());
    let cutting = cut.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let upstream = upstream.clone();
            let cutting = cutting.clone();
            tokio::spawn(async move {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    _ = cutting.notified() => {}
                }
            });
        }
    });
    (address, cut)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_carries_a_hello_before_any_delivery() {
    let (address, seen) = serve_recording_connections().await;
    let (via, cut) = cuttable_proxy(address).await;
    let transport = HttpTransport::new(SECRET).expect("client");
    for round in 0..5 {
        // Whatever the cut did to the delivery in flight, one that reaches the runner
        // again is answered.
        let mut answered = false;
        for _ in 0..5 {
            let sent = transport
                .deliver(&via, sleep_envelope("a", 0), Duration::from_secs(2))
                .await;
            if sent.is_ok() {
                answered = true;
                break;
            }
            assert!(
                matches!(sent, Err(TransportError::Unreachable { .. })),
                "round {round}: a connection that closed carried nothing: {sent:?}"
            );
        }
        assert!(answered, "round {round}: the runner is reached again");
        cut.notify_waiters();
        // Time for the client to see the close, so that the next delivery finds a closed
        // connection in its pool (which hyper would replace without a hello).
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
    assert!(seen.len() >= 5, "a new connection per round: {seen:?}");
    for (connection, paths) in seen.iter() {
        assert_eq!(
            paths.first().map(String::as_str),
            Some(HELLO_PATH),
            "connection {connection} carried {paths:?}"
        );
    }
}
