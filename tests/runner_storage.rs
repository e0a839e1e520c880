//! The runner-storage conformance suite, run against every backend.
//!
//! Each case in [`suite`] is written once, generic over a [`Backend`] (a factory of fresh,
//! empty storage), and instantiated for [`MemoryRunnerStorage`] and [`PgRunnerStorage`] by
//! the `conformance!` macro. Postgres-only cases (clusters sharing a database, the lock
//! session's server settings, a killed session) follow in `postgres_only`.
//!
//! Every Postgres test runs in its own fresh database (`shoal_t_<uuid>`), so the tests run in
//! parallel and rerun cleanly. The server URL comes from `SHOAL_TEST_DATABASE_URL`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use shoal::ids::{ClusterName, Epoch, RunnerId, ShardId};
use shoal::runner_storage::memory::MemoryRunnerStorage;
use shoal::runner_storage::postgres::{LockSessionSettings, PgRunnerStorage, connect_pool};
use shoal::runner_storage::{
    ClusterSnapshot, LockSession, ProgressMark, RunnerProgress, RunnerRegistration, RunnerStorage,
    StorageError,
};
// Generous: Postgres frees a dropped session's locks asynchronously, and the machine may be
// busy with other tests. The suite measures nothing; it only waits for conditions.
use shoal_testkit::{DEADLINE, TestDb};

// ---------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------

/// A factory of fresh, empty runner storage, and whatever must outlive it.
trait Backend: Sized + Send + 'static {
    /// Opens fresh storage for one test.
    fn open() -> impl Future<Output = anyhow::Result<Self>>;
    /// The storage under test.
    fn storage(&self) -> Arc<dyn RunnerStorage>;
}

/// In-memory storage.
struct Memory(Arc<MemoryRunnerStorage>);

impl Backend for Memory {
    async fn open() -> anyhow::Result<Self> {
        Ok(Self(Arc::new(MemoryRunnerStorage::new())))
    }
    fn storage(&self) -> Arc<dyn RunnerStorage> {
        self.0.clone()
    }
}

/// Postgres storage in a database of its own.
struct Postgres {
    storage: Arc<PgRunnerStorage>,
    pool: sqlx::PgPool,
    // Dropped last: the database goes away with it.
    db: TestDb,
}

impl Postgres {
    async fn open_cluster(cluster: &str) -> anyhow::Result<Self> {
        let db = TestDb::migrated().await?;
        let pool = connect_pool(&db.url, 2, Duration::from_secs(10)).await?;
        let storage = Arc::new(pg_storage(&db, &pool, cluster)?);
        Ok(Self { storage, pool, db })
    }
}

fn pg_storage(db: &TestDb, pool: &sqlx::PgPool, cluster: &str) -> anyhow::Result<PgRunnerStorage> {
    Ok(PgRunnerStorage::new(
        pool.clone(),
        &db.url,
        ClusterName::new(cluster)?,
        LockSessionSettings::default(),
    )?)
}

