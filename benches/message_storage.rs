//! Persisted message throughput against a real PostgreSQL: 64 concurrent callers saving,
//! completing, or saving then completing (a persisted message's two commits, as a runner
//! and its callers do them) messages through [`PgMessageStorage`] with group commit on
//! ([`BatchConfig::GROUP_COMMIT`]) and off ([`BatchConfig::ONE_BY_ONE`]). One criterion
//! iteration is [`PER_ITER`] messages, so every caller stays busy for the whole sample and
//! the reported throughput is messages per second.
//!
//! `save_then_complete_retention/{off,on}` measures the same hot path without and then with
//! a retention cleaner beside it: a task that purges everything already processed in
//! batches of 1,000, 50 ms apart (the default batch size and pause, with a cutoff of *now*
//! so there is always work), as the `shoal-retention` singleton would on a backlog.
//! `cargo bench --bench message_storage -- retention` runs just those two.
//!
//! Connects to `SHOAL_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`), creates a fresh `shoal_b_<uuid>`
//! database and drops it at the end. Without a reachable Postgres it prints why and measures
//! nothing, so `cargo bench` still succeeds on machines without one.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;
use shoal::message_storage::postgres::{BatchConfig, PgMessageStorage};
use shoal::message_storage::{Completion, MessageStorage, MessageStorageError, NewMessage, Reply};
use shoal::snowflake::Snowflake;
use shoal::{ClusterName, EntityAddress, EntityId, EntityType, Epoch, ShardId};
use shoal_testkit::TestDb;
use sqlx::PgPool;
use tokio::runtime::Runtime;

/// Concurrent callers, as many request handlers of a busy runner would be.
const CALLERS: u64 = 64;
/// Shards the messages spread over (each gets an epoch so completions are not fenced).
const SHARDS: u32 = 64;
const EPOCH: Epoch = Epoch::new(1);
/// Messages per criterion iteration.
const PER_ITER: u64 = 2_000;

/// A fresh database with Shoal's schema.
struct BenchDb {
    pool: PgPool,
    // Last: the database is dropped after its pool.
    _db: TestDb,
}

impl BenchDb {
    async fn create() -> anyhow::Result<Self> {
        let db = TestDb::create_named("shoal_b").await?;
        db.migrate().await?;
        let pool =
            shoal::runner_storage::postgres::connect_pool(&db.url, 48, Duration::from_secs(5))
                .await
                .with_context(|| format!("cannot connect to {}", db.name))?;
        Ok(Self { pool, _db: db })
    }

    /// A storage for a new cluster whose shards all have an owner at [`EPOCH`].
    async fn storage(&self, batching: BatchConfig) -> (ClusterName, Arc<PgMessageStorage>) {
        let cluster = ClusterName::new(format!("b{}", uuid::Uuid::now_v7().simple()))
            .expect("a valid cluster name");
        sqlx::query(
            "INSERT INTO shoal_shards (cluster, shard, epoch, runner_id)
             SELECT $1, s, $2, 1 FROM generate_series(0, $3 - 1) AS s",
        )
        .bind(cluster.as_str())
        .bind(EPOCH.get())
        .bind(SHARDS as i32)
        .execute(&self.pool)
        .await
        .expect("shard epochs are written");
        let storage = PgMessageStorage::new(self.pool.clone(), cluster.clone(), batching);
        (cluster, Arc::new(storage))
    }

    /// Closes the pool, then drops the database.
    async fn drop_database(self) {
        self.pool.close().await;
    }
}

/// Message `i` of a run: spread over shards and entities, no idempotency key.
fn message(ids: &Snowflake, i: u64) -> NewMessage {
    let address = EntityAddress {
        entity_type: EntityType::new("counter").expect("a valid entity type"),
        entity_id: EntityId::new(format!("e{}", i % 1024)).expect("a valid entity id"),
    };
    NewMessage {
        id: ids.next_id(),
        shard: ShardId::new((i % u64::from(SHARDS)) as u32),
        address,
        tag: "increment".to_owned(),
        payload: json!({ "by": 1 }),
        idempotency_key: None,
        deliver_at: None,
    }
}

/// Runs `call(0..count)` from [`CALLERS`] concurrent tasks; the time until all are done.
async fn drive<F, Fut>(count: u64, call: F) -> Duration
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), MessageStorageError>> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (next, call) = (next.clone(), call.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    call(i).await.expect("storage call failed");
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.expect("caller panicked");
    }
    start.elapsed()
}

/// Saves `count` messages; returns the time it took.
async fn save_messages(
    storage: Arc<PgMessageStorage>,
    ids: Arc<Snowflake>,
    count: u64,
) -> Duration {
    drive(count, move |i| {
        let (storage, message) = (storage.clone(), message(&ids, i));
        async move { storage.save(message).await.map(drop) }
    })
    .await
}

