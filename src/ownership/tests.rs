//! The ownership loop against in-memory storage, on paused time.

use std::num::NonZeroU32;
use std::sync::Mutex;

use super::*;
use crate::runner_storage::memory::MemoryRunnerStorage;

#[derive(Debug, Default)]
struct Recorder {
    events: Mutex<Vec<String>>,
}

impl Recorder {
    fn events(&self) -> Vec<String> {
        self.events.lock().expect("not poisoned").clone()
    }
}

impl ShardLifecycle for Recorder {
    fn acquired(&self, shard: ShardId, epoch: Epoch) {
        self.events
            .lock()
            .expect("not poisoned")
            .push(format!("acquired {shard}@{epoch}"));
    }
    fn drain(&self, shard: ShardId) -> BoxFuture<'static, ()> {
        self.events
            .lock()
            .expect("not poisoned")
            .push(format!("drain {shard}"));
        Box::pin(tokio::time::sleep(Duration::from_millis(50)))
    }
    fn fenced(&self, shards: &[ShardId]) {
        self.events
            .lock()
            .expect("not poisoned")
            .push(format!("fenced {}", shards.len()));
    }
}

const SHARDS: u32 = 64;

fn config() -> OwnershipConfig {
    OwnershipConfig {
        sharding: Sharding::new(NonZeroU32::new(SHARDS).expect("non-zero")),
        poll_interval: Duration::from_millis(250),
        lock_check_interval: Duration::from_millis(250),
        lock_deadline: Duration::from_secs(2),
        drain_timeout: Duration::from_secs(5),
        hang_timeout: Duration::from_secs(3),
        watch_peers: 16,
        registration: RunnerRegistration {
            address: "test".to_owned(),
            version: "test".to_owned(),
        },
    }
}

struct TestRunner {
    handle: OwnershipHandle,
    join: tokio::task::JoinHandle<()>,
    shutdown: CancellationToken,
    recorder: Arc<Recorder>,
}

fn start(storage: &MemoryRunnerStorage) -> TestRunner {
    start_with(storage, config())
}

fn start_with(storage: &MemoryRunnerStorage, config: OwnershipConfig) -> TestRunner {
    let recorder = Arc::new(Recorder::default());
    let shutdown = CancellationToken::new();
    let (handle, join) = spawn_ownership(
        Arc::new(storage.clone()),
        recorder.clone(),
        config,
        shutdown.clone(),
    );
    TestRunner {
        handle,
        join,
        shutdown,
        recorder,
    }
}

async fn until(what: &str, done: impl FnMut() -> bool) {
    until_for(what, Duration::from_secs(30), done).await;
}

async fn until_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every runner registered and holding exactly what the assignment gives it.
fn balanced(runners: &[TestRunner]) -> bool {
    let views: Vec<OwnershipView> = runners.iter().map(|r| r.handle.view()).collect();
    let Some(ids) = views
        .iter()
        .map(|v| v.runner_id)
        .collect::<Option<Vec<_>>>()
    else {
        return false;
    };
    let assignment = assign(config().sharding, &ids);
    views.iter().zip(&ids).all(|(view, id)| {
        view.draining.is_empty() && view.owned.keys().copied().eq(assignment.shards_of(*id))
    })
}

async fn owners(storage: &MemoryRunnerStorage) -> BTreeMap<ShardId, RunnerId> {
    storage.snapshot().await.expect("snapshot").owners
}

#[tokio::test(start_paused = true)]
async fn three_runners_split_every_shard_as_assigned() {
    let storage = MemoryRunnerStorage::new();
    let runners: Vec<TestRunner> = (0..3).map(|_| start(&storage)).collect();
    until("balanced ownership", || balanced(&runners)).await;
    let mut seen = BTreeSet::new();
    for runner in &runners {
        let view = runner.handle.view();
        for shard in view.owned.keys() {
            assert!(seen.insert(*shard), "shard {shard} believed owned twice");
        }
    }
    assert_eq!(owners(&storage).await.len(), SHARDS as usize);
}