impl Backend for Postgres {
    async fn open() -> anyhow::Result<Self> {
        Self::open_cluster("conformance").await
    }
    fn storage(&self) -> Arc<dyn RunnerStorage> {
        self.storage.clone()
    }
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn registration(address: &str) -> RunnerRegistration {
    RunnerRegistration {
        address: address.to_owned(),
        version: "test".to_owned(),
    }
}

fn shards(numbers: impl IntoIterator<Item = u32>) -> Vec<ShardId> {
    numbers.into_iter().map(ShardId::new).collect()
}

fn epochs(pairs: &[(u32, i64)]) -> Vec<(ShardId, Epoch)> {
    pairs
        .iter()
        .map(|&(s, e)| (ShardId::new(s), Epoch::new(e)))
        .collect()
}

async fn mark(storage: &dyn RunnerStorage, id: RunnerId) -> anyhow::Result<ProgressMark> {
    storage
        .progress()
        .await?
        .into_iter()
        .find(|r| r.id == id)
        .map(|r| r.mark)
        .context("the runner has no progress mark")
}

async fn live_ids(storage: &dyn RunnerStorage) -> anyhow::Result<Vec<RunnerId>> {
    Ok(storage
        .live_runners()
        .await?
        .into_iter()
        .map(|r| r.id)
        .collect())
}

/// Polls `storage`'s snapshot until `done` holds, or fails after [`DEADLINE`].
async fn await_snapshot(
    storage: &dyn RunnerStorage,
    what: &str,
    done: impl Fn(&ClusterSnapshot) -> bool,
) -> anyhow::Result<ClusterSnapshot> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let snapshot = storage.snapshot().await?;
        if done(&snapshot) {
            return Ok(snapshot);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {DEADLINE:?} waiting until {what}; last snapshot: {snapshot:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn is_alive(snapshot: &ClusterSnapshot, id: RunnerId) -> Option<bool> {
    snapshot
        .runners
        .iter()
        .find(|r| r.id == id)
        .map(|r| r.alive)
}

// ---------------------------------------------------------------------------------------
// The suite
// ---------------------------------------------------------------------------------------

mod suite {
    use super::*;

    pub(super) async fn register_gives_distinct_live_runners<B: Backend>() -> anyhow::Result<()> {
        let backend = B::open().await?;
        let storage = backend.storage();
        let a = storage.register(&registration("10.0.0.1:7070")).await?;
        let b = storage.register(&registration("10.0.0.2:7070")).await?;
        ensure!(a.runner_id() != b.runner_id(), "ids must be distinct");

        let live = storage.live_runners().await?;
        let mut expected = vec![
            (a.runner_id(), "10.0.0.1:7070"),
            (b.runner_id(), "10.0.0.2:7070"),
        ];
        expected.sort();
        let seen: Vec<(RunnerId, &str)> = live.iter().map(|r| (r.id, r.address.as_str())).collect();
        ensure!(
            seen == expected,
            "live runners {seen:?}, expected {expected:?} (ordered by id)"
        );
        drop((a, b));
        Ok(())
    }

    pub(super) async fn a_shard_has_one_owner<B: Backend>() -> anyhow::Result<()> {
        let backend = B::open().await?;
        let storage = backend.storage();
        let mut a = storage.register(&registration("a")).await?;
        let mut b = storage.register(&registration("b")).await?;

        let got_a = a.try_acquire(&shards([0, 1, 2])).await?;
        ensure!(
            got_a == epochs(&[(0, 1), (1, 1), (2, 1)]),
            "a acquired {got_a:?}"
        );
        let got_b = b.try_acquire(&shards([0])).await?;
        ensure!(got_b.is_empty(), "b acquired a's shard: {got_b:?}");
        let got_b = b.try_acquire(&shards([1, 2, 3])).await?;
        ensure!(
            got_b == epochs(&[(3, 1)]),
            "b must get only the free shard: {got_b:?}"
        );

        let snapshot = storage.snapshot().await?;
        let owners: Vec<(u32, RunnerId)> =
            snapshot.owners.iter().map(|(s, r)| (s.get(), *r)).collect();
        let (ia, ib) = (a.runner_id(), b.runner_id());
        ensure!(
            owners == vec![(0, ia), (1, ia), (2, ia), (3, ib)],
            "owners {owners:?}"
        );
        Ok(())
    }

    pub(super) async fn epochs_grow_by_one_per_acquisition<B: Backend>() -> anyhow::Result<()> {
        let backend = B::open().await?;
        let storage = backend.storage();
        let mut a = storage.register(&registration("a")).await?;
        let mut b = storage.register(&registration("b")).await?;
        let shard = shards([5]);

        ensure!(
            a.try_acquire(&shard).await? == epochs(&[(5, 1)]),
            "first epoch is 1"
        );
        a.release(&shard).await?;
        ensure!(
            b.try_acquire(&shard).await? == epochs(&[(5, 2)]),
            "next owner gets 2"
        );
        b.release(&shard).await?;
        ensure!(a.try_acquire(&shard).await? == epochs(&[(5, 3)]), "then 3");
        // Other shards keep their own count.
        ensure!(
            b.try_acquire(&shards([6])).await? == epochs(&[(6, 1)]),
            "shard 6 starts at 1"
        );

        let snapshot = storage.snapshot().await?;
        let seen: Vec<(ShardId, Epoch)> = snapshot.epochs.into_iter().collect();
        ensure!(
            seen == epochs(&[(5, 3), (6, 1)]),
            "snapshot epochs {seen:?}"
        );
        Ok(())
    }

    pub(super) async fn release_frees_a_shard_for_others<B: Backend>() -> anyhow::Result<()> {
        let backend = B::open().await?;
        let storage = backend.storage();
        let mut a = storage.register(&registration("a")).await?;
        let mut b = storage.register(&registration("b")).await?;

        a.try_acquire(&shards([1, 2])).await?;
        a.release(&shards([1])).await?;
        let got = b.try_acquire(&shards([1, 2])).await?;
        ensure!(
            got == epochs(&[(1, 2)]),
            "b gets the released shard only: {got:?}"
        );
        ensure!(a.confirm(1).await?, "a still holds shard 2");
        ensure!(b.confirm(1).await?, "b holds shard 1");
        // Releasing nothing is a no-op.
        a.release(&[]).await?;
        Ok(())
    }

    pub(super) async fn confirm_checks_the_held_count<B: Backend>() -> anyhow::Result<()> {
        let backend = B::open().await?;
        let storage = backend.storage();
        let mut a = storage.register(&registration("a")).await?;

        ensure!(a.confirm(0).await?, "a fresh session holds nothing");
        a.try_acquire(&shards([0, 1, 2])).await?;
        ensure!(a.confirm(3).await?, "holds 3");
        ensure!(!a.confirm(2).await?, "2 is wrong");
        ensure!(!a.confirm(4).await?, "4 is wrong");
        a.release(&shards([0])).await?;
        ensure!(a.confirm(2).await?, "holds 2 after a release");
        Ok(())
    }

    pub(super) async fn progress_marks_move_with_session_calls<B: Backend>() -> anyhow::Result<()> {
        let backend = B::open().await?;
        let storage = backend.storage();
        let mut a = storage.register(&registration("a")).await?;
        let b = storage.register(&registration("b")).await?;
        let mark_of = |readings: &[RunnerProgress], id: RunnerId| {
            readings.iter().find(|r| r.id == id).map(|r| r.mark)
        };
        let before = storage.progress().await?;
        ensure!(
            before.len() == 2,
            "both live runners have a mark: {before:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        ensure!(a.confirm(0).await?, "a is confirmed");
        let after = storage.progress().await?;
        ensure!(
            mark_of(&after, a.runner_id()) != mark_of(&before, a.runner_id()),
            "a's mark moved with its call"
        );
        ensure!(
            mark_of(&after, b.runner_id()) == mark_of(&before, b.runner_id()),
            "b made no call, so its mark stayed"
        );
        let ia = a.runner_id();
        drop(a);
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while mark_of(&storage.progress().await?, ia).is_some() {
            ensure!(
                tokio::time::Instant::now() < deadline,
                "a's mark outlived it"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    pub(super) async fn end_hung_ends_a_stuck_session_only_at_its_mark<B: Backend>()
    -> anyhow::Result<()> {
        let backend = B::open().await?;
        let storage = backend.storage();
        let mut a = storage.register(&registration("a")).await?;
        let mut b = storage.register(&registration("b")).await?;
        let (ia, ib) = (a.runner_id(), b.runner_id());
        a.try_acquire(&shards([0, 1])).await?;
        let stale = mark(&*storage, ia).await?;
        tokio::time::sleep(Duration::from_millis(5)).await;
        ensure!(a.confirm(2).await?, "a makes progress");
        ensure!(
            !storage.end_hung(ia, stale).await?,
            "a mark a has moved past ends nothing"
        );
        ensure!(
            live_ids(&*storage).await? == vec![ia, ib],
            "a is still live"
        );
        let current = mark(&*storage, ia).await?;
        ensure!(storage.end_hung(ia, current).await?, "a's session is ended");
        await_snapshot(&*storage, "a is dead and its locks free", |s| {
            is_alive(s, ia) == Some(false) && s.owners.is_empty()
        })
        .await?;
        let got = b.try_acquire(&shards([0, 1])).await?;
        ensure!(
            got == epochs(&[(0, 2), (1, 2)]),
            "b takes a's shards under new epochs: {got:?}"
        );
        ensure!(
            !a.confirm(2).await.unwrap_or(false),
            "a, waking, cannot confirm its locks"
        );
        Ok(())
    }

    pub(super) async fn await_gone_wakes_when_the_session_ends<B: Backend>() -> anyhow::Result<()> {
        let backend = B::open().await?;
        let storage = backend.storage();
        let a = storage.register(&registration("a")).await?;
        let b = storage.register(&registration("b")).await?;
        let (ia, ib) = (a.runner_id(), b.runner_id());
        let mut watcher = tokio::spawn({
            let storage = storage.clone();
            async move { storage.await_gone(ia).await }
        });
        // While a lives the watcher does not return, and makes nobody look alive or dead.
        ensure!(
            tokio::time::timeout(Duration::from_millis(300), &mut watcher)
                .await
                .is_err(),
            "a is alive: the watcher waits"
        );
        ensure!(live_ids(&*storage).await? == vec![ia, ib], "both live");
        drop(a);
        tokio::time::timeout(DEADLINE, watcher)
            .await
            .context("the watcher did not wake when a's session ended")???;
        ensure!(live_ids(&*storage).await? == vec![ib], "only b is live");
        tokio::time::timeout(DEADLINE, storage.await_gone(ia))
            .await
            .context("a runner already gone is reported at once")??;
        drop(b);
        Ok(())
    }

    pub(super) async fn dropped_session_frees_locks_and_dies<B: Backend>() -> anyhow::Result<()> {
        let backend = B::open().await?;
        let storage = backend.storage();
        let mut a = storage.register(&registration("a")).await?;
        let mut b = storage.register(&registration("b")).await?;
        let (ia, ib) = (a.runner_id(), b.runner_id());
        a.try_acquire(&shards([0, 1])).await?;

        drop(a); // the crash path: no close
        let snapshot = await_snapshot(&*storage, "the dropped session is dead", |s| {
            is_alive(s, ia) == Some(false) && s.owners.is_empty()
        })
        .await?;
        ensure!(is_alive(&snapshot, ib) == Some(true), "b is unaffected");
        ensure!(
            live_ids(&*storage).await? == vec![ib],
            "only b is live after a's session ended"
        );
        let got = b.try_acquire(&shards([0, 1])).await?;
        ensure!(
            got == epochs(&[(0, 2), (1, 2)]),
            "b takes a's shards: {got:?}"
        );
        Ok(())
    }

    pub(super) async fn close_releases_and_unregisters<B: Backend>() -> anyhow::Result<()> {
        let backend = B::open().await?;
        let storage = backend.storage();
        let mut a = storage.register(&registration("a")).await?;
        let mut b = storage.register(&registration("b")).await?;
        let (ia, ib) = (a.runner_id(), b.runner_id());
        a.try_acquire(&shards([0, 1, 2])).await?;

        a.close().await?;
        // Unlike a crash, close is synchronous: everything is visible at once.
        let snapshot = storage.snapshot().await?;
        ensure!(
            snapshot.runners.iter().all(|r| r.id != ia),
            "the registration is deleted: {snapshot:?}"
        );
        ensure!(snapshot.owners.is_empty(), "no locks remain: {snapshot:?}");
        ensure!(live_ids(&*storage).await? == vec![ib], "only b is live");
        let got = b.try_acquire(&shards([0, 1, 2])).await?;
        ensure!(got.len() == 3, "b takes every shard: {got:?}");
        Ok(())
    }

    pub(super) async fn snapshot_reports_owners_epochs_counts<B: Backend>() -> anyhow::Result<()> {
        let backend = B::open().await?;
        let storage = backend.storage();
        let empty = storage.snapshot().await?;
        ensure!(
            empty == ClusterSnapshot::default(),
            "fresh storage: {empty:?}"
        );

        let mut a = storage.register(&registration("a:1")).await?;
        let mut b = storage.register(&registration("b:1")).await?;
        let c = storage.register(&registration("c:1")).await?;
        let (ia, ib, ic) = (a.runner_id(), b.runner_id(), c.runner_id());
        a.try_acquire(&shards([0, 1, 2])).await?;
        b.try_acquire(&shards([3])).await?;
        b.release(&shards([3])).await?;
        a.release(&shards([2])).await?;
        b.try_acquire(&shards([2, 3])).await?;

        let s = storage.snapshot().await?;
        let owners: Vec<(u32, RunnerId)> = s.owners.iter().map(|(k, v)| (k.get(), *v)).collect();
        ensure!(
            owners == vec![(0, ia), (1, ia), (2, ib), (3, ib)],
            "owners {owners:?}"
        );
        let seen: Vec<(ShardId, Epoch)> = s.epochs.clone().into_iter().collect();
        ensure!(
            seen == epochs(&[(0, 1), (1, 1), (2, 2), (3, 2)]),
            "epochs {seen:?}"
        );
        let runners: Vec<(RunnerId, &str, bool, usize)> = s
            .runners
            .iter()
            .map(|r| (r.id, r.address.as_str(), r.alive, r.shards))
            .collect();
        ensure!(
            runners
                == vec![
                    (ia, "a:1", true, 2),
                    (ib, "b:1", true, 2),
                    (ic, "c:1", true, 0)
                ],
            "runners {runners:?}"
        );
        drop(c);
        Ok(())
    }

    pub(super) async fn ensure_cluster_refuses_other_count<B: Backend>() -> anyhow::Result<()> {
        let backend = B::open().await?;
        let storage = backend.storage();
        storage.ensure_cluster(64).await?;
        storage
            .ensure_cluster(64)
            .await
            .context("same count again")?;
        match storage.ensure_cluster(128).await {
            Err(StorageError::ShardCountMismatch {
                stored, configured, ..
            }) => {
                ensure!(stored == 64 && configured == 128, "{stored} / {configured}");
            }
            other => bail!("expected ShardCountMismatch, got {other:?}"),
        }
        let error = storage
            .ensure_cluster(128)
            .await
            .expect_err("still refused");
        ensure!(!error.is_retryable(), "a mismatch is not retryable");
        ensure!(
            error.to_string().contains("shards-per-group"),
            "the message names the key: {error}"
        );
        Ok(())
    }

    pub(super) async fn prune_dead_spares_live_and_recent<B: Backend>() -> anyhow::Result<()> {
        let backend = B::open().await?;
        let storage = backend.storage();
        let old_dead = storage.register(&registration("old-dead")).await?;
        let old_live = storage.register(&registration("old-live")).await?;
        // Separates the registration times of the old and the recent runners; the cutoff
        // is taken from the stored times, not from this sleep.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let new_dead = storage.register(&registration("new-dead")).await?;
        let (i_old_dead, i_old_live, i_new_dead) = (
            old_dead.runner_id(),
            old_live.runner_id(),
            new_dead.runner_id(),
        );
        drop(old_dead);
        drop(new_dead);
        let snapshot = await_snapshot(&*storage, "both dropped sessions are dead", |s| {
            is_alive(s, i_old_dead) == Some(false) && is_alive(s, i_new_dead) == Some(false)
        })
        .await?;
        let started = |id| {
            snapshot
                .runners
                .iter()
                .find(|r| r.id == id)
                .map(|r| r.started_at)
                .context("registered")
        };
        let cutoff = started(i_new_dead)?;
        ensure!(
            started(i_old_dead)? < cutoff,
            "registration times are ordered"
        );

        let long_ago = cutoff - chrono::Duration::hours(1);
        ensure!(
            storage.prune_dead(long_ago).await? == 0,
            "nothing is that old"
        );
        ensure!(
            storage.prune_dead(cutoff).await? == 1,
            "only the old dead one goes"
        );
        let left: Vec<RunnerId> = storage
            .snapshot()
            .await?
            .runners
            .iter()
            .map(|r| r.id)
            .collect();
        let mut expected = vec![i_old_live, i_new_dead];
        expected.sort();
        ensure!(left == expected, "left {left:?}, expected {expected:?}");
        ensure!(
            storage.prune_dead(cutoff).await? == 0,
            "pruning is idempotent"
        );
        drop(old_live);
        Ok(())
    }
}

/// Instantiates every suite case for one backend.
macro_rules! conformance {
    ($backend:ty) => {
        conformance!(
            $backend;
            register_gives_distinct_live_runners,
            a_shard_has_one_owner,
            epochs_grow_by_one_per_acquisition,
            release_frees_a_shard_for_others,
            confirm_checks_the_held_count,
            dropped_session_frees_locks_and_dies,
            close_releases_and_unregisters,
            snapshot_reports_owners_epochs_counts,
            ensure_cluster_refuses_other_count,
            prune_dead_spares_live_and_recent,
            progress_marks_move_with_session_calls,
            end_hung_ends_a_stuck_session_only_at_its_mark,
            await_gone_wakes_when_the_session_ends,
        );
    };
    ($backend:ty; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() -> anyhow::Result<()> {
                crate::suite::$case::<$backend>().await
            }
        )+
    };
}

mod memory {
    conformance!(crate::Memory);
}

mod postgres {
    conformance!(crate::Postgres);
}

// ---------------------------------------------------------------------------------------
// Postgres only
// ---------------------------------------------------------------------------------------

mod postgres_only {
    use super::*;
    use shoal::runner_storage::postgres::{ProcessTag, connect_pool_named};

    /// A hung runner's pool connection can be frozen inside a completion, holding its
    /// shard's row `FOR SHARE`; the new owner's epoch bump would wait for it forever.
    #[tokio::test]
    async fn ending_a_hung_runner_ends_every_session_of_its_process() -> anyhow::Result<()> {
        let db = TestDb::migrated().await?;
        let pool = connect_pool(&db.url, 2, Duration::from_secs(10)).await?;
        let tag = ProcessTag::random();
        let hung = pg_storage(&db, &pool, "tagged")?.with_process_tag(tag.clone());
        let survivor = pg_storage(&db, &pool, "tagged")?;
        let mut a = hung.register(&registration("a")).await?;
        let mut b = survivor.register(&registration("b")).await?;
        ensure!(a.try_acquire(&shards([3])).await? == epochs(&[(3, 1)]));
        let hung_pool = connect_pool_named(
            &db.url,
            1,
            Duration::from_secs(10),
            &tag.pool_application_name(),
        )
        .await?;
        let mut frozen = hung_pool.begin().await?;
        sqlx::query(
            "SELECT epoch FROM shoal_shards WHERE cluster = 'tagged' AND shard = 3 FOR SHARE",
        )
        .fetch_one(&mut *frozen)
        .await?;

        let stuck_at = mark(&survivor, a.runner_id()).await?;
        ensure!(survivor.end_hung(a.runner_id(), stuck_at).await?, "ended");
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let got = loop {
            let got = tokio::time::timeout(DEADLINE, b.try_acquire(&shards([3])))
                .await
                .context("the epoch bump waited for the hung runner's transaction")??;
            if !got.is_empty() {
                break got;
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "shard 3 never freed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        ensure!(
            got == epochs(&[(3, 2)]),
            "b owns shard 3 at epoch 2: {got:?}"
        );
        ensure!(
            frozen.commit().await.is_err(),
            "the hung runner's open transaction was ended with it"
        );
        ensure!(
            sqlx::query_scalar::<_, i32>("SELECT 1")
                .fetch_one(&pool)
                .await?
                == 1,
            "other processes' sessions are untouched"
        );
        Ok(())
    }

    #[tokio::test]
    async fn two_clusters_share_one_database() -> anyhow::Result<()> {
        let alpha = Postgres::open_cluster("alpha").await?;
        let beta = pg_storage(&alpha.db, &alpha.pool, "beta")?;
        alpha.storage.ensure_cluster(64).await?;
        beta.ensure_cluster(128)
            .await
            .context("each cluster has its own count")?;

        let mut a = alpha.storage.register(&registration("a")).await?;
        let mut b = beta.register(&registration("b")).await?;
        ensure!(
            a.try_acquire(&shards([0])).await? == epochs(&[(0, 1)]),
            "alpha takes shard 0"
        );
        ensure!(
            b.try_acquire(&shards([0])).await? == epochs(&[(0, 1)]),
            "beta takes its own shard 0, with its own epoch"
        );
        ensure!(a.confirm(1).await? && b.confirm(1).await?, "both hold it");

        ensure!(
            live_ids(&*alpha.storage).await? == vec![a.runner_id()],
            "alpha sees alpha"
        );
        ensure!(
            live_ids(&beta).await? == vec![b.runner_id()],
            "beta sees beta"
        );
        let sa = alpha.storage.snapshot().await?;
        let sb = beta.snapshot().await?;
        ensure!(
            sa.runners.len() == 1 && sa.owners.values().all(|r| *r == a.runner_id()),
            "alpha's snapshot: {sa:?}"
        );
        ensure!(
            sb.runners.len() == 1 && sb.owners.values().all(|r| *r == b.runner_id()),
            "beta's snapshot: {sb:?}"
        );
        let (na, nb) = (alpha.storage.namespaces(), beta.namespaces());
        ensure!(na != nb, "namespaces differ: {na:?} {nb:?}");

        // Pruning one cluster never touches the other's registrations.
        drop(b);
        await_snapshot(&beta, "beta's runner is dead", |s| {
            s.runners.iter().all(|r| !r.alive)
        })
        .await?;
        let future = chrono::Utc::now() + chrono::Duration::hours(1);
        ensure!(
            alpha.storage.prune_dead(future).await? == 0,
            "alpha has no dead runner"
        );
        ensure!(beta.prune_dead(future).await? == 1, "beta prunes its own");
        Ok(())
    }

    #[tokio::test]
    async fn lock_session_has_keepalive_settings() -> anyhow::Result<()> {
        let backend = Postgres::open().await?;
        ensure!(
            backend.db.url.contains("127.0.0.1") || backend.db.url.contains("localhost"),
            "keepalives only apply over TCP; SHOAL_TEST_DATABASE_URL is {}",
            backend.db.url
        );
        let mut session = backend.storage.register_pg(&registration("a")).await?;
        let expected = [
            ("tcp_keepalives_idle", "3"),
            ("tcp_keepalives_interval", "1"),
            ("tcp_keepalives_count", "3"),
            ("tcp_user_timeout", "6000"),
            ("idle_session_timeout", "0"),
            ("idle_in_transaction_session_timeout", "0"),
            ("statement_timeout", "0"),
        ];
        for (setting, value) in expected {
            let seen = session.show(setting).await?;
            ensure!(seen == value, "{setting} = {seen}, expected {value}");
        }
        // The application name lets operators (and the next test) find lock sessions.
        let name: String = sqlx::query_scalar("SELECT current_setting('application_name')")
            .fetch_one(&backend.pool)
            .await?;
        ensure!(
            name == "shoal",
            "pool connections are named `shoal`, not {name}"
        );
        ensure!(session.confirm(0).await?, "the session is usable");
        Box::new(session).close().await?;
        Ok(())
    }

    #[tokio::test]
    async fn terminated_session_fails_confirmation() -> anyhow::Result<()> {
        let backend = Postgres::open().await?;
        let storage = backend.storage();
        let mut a = storage.register(&registration("a")).await?;
        let mut b = storage.register(&registration("b")).await?;
        let ia = a.runner_id();
        a.try_acquire(&shards([0, 1])).await?;
        ensure!(a.confirm(2).await?, "confirmed before");

        // Find a's backend through its liveness lock, then check it is a lock session.
        let ns = backend.storage.namespaces();
        let pid: i32 = sqlx::query_scalar(
            "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
              WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND l.granted
                AND l.classid::int8 = $1 AND l.objid::int8 = $2
                AND a.datname = current_database()
                AND a.application_name LIKE 'shoal-locks:%'",
        )
        .bind(i64::from(ns.runners))
        .bind(i64::from(ia.get()))
        .fetch_one(&backend.pool)
        .await
        .context("finding a's lock session")?;
        let sessions: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND application_name LIKE 'shoal-locks:%'",
        )
        .fetch_one(&backend.pool)
        .await?;
        ensure!(sessions == 2, "two lock sessions, found {sessions}");
        let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(&backend.pool)
            .await?;
        ensure!(killed, "pg_terminate_backend({pid})");

        match a.confirm(2).await {
            Err(error) => ensure!(
                error.is_retryable(),
                "a broken session is Unavailable: {error}"
            ),
            Ok(intact) => bail!("confirm on a terminated session returned Ok({intact})"),
        }
        // The server freed everything: b can take the shards, a is gone.
        let snapshot =
            await_snapshot(&*storage, "a is dead", |s| is_alive(s, ia) == Some(false)).await?;
        ensure!(
            snapshot.owners.is_empty(),
            "a's locks are freed: {snapshot:?}"
        );
        ensure!(
            b.try_acquire(&shards([0, 1])).await?.len() == 2,
            "b takes over"
        );
        Ok(())
    }
}