/// Saves `count` messages through `loader` (not timed), then completes them through
/// `storage`; returns the time the completions took.
async fn complete_messages(
    loader: Arc<PgMessageStorage>,
    storage: Arc<PgMessageStorage>,
    ids: Arc<Snowflake>,
    count: u64,
) -> Duration {
    let messages: Vec<NewMessage> = (0..count).map(|i| message(&ids, i)).collect();
    let messages = Arc::new(messages);
    let stored = messages.clone();
    drive(count, move |i| {
        let (loader, message) = (loader.clone(), stored[i as usize].clone());
        async move { loader.save(message).await.map(drop) }
    })
    .await;
    drive(count, move |i| {
        let completion = completion(&messages[i as usize], i);
        let storage = storage.clone();
        async move { storage.complete(completion).await.map(drop) }
    })
    .await
}

fn completion(message: &NewMessage, i: u64) -> Completion {
    Completion {
        message_id: message.id,
        shard: message.shard,
        epoch: EPOCH,
        reply: Reply::Ok {
            value: json!({ "total": i }),
        },
        state: Some((message.address.clone(), json!({ "total": i }))),
    }
}

/// Saves then completes each of `count` messages, one caller doing both in turn; returns the
/// time it took.
async fn save_then_complete(
    storage: Arc<PgMessageStorage>,
    ids: Arc<Snowflake>,
    count: u64,
) -> Duration {
    drive(count, move |i| {
        let (storage, message) = (storage.clone(), message(&ids, i));
        async move {
            storage.save(message.clone()).await?;
            storage.complete(completion(&message, i)).await.map(drop)
        }
    })
    .await
}

/// Purges everything processed so far, 1,000 rows a batch, 50 ms between batches, until
/// `stop`; counts what it removed.
async fn clean_beside(
    storage: Arc<PgMessageStorage>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    purged: Arc<AtomicU64>,
) {
    while !stop.load(Ordering::Relaxed) {
        let removed = storage
            .purge(chrono::Utc::now(), 1000)
            .await
            .expect("purge failed");
        purged.fetch_add(removed, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn message_storage(c: &mut Criterion) {
    let runtime = Runtime::new().expect("a tokio runtime");
    let db = match runtime.block_on(BenchDb::create()) {
        Ok(db) => db,
        Err(why) => {
            println!("message_storage bench skipped: PostgreSQL is not usable ({why:#})");
            return;
        }
    };
    let ids = Arc::new(Snowflake::new(7));
    let modes = [
        ("group_commit", BatchConfig::GROUP_COMMIT),
        ("one_by_one", BatchConfig::ONE_BY_ONE),
    ];

    let mut group = c.benchmark_group("message_storage");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(PER_ITER));
    for (name, batching) in modes {
        let (_, storage) = runtime.block_on(db.storage(batching));
        group.bench_function(BenchmarkId::new("save", name), |b| {
            b.to_async(&runtime)
                .iter_custom(|iters| save_messages(storage.clone(), ids.clone(), iters * PER_ITER));
        });
    }
    for (name, batching) in modes {
        let (cluster, storage) = runtime.block_on(db.storage(batching));
        let loader = {
            let _entered = runtime.enter();
            Arc::new(PgMessageStorage::new(
                db.pool.clone(),
                cluster,
                BatchConfig::GROUP_COMMIT,
            ))
        };
        group.bench_function(BenchmarkId::new("complete", name), |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                complete_messages(
                    loader.clone(),
                    storage.clone(),
                    ids.clone(),
                    iters * PER_ITER,
                )
            });
        });
    }
    for (name, batching) in modes {
        let (_, storage) = runtime.block_on(db.storage(batching));
        group.bench_function(BenchmarkId::new("save_then_complete", name), |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                save_then_complete(storage.clone(), ids.clone(), iters * PER_ITER)
            });
        });
    }
    for (name, cleaning) in [("off", false), ("on", true)] {
        let (_, storage) = runtime.block_on(db.storage(BatchConfig::GROUP_COMMIT));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let purged = Arc::new(AtomicU64::new(0));
        let cleaner = cleaning
            .then(|| runtime.spawn(clean_beside(storage.clone(), stop.clone(), purged.clone())));
        group.bench_function(
            BenchmarkId::new("save_then_complete_retention", name),
            |b| {
                b.to_async(&runtime).iter_custom(|iters| {
                    save_then_complete(storage.clone(), ids.clone(), iters * PER_ITER)
                });
            },
        );
        stop.store(true, Ordering::Relaxed);
        if let Some(cleaner) = cleaner {
            let _ = runtime.block_on(cleaner);
            println!(
                "retention {name}: {} messages purged beside the hot path",
                purged.load(Ordering::Relaxed)
            );
        }
    }
    group.finish();
    runtime.block_on(db.drop_database());
}

criterion_group!(benches, message_storage);
criterion_main!(benches);
