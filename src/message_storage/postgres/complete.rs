//! Completing a batch of messages in one statement, and the completion written instead of
//! one the database refuses.

use std::collections::{BTreeSet, HashMap};

use async_trait::async_trait;
use sqlx::Row;

use super::batcher::BatchKind;
use super::{Inner, db_error, reply_columns};
use crate::message_storage::storable::unstorable_completion;
use crate::message_storage::{Completion, CompletionOutcome, MessageStorageError, NewMessage};

/// Completions, batched.
#[derive(Debug)]
pub(super) struct CompleteKind;

#[async_trait]
impl BatchKind for CompleteKind {
    type Req = Completion;
    type Out = CompletionOutcome;

    async fn run(
        inner: &Inner,
        batch: &[Completion],
    ) -> Result<Vec<CompletionOutcome>, MessageStorageError> {
        inner.complete_batch(batch).await
    }

    /// The reply or state was refused: the message is completed once with an error reply
    /// and no state, so it is neither retried with its neighbours nor redelivered.
    async fn refused(
        inner: &Inner,
        request: &Completion,
        error: MessageStorageError,
    ) -> Result<CompletionOutcome, MessageStorageError> {
        tracing::error!(message_id = %request.message_id, %error, "completion refused by the database; completing with an error reply");
        let substitute = unstorable_completion(request, &error);
        let outcome = inner
            .complete_batch(std::slice::from_ref(&substitute))
            .await?;
        Ok(match outcome.first() {
            Some(CompletionOutcome::Committed) => CompletionOutcome::Unstorable,
            Some(other) => *other,
            None => CompletionOutcome::AlreadyProcessed,
        })
    }
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Binds the batch's outbox messages, one array per column, each row naming the position
/// (1-based, as `WITH ORDINALITY` counts) of the completion it belongs to.
fn bind_outbox<'q>(query: Query<'q>, batch: &[Completion]) -> Query<'q> {
    let rows: Vec<(i64, &NewMessage)> = batch
        .iter()
        .enumerate()
        .flat_map(|(i, c)| c.outbox.iter().map(move |m| (i as i64 + 1, m)))
        .collect();
    query
        .bind(rows.iter().map(|(n, _)| *n).collect::<Vec<i64>>())
        .bind(rows.iter().map(|(_, m)| m.id.get()).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|(_, m)| m.shard.lock_key())
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|(_, m)| m.address.entity_type.as_str().to_owned())
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|(_, m)| m.address.entity_id.as_str().to_owned())
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|(_, m)| m.tag.clone()).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|(_, m)| m.payload.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|(_, m)| m.idempotency_key.clone())
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|(_, m)| m.deliver_at).collect::<Vec<_>>())
}

impl Inner {
    /// Completes a batch in ONE statement (one round trip, one commit): the shard rows are
    /// locked `FOR SHARE` and their epochs checked, the messages still unprocessed are
    /// marked, and replies, entity state and outbox messages are written for exactly those.
    pub(super) async fn complete_batch(
        &self,
        batch: &[Completion],
    ) -> Result<Vec<CompletionOutcome>, MessageStorageError> {
        let shards: BTreeSet<i32> = batch.iter().map(|c| c.shard.lock_key()).collect();
        let (oks, payloads): (Vec<bool>, Vec<serde_json::Value>) =
            batch.iter().map(|c| reply_columns(&c.reply)).unzip();
        let states: Vec<Option<serde_json::Value>> = batch
            .iter()
            .map(|c| c.state.as_ref().map(|(_, s)| s.clone()))
            .collect();
        let state_types: Vec<Option<String>> = batch
            .iter()
            .map(|c| {
                c.state
                    .as_ref()
                    .map(|(a, _)| a.entity_type.as_str().to_owned())
            })
            .collect();
        let state_ids: Vec<Option<String>> = batch
            .iter()
            .map(|c| {
                c.state
                    .as_ref()
                    .map(|(a, _)| a.entity_id.as_str().to_owned())
            })
            .collect();
        let rows = sqlx::query(include_str!("../queries/complete_batch.sql"))
            .bind(self.cluster.as_str())
            .bind(shards.into_iter().collect::<Vec<_>>())
            .bind(batch.iter().map(|c| c.message_id.get()).collect::<Vec<_>>())
            .bind(batch.iter().map(|c| c.shard.lock_key()).collect::<Vec<_>>())
            .bind(batch.iter().map(|c| c.epoch.get()).collect::<Vec<_>>())
            .bind(oks)
            .bind(payloads)
            .bind(state_types)
            .bind(state_ids)
            .bind(states);
        let rows = bind_outbox(rows, batch)
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
        let mut epochs = HashMap::new();
        let mut marked = BTreeSet::new();
        for row in rows {
            let kind: String = row.try_get("kind").map_err(db_error)?;
            let a: i64 = row.try_get("a").map_err(db_error)?;
            let b: i64 = row.try_get("b").map_err(db_error)?;
            if kind == "epoch" {
                epochs.insert(a as i32, b);
            } else {
                marked.insert(a);
            }
        }
        // The first completion of each marked message is the one that committed.
        let mut won = BTreeSet::new();
        Ok(batch
            .iter()
            .map(|c| {
                if epochs.get(&c.shard.lock_key()) != Some(&c.epoch.get()) {
                    CompletionOutcome::Fenced
                } else if marked.contains(&c.message_id.get()) && won.insert(c.message_id) {
                    CompletionOutcome::Committed
                } else {
                    CompletionOutcome::AlreadyProcessed
                }
            })
            .collect())
    }

    /// Completes a row whose address cannot be parsed with an error reply, so it is
    /// reported once instead of being scanned forever.
    pub(super) async fn reject_malformed(
        &self,
        id: i64,
        problem: &str,
    ) -> Result<(), MessageStorageError> {
        tracing::error!(
            message_id = id,
            problem,
            "malformed message in storage; rejecting it"
        );
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        sqlx::query(
            "UPDATE shoal_messages SET processed = true, processed_at = now()
              WHERE cluster = $1 AND id = $2",
        )
        .bind(self.cluster.as_str())
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        sqlx::query(
            "INSERT INTO shoal_replies (message_id, ok, payload) VALUES ($1, false, $2)
             ON CONFLICT (message_id) DO NOTHING",
        )
        .bind(id)
        .bind(serde_json::json!({"code": "malformed_message", "message": problem}))
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)
    }
}
