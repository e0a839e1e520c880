//! Singletons: named long-running tasks that run on exactly one runner, the owner of
//! `shard_of(name)`. A singleton starts when that shard is acquired and is cancelled when
//! the shard is drained (it gets `grace` to finish) or fenced (it is aborted at once).
//!
//! Invariant: a singleton never runs after its shard's lock is released. Every running
//! singleton is held by a `Running` whose drop aborts its task, so when the ownership
//! loop's drain timer gives up on a drain (dropping the drain future) every singleton still
//! in it is aborted, not detached. The singletons of one shard are drained side by side,
//! each with its own `grace`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::client::ShoalClient;
use crate::ids::{Epoch, RunnerId, ShardId};
use crate::ownership::ShardLifecycle;
use crate::sharding::Sharding;

/// What a running singleton knows about where it runs.
#[derive(Debug, Clone)]
pub struct SingletonContext {
    /// The singleton's name.
    pub name: String,
    /// The shard it follows.
    pub shard: ShardId,
    /// The epoch this runner owns that shard under.
    pub epoch: Epoch,
    /// This runner.
    pub runner_id: Option<RunnerId>,
    client: Option<ShoalClient>,
    cancel: CancellationToken,
}

impl SingletonContext {
    /// This runner's client, to send messages to entities (none where the singletons run
    /// without one, as in unit tests).
    pub fn client(&self) -> Option<&ShoalClient> {
        self.client.as_ref()
    }

    /// Whether this runner still leads (the shard is still ours).
    pub fn is_leader(&self) -> bool {
        !self.cancel.is_cancelled()
    }

    /// Resolves when leadership ends: stop promptly.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }

    /// Waits `pause`, cut short when leadership ends; whether this runner still leads
    /// (the wait between a singleton's passes or batches).
    pub async fn pause(&self, pause: std::time::Duration) -> bool {
        tokio::select! {
            () = self.cancel.cancelled() => false,
            () = tokio::time::sleep(pause) => true,
        }
    }
}

/// A singleton's body.
pub type SingletonFn = Arc<dyn Fn(SingletonContext) -> BoxFuture<'static, ()> + Send + Sync>;

/// A named singleton.
#[derive(Clone)]
pub struct Singleton {
    /// Its name (also what its shard is derived from).
    pub name: String,
    /// Its body; it should return soon after `ctx.cancelled()` resolves.
    pub run: SingletonFn,
}

impl std::fmt::Debug for Singleton {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Singleton")
            .field("name", &self.name)
            .finish()
    }
}

impl Singleton {
    /// A singleton named `name` running `run`.
    pub fn new<F, Fut>(name: impl Into<String>, run: F) -> Self
    where
        F: Fn(SingletonContext) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        Self {
            name: name.into(),
            run: Arc::new(move |ctx| Box::pin(run(ctx))),
        }
    }
}

/// A running singleton. Dropping it cancels and aborts the task: a `JoinHandle` dropped on
/// its own would detach it and let it outlive its shard's lock.
struct Running {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    /// Cancels the singleton, gives it `grace` to return, then aborts it.
    async fn stop(mut self, name: &str, grace: Duration) {
        self.cancel.cancel();
        if tokio::time::timeout(grace, &mut self.task).await.is_err() {
            tracing::warn!(singleton = %name, ?grace, "singleton ignored cancellation; aborting");
        }
        // `self` drops here: aborts the task if it is still running.
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.task.abort();
    }
}

/// Runs each registered singleton while this runner owns its shard.
#[derive(Clone)]
pub struct Singletons {
    entries: Arc<Vec<(ShardId, Singleton)>>,
    running: Arc<Mutex<HashMap<String, Running>>>,
    runner_id: watch::Receiver<Option<RunnerId>>,
    client: Option<ShoalClient>,
    grace: Duration,
}

impl std::fmt::Debug for Singletons {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Singletons")
            .field("running", &self.running_names())
            .finish()
    }
}

impl Singletons {
    /// Singletons placed by `sharding`.
    pub fn new(
        sharding: Sharding,
        singletons: Vec<Singleton>,
        runner_id: watch::Receiver<Option<RunnerId>>,
        grace: Duration,
    ) -> Self {
        let entries = singletons
            .into_iter()
            .map(|s| (sharding.shard_of_key(&s.name), s))
            .collect();
        Self {
            entries: Arc::new(entries),
            running: Arc::new(Mutex::new(HashMap::new())),
            runner_id,
            client: None,
            grace,
        }
    }

    /// Hands the singletons this runner's `client` ([`SingletonContext::client`]).
    pub fn with_client(mut self, client: ShoalClient) -> Self {
        self.client = Some(client);
        self
    }

    fn running(&self) -> MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Names of the singletons running here now.
    pub fn running_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .running()
            .iter()
            .filter(|(_, r)| !r.task.is_finished())
            .map(|(n, _)| n.clone())
            .collect();
        names.sort();
        names
    }

    fn on_shard(&self, shard: ShardId) -> impl Iterator<Item = &Singleton> {
        self.entries
            .iter()
            .filter(move |(s, _)| *s == shard)
            .map(|(_, singleton)| singleton)
    }

    fn take(&self, shard: ShardId) -> Vec<(String, Running)> {
        let names: Vec<String> = self.on_shard(shard).map(|s| s.name.clone()).collect();
        let mut running = self.running();
        names
            .into_iter()
            .filter_map(|n| running.remove(&n).map(|r| (n, r)))
            .collect()
    }
}

