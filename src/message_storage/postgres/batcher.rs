//! Group commit: one batcher task per kind of request, and the isolation of bad rows.
//!
//! Callers hand their request to the task over a bounded channel and wait on a oneshot; the
//! task takes everything queued (up to `max_batch`) and runs it as one statement, with up to
//! `max_in_flight` batches at once. A batch the database refuses *as data* (SQLSTATE class
//! 22, 23 or 54: [`MessageStorageError::Unstorable`]) is split in halves and each half run
//! again, down to the single request to blame, which gets its kind's answer for a refused
//! request ([`BatchKind::refused`]); every other request commits. Any other error fails the
//! whole batch (a lost connection says nothing about one row).

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{BatchConfig, Inner};
use crate::message_storage::MessageStorageError;

pub(super) type Respond<T> = oneshot::Sender<Result<T, MessageStorageError>>;

/// One kind of batched request (saves, completions).
#[async_trait]
pub(super) trait BatchKind: Send + Sync + 'static {
    /// One caller's request.
    type Req: Send + Sync + 'static;
    /// One caller's answer.
    type Out: Send + 'static;

    /// Runs `batch` as one statement; answers in the batch's order.
    async fn run(inner: &Inner, batch: &[Self::Req])
    -> Result<Vec<Self::Out>, MessageStorageError>;

    /// The answer to a request the database refused as data on its own (`error` is
    /// [`MessageStorageError::Unstorable`]).
    async fn refused(
        inner: &Inner,
        request: &Self::Req,
        error: MessageStorageError,
    ) -> Result<Self::Out, MessageStorageError>;
}

/// Runs `batch`, splitting it on data errors so that only the requests to blame fail.
pub(super) async fn run_isolated<K: BatchKind>(
    inner: &Inner,
    batch: &[K::Req],
) -> Vec<Result<K::Out, MessageStorageError>> {
    let mut answers: Vec<Option<Result<K::Out, MessageStorageError>>> =
        (0..batch.len()).map(|_| None).collect();
    // Depth first, left half first: at most log2(batch) ranges wait at any time.
    let mut ranges: Vec<Range<usize>> = Vec::with_capacity(16);
    ranges.push(0..batch.len());
    while let Some(range) = ranges.pop() {
        let part = &batch[range.clone()];
        match K::run(inner, part).await {
            Ok(outs) => {
                for (slot, out) in answers[range].iter_mut().zip(outs) {
                    *slot = Some(Ok(out));
                }
            }
            Err(error @ MessageStorageError::Unstorable { .. }) if part.len() > 1 => {
                tracing::warn!(%error, rows = part.len(), "batch refused as data; splitting it");
                let mid = range.start + part.len() / 2;
                ranges.push(mid..range.end);
                ranges.push(range.start..mid);
            }
            Err(error @ MessageStorageError::Unstorable { .. }) => {
                tracing::warn!(%error, "one request refused as data; answering it alone");
                answers[range.start] = Some(K::refused(inner, &part[0], error).await);
            }
            Err(error) => {
                for slot in &mut answers[range] {
                    *slot = Some(Err(error.clone()));
                }
            }
        }
    }
    answers
        .into_iter()
        .map(|answer| answer.unwrap_or(Err(MessageStorageError::Shutdown)))
        .collect()
}

/// Collects queued requests into batches and runs up to `max_in_flight` at once. Ends when
/// every sender is gone.
pub(super) async fn run_batcher<K: BatchKind>(
    inner: Arc<Inner>,
    mut rx: mpsc::Receiver<(K::Req, Respond<K::Out>)>,
    config: BatchConfig,
) {
    let permits = Arc::new(Semaphore::new(config.max_in_flight));
    while let Some(first) = rx.recv().await {
        // Waiting for a permit first lets the queue fill while earlier batches commit.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let mut batch = vec![first];
        while batch.len() < config.max_batch {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let inner = inner.clone();
        tokio::spawn(async move {
            let (requests, responders): (Vec<K::Req>, Vec<Respond<K::Out>>) =
                batch.into_iter().unzip();
            let answers = run_isolated::<K>(&inner, &requests).await;
            for (respond, answer) in responders.into_iter().zip(answers) {
                let _ = respond.send(answer);
            }
            drop(permit);
        });
    }
}

/// Hands `request` to a batcher and waits for its answer.
pub(super) async fn submit<Req, Out>(
    tx: &mpsc::Sender<(Req, Respond<Out>)>,
    request: Req,
) -> Result<Out, MessageStorageError> {
    let (respond, response) = oneshot::channel();
    tx.send((request, respond))
        .await
        .map_err(|_| MessageStorageError::Shutdown)?;
    response.await.map_err(|_| MessageStorageError::Shutdown)?
}