#[tokio::test(start_paused = true)]
async fn a_crashed_runners_shards_move_to_the_survivors_and_nothing_else_moves() {
    let storage = MemoryRunnerStorage::new();
    let runners: Vec<TestRunner> = (0..3).map(|_| start(&storage)).collect();
    until("balanced ownership", || balanced(&runners)).await;
    let kept: Vec<BTreeMap<ShardId, Epoch>> =
        runners[1..].iter().map(|r| r.handle.view().owned).collect();
    let events_before: Vec<usize> = runners[1..]
        .iter()
        .map(|r| r.recorder.events().len())
        .collect();
    // Aborting the task drops its session: the crash path.
    runners[0].join.abort();
    until("survivors own everything", || {
        owned_total(&runners[1..]) == SHARDS as usize
    })
    .await;
    let snapshot = storage.snapshot().await.expect("snapshot");
    assert!(snapshot.epochs.values().all(|e| e.get() >= 1));
    // Each survivor still holds every shard it held before, under the same epoch, and
    // drained nothing: only the dead runner's shards moved.
    for ((survivor, kept), before) in runners[1..].iter().zip(&kept).zip(events_before) {
        let now = survivor.handle.view().owned;
        for (shard, epoch) in kept {
            assert_eq!(
                now.get(shard),
                Some(epoch),
                "shard {shard} moved between survivors"
            );
        }
        let drains: Vec<String> = survivor.recorder.events()[before..]
            .iter()
            .filter(|e| e.starts_with("drain"))
            .cloned()
            .collect();
        assert!(drains.is_empty(), "a survivor drained {drains:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_partitioned_runner_fences_before_its_locks_are_freed() {
    let storage = MemoryRunnerStorage::new();
    let runners: Vec<TestRunner> = (0..2).map(|_| start(&storage)).collect();
    until("full ownership", || {
        runners
            .iter()
            .map(|r| r.handle.view().owned.len())
            .sum::<usize>()
            == SHARDS as usize
    })
    .await;
    let victim = runners[0].handle.view();
    let victim_id = victim.runner_id.expect("registered");
    let victim_shards: Vec<ShardId> = victim.owned.keys().copied().collect();
    let partitioned_at = Instant::now();
    storage.partition(victim_id);

    until("victim fences", || {
        runners[0].handle.view().fenced_count == 1
    })
    .await;
    let fenced_after = partitioned_at.elapsed();
    assert!(
        fenced_after <= Duration::from_millis(2300),
        "fenced after {fenced_after:?}"
    );
    assert!(runners[0].handle.view().owned.is_empty());
    assert_eq!(
        runners[0].recorder.events().last().map(String::as_str),
        Some(format!("fenced {}", victim_shards.len()).as_str())
    );
    // The "server" still counts the victim's locks: nobody else has its shards yet.
    let held = owners(&storage).await;
    assert!(
        victim_shards
            .iter()
            .all(|s| held.get(s) == Some(&victim_id))
    );

    // The server notices the dead peer: the survivor and the victim's new incarnation
    // take the shards over; the old incarnation never holds them again.
    storage.expire(victim_id);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let held = owners(&storage).await;
        assert!(held.values().all(|r| *r != victim_id));
        if victim_shards.iter().all(|s| held.contains_key(s)) {
            break;
        }
        assert!(Instant::now() < deadline, "victim's shards not taken over");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rejoined = runners[0].handle.view().runner_id.expect("rejoined");
    assert_ne!(
        rejoined, victim_id,
        "a fenced runner rejoins as a new incarnation"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_drains_before_releasing_and_unregisters() {
    let storage = MemoryRunnerStorage::new();
    let runner = start(&storage);
    until("full ownership", || {
        runner.handle.view().owned.len() == SHARDS as usize
    })
    .await;
    runner.shutdown.cancel();
    runner.join.await.expect("loop ends cleanly");
    assert_eq!(runner.handle.view().phase, OwnershipPhase::Stopped);
    let events = runner.recorder.events();
    let drains = events.iter().filter(|e| e.starts_with("drain")).count();
    assert_eq!(drains, SHARDS as usize);
    let snapshot = storage.snapshot().await.expect("snapshot");
    assert!(
        snapshot.owners.is_empty(),
        "locks left: {:?}",
        snapshot.owners
    );
    assert!(snapshot.runners.is_empty(), "registration left");
}

#[tokio::test(start_paused = true)]
async fn a_joining_runner_takes_shards_only_after_they_drain() {
    let storage = MemoryRunnerStorage::new();
    let first = start(&storage);
    until("full ownership", || {
        first.handle.view().owned.len() == SHARDS as usize
    })
    .await;
    let second = start(&storage);
    let both = [first, second];
    until("balanced", || balanced(&both)).await;
    let [first, second] = both;
    let newcomer = second.handle.view().runner_id.expect("registered");
    let events = first.recorder.events();
    // The first runner drained exactly the shards the newcomer took, each once.
    let drained: BTreeSet<String> = events
        .iter()
        .filter(|e| e.starts_with("drain"))
        .cloned()
        .collect();
    let taken: BTreeSet<String> = second
        .handle
        .view()
        .owned
        .keys()
        .map(|s| format!("drain {s}"))
        .collect();
    assert_eq!(
        drained.len(),
        events.iter().filter(|e| e.starts_with("drain")).count()
    );
    assert_eq!(drained, taken);
    assert!(!taken.is_empty(), "runner {newcomer} took nothing");
    // Every shard the newcomer holds was acquired at epoch 2: once by the first runner,
    // once by the second; never concurrently (the memory locks are exclusive).
    assert!(second.handle.view().owned.values().all(|e| e.get() == 2));
}

fn owned_total(runners: &[TestRunner]) -> usize {
    runners.iter().map(|r| r.handle.view().owned.len()).sum()
}

#[tokio::test(start_paused = true)]
async fn a_frozen_runner_is_taken_over_after_the_hang_timeout() {
    let storage = MemoryRunnerStorage::new();
    let runners: Vec<TestRunner> = (0..3).map(|_| start(&storage)).collect();
    until("full ownership", || {
        owned_total(&runners) == SHARDS as usize
    })
    .await;
    let victim = runners[0].handle.view().runner_id.expect("registered");
    let victim_shards: Vec<ShardId> = runners[0].handle.view().owned.keys().copied().collect();
    assert!(!victim_shards.is_empty());
    let frozen_at = Instant::now();
    // Its session stays alive for the server and keeps its locks; it makes no progress.
    storage.freeze(victim);
    let hang_timeout = config().hang_timeout;
    let deadline = frozen_at + hang_timeout + Duration::from_secs(1);
    loop {
        let held = owners(&storage).await;
        if victim_shards
            .iter()
            .all(|s| held.get(s).is_some_and(|owner| *owner != victim))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the frozen runner's shards were not taken over within hang-timeout + 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = frozen_at.elapsed();
    assert!(
        took >= hang_timeout,
        "taken over after {took:?}, before the hang timeout"
    );
    let live: Vec<RunnerId> = storage
        .live_runners()
        .await
        .expect("live runners")
        .iter()
        .map(|r| r.id)
        .collect();
    assert!(
        !live.contains(&victim),
        "the frozen incarnation is no longer alive"
    );
}

#[tokio::test(start_paused = true)]
async fn healthy_runners_are_never_taken_over() {
    let storage = MemoryRunnerStorage::new();
    let runners: Vec<TestRunner> = (0..3).map(|_| start(&storage)).collect();
    until("full ownership", || {
        owned_total(&runners) == SHARDS as usize
    })
    .await;
    let ids: Vec<Option<RunnerId>> = runners.iter().map(|r| r.handle.view().runner_id).collect();
    tokio::time::sleep(config().hang_timeout * 10).await;
    let after: Vec<Option<RunnerId>> = runners.iter().map(|r| r.handle.view().runner_id).collect();
    assert_eq!(ids, after, "no runner lost its incarnation");
    assert!(runners.iter().all(|r| r.handle.view().fenced_count == 0));
}

#[tokio::test(start_paused = true)]
async fn a_peers_end_wakes_the_survivors_without_waiting_for_a_poll() {
    let storage = MemoryRunnerStorage::new();
    // Polls so rare that only the watcher can explain a fast takeover.
    let slow = OwnershipConfig {
        poll_interval: Duration::from_secs(60),
        ..config()
    };
    let runners: Vec<TestRunner> = (0..2).map(|_| start_with(&storage, slow.clone())).collect();
    // The first polls of each happen at start; the second runner's appearance is seen by
    // the first only at its next poll, so wait for that.
    until_for("balanced ownership", Duration::from_secs(300), || {
        balanced(&runners)
    })
    .await;
    let killed_at = Instant::now();
    runners[0].join.abort();
    until("the survivor owns everything", || {
        runners[1].handle.view().owned.len() == SHARDS as usize
    })
    .await;
    let took = killed_at.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "took over after {took:?}: the watcher did not wake the survivor"
    );
}