impl ShardLifecycle for Singletons {
    fn acquired(&self, shard: ShardId, epoch: Epoch) {
        for singleton in self.on_shard(shard) {
            let cancel = CancellationToken::new();
            let ctx = SingletonContext {
                name: singleton.name.clone(),
                shard,
                epoch,
                runner_id: *self.runner_id.borrow(),
                client: self.client.clone(),
                cancel: cancel.clone(),
            };
            tracing::info!(singleton = %singleton.name, %shard, %epoch, "singleton starting");
            let task = tokio::spawn((singleton.run)(ctx));
            // A replaced one is aborted by its drop.
            drop(
                self.running()
                    .insert(singleton.name.clone(), Running { cancel, task }),
            );
            crate::metrics::singletons_running(self.running_names().len());
        }
    }

    fn drain(&self, shard: ShardId) -> BoxFuture<'static, ()> {
        let stopping = self.take(shard);
        let grace = self.grace;
        let this = self.clone();
        Box::pin(async move {
            // Side by side, each with its full grace; if this future is dropped first (the
            // drain timed out), every `Running` left in it aborts its task as it drops.
            let stops = stopping.into_iter().map(|(name, running)| async move {
                running.stop(&name, grace).await;
                tracing::info!(singleton = %name, "singleton stopped");
            });
            futures::future::join_all(stops).await;
            crate::metrics::singletons_running(this.running_names().len());
        })
    }

    fn fenced(&self, shards: &[ShardId]) {
        for shard in shards {
            for (name, running) in self.take(*shard) {
                drop(running);
                tracing::warn!(singleton = %name, "singleton aborted: runner fenced");
            }
        }
        crate::metrics::singletons_running(self.running_names().len());
    }
}

/// Several lifecycles told the same things, in order (drains run concurrently).
#[derive(Clone)]
pub struct Lifecycles(pub Vec<Arc<dyn ShardLifecycle>>);

impl std::fmt::Debug for Lifecycles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lifecycles({})", self.0.len())
    }
}

impl ShardLifecycle for Lifecycles {
    fn acquired(&self, shard: ShardId, epoch: Epoch) {
        for l in &self.0 {
            l.acquired(shard, epoch);
        }
    }

    fn drain(&self, shard: ShardId) -> BoxFuture<'static, ()> {
        let drains: Vec<_> = self.0.iter().map(|l| l.drain(shard)).collect();
        Box::pin(async move {
            futures::future::join_all(drains).await;
        })
    }

    fn fenced(&self, shards: &[ShardId]) {
        for l in &self.0 {
            l.fenced(shards);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_singleton_runs_only_while_its_shard_is_owned() {
        let sharding = Sharding::new(NonZeroU32::new(8).expect("non-zero"));
        let starts = Arc::new(AtomicUsize::new(0));
        let counter = starts.clone();
        let singleton = Singleton::new("leader", move |ctx| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                ctx.cancelled().await;
                assert!(!ctx.is_leader());
            }
        });
        let (_tx, rx) = watch::channel(RunnerId::new(1).ok());
        let singletons = Singletons::new(sharding, vec![singleton], rx, Duration::from_secs(1));
        let shard = sharding.shard_of_key("leader");
        let other = ShardId::new((shard.get() + 1) % 8);
        singletons.acquired(other, Epoch::new(1));
        assert!(singletons.running_names().is_empty());
        singletons.acquired(shard, Epoch::new(1));
        assert_eq!(singletons.running_names(), vec!["leader".to_owned()]);
        singletons.drain(shard).await;
        assert!(singletons.running_names().is_empty());
        singletons.acquired(shard, Epoch::new(2));
        while starts.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        singletons.fenced(&[shard]);
        assert!(singletons.running_names().is_empty());
    }

    /// Sends on its channel when dropped (when the singleton's future is dropped).
    struct Stopped(Option<tokio::sync::oneshot::Sender<()>>);

    impl Drop for Stopped {
        fn drop(&mut self) {
            if let Some(tx) = self.0.take() {
                let _ = tx.send(());
            }
        }
    }

    #[tokio::test]
    async fn singletons_never_outlive_a_drain_that_was_given_up() {
        // One shard: both singletons follow it. Neither honours cancellation.
        let sharding = Sharding::new(NonZeroU32::new(1).expect("non-zero"));
        let mut stopped = Vec::new();
        let mut singletons = Vec::new();
        for name in ["first", "second"] {
            let (tx, rx) = tokio::sync::oneshot::channel();
            stopped.push(rx);
            let guard = Arc::new(Mutex::new(Some(Stopped(Some(tx)))));
            singletons.push(Singleton::new(name, move |_ctx| {
                let guard = guard.lock().expect("not poisoned").take();
                async move {
                    let _guard = guard;
                    std::future::pending::<()>().await;
                }
            }));
        }
        let (_tx, rx) = watch::channel(RunnerId::new(1).ok());
        let singletons = Singletons::new(sharding, singletons, rx, Duration::from_secs(60));
        let shard = ShardId::new(0);
        singletons.acquired(shard, Epoch::new(1));
        assert_eq!(singletons.running_names().len(), 2);
        // The ownership loop's drain timer fires long before the singletons' grace.
        let drain = tokio::time::timeout(Duration::from_millis(50), singletons.drain(shard));
        assert!(drain.await.is_err(), "the drain was given up");
        // The lock is released now: neither singleton may still run.
        for rx in stopped {
            tokio::time::timeout(Duration::from_secs(5), rx)
                .await
                .expect("the singleton was aborted when its drain was given up")
                .expect("signalled");
        }
    }
}
