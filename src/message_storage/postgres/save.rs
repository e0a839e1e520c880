//! Saving a batch of messages: one multi-row insert, then the lookups that answer the
//! rows it did not insert (a duplicate idempotency key, a retried save, a taken id).

use std::collections::{BTreeSet, HashMap};

use async_trait::async_trait;
use sqlx::Row;

use super::batcher::BatchKind;
use super::{Inner, db_error, reply_from};
use crate::ids::MessageId;
use crate::message_storage::{MessageStorageError, NewMessage, Reply, SaveOutcome};

/// Saves, batched. Each save answers on its own: one message of a batch can be refused
/// (`IdTaken`, or `Unstorable` when the database refuses its data).
#[derive(Debug)]
pub(super) struct SaveKind;

#[async_trait]
impl BatchKind for SaveKind {
    type Req = NewMessage;
    type Out = Result<SaveOutcome, MessageStorageError>;

    async fn run(
        inner: &Inner,
        batch: &[NewMessage],
    ) -> Result<Vec<Self::Out>, MessageStorageError> {
        inner.save_batch(batch).await
    }

    async fn refused(
        _inner: &Inner,
        _request: &NewMessage,
        error: MessageStorageError,
    ) -> Result<Self::Out, MessageStorageError> {
        Ok(Err(error))
    }
}

impl Inner {
    /// Inserts a batch in one statement. Rows go in sorted by idempotency key, then id: an
    /// insert waits on a conflicting row another batch has not committed yet, so two batches
    /// holding the same keys in opposite orders would deadlock (two nodes retrying the same
    /// sends do that); one global order makes them queue instead.
    pub(super) async fn save_batch(
        &self,
        batch: &[NewMessage],
    ) -> Result<Vec<Result<SaveOutcome, MessageStorageError>>, MessageStorageError> {
        let inserted: Vec<i64> = sqlx::query_scalar(
            "INSERT INTO shoal_messages
                 (id, cluster, shard, entity_type, entity_id, tag, payload, idempotency_key,
                  deliver_at)
             SELECT m.id, $1, m.shard, m.entity_type, m.entity_id, m.tag, m.payload, m.key,
                    m.deliver_at
               FROM unnest($2::int8[], $3::int4[], $4::text[], $5::text[], $6::text[],
                           $7::jsonb[], $8::text[], $9::timestamptz[])
                    AS m(id, shard, entity_type, entity_id, tag, payload, key, deliver_at)
             ORDER BY m.key IS NULL, m.entity_type, m.entity_id, m.key, m.id
             ON CONFLICT DO NOTHING
             RETURNING id",
        )
        .bind(self.cluster.as_str())
        .bind(batch.iter().map(|m| m.id.get()).collect::<Vec<_>>())
        .bind(batch.iter().map(|m| m.shard.lock_key()).collect::<Vec<_>>())
        .bind(
            batch
                .iter()
                .map(|m| m.address.entity_type.as_str().to_owned())
                .collect::<Vec<_>>(),
        )
        .bind(
            batch
                .iter()
                .map(|m| m.address.entity_id.as_str().to_owned())
                .collect::<Vec<_>>(),
        )
        .bind(batch.iter().map(|m| m.tag.clone()).collect::<Vec<_>>())
        .bind(batch.iter().map(|m| m.payload.clone()).collect::<Vec<_>>())
        .bind(
            batch
                .iter()
                .map(|m| m.idempotency_key.clone())
                .collect::<Vec<_>>(),
        )
        .bind(batch.iter().map(|m| m.deliver_at).collect::<Vec<_>>())
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        let inserted: BTreeSet<i64> = inserted.into_iter().collect();

        // Keyed messages that were not inserted met an earlier one: find it and its reply.
        let conflicts: Vec<&NewMessage> = batch
            .iter()
            .filter(|m| !inserted.contains(&m.id.get()) && m.idempotency_key.is_some())
            .collect();
        let existing = if conflicts.is_empty() {
            HashMap::new()
        } else {
            self.find_by_keys(&conflicts).await?
        };
        // An id twice in one batch (two generators sharing this storage) is resolved by
        // the row's content like any other conflict.
        let mut seen = BTreeSet::new();
        let repeated: BTreeSet<i64> = batch
            .iter()
            .map(|m| m.id.get())
            .filter(|id| !seen.insert(*id))
            .collect();
        let outcomes: Vec<Option<SaveOutcome>> = batch
            .iter()
            .map(|m| {
                if repeated.contains(&m.id.get()) {
                    return None;
                }
                if inserted.contains(&m.id.get()) {
                    return Some(SaveOutcome::Stored(m.id));
                }
                let key = (
                    m.address.entity_type.as_str().to_owned(),
                    m.address.entity_id.as_str().to_owned(),
                    m.idempotency_key.clone().unwrap_or_default(),
                );
                match existing.get(&key) {
                    Some((id, reply)) if *id != m.id => Some(SaveOutcome::Duplicate {
                        id: *id,
                        reply: reply.clone(),
                    }),
                    // Same key, same id: saved before (a retried save).
                    Some(_) => Some(SaveOutcome::Stored(m.id)),
                    // The id itself conflicted: see whose it is.
                    None => None,
                }
            })
            .collect();
        let unresolved: Vec<&NewMessage> = batch
            .iter()
            .zip(&outcomes)
            .filter(|(_, outcome)| outcome.is_none())
            .map(|(m, _)| m)
            .collect();
        let mut taken = if unresolved.is_empty() {
            Vec::new()
        } else {
            self.taken_by_others(&unresolved).await?
        }
        .into_iter();
        Ok(batch
            .iter()
            .zip(outcomes)
            .map(|(m, outcome)| match outcome {
                Some(outcome) => Ok(outcome),
                // `taken` follows the order of the unresolved messages.
                None => match taken.next() {
                    Some(true) => Err(MessageStorageError::IdTaken(m.id)),
                    // The same message saved before (a retried save): it is stored.
                    _ => Ok(SaveOutcome::Stored(m.id)),
                },
            })
            .collect())
    }

    /// For each of `messages`, whether its id is held by a different message: two nodes
    /// that share a machine id generate the same ids, and merging their messages would lose
    /// one and answer its sender with the other's reply.
    async fn taken_by_others(
        &self,
        messages: &[&NewMessage],
    ) -> Result<Vec<bool>, MessageStorageError> {
        let rows = sqlx::query(
            "SELECT id, cluster, entity_type, entity_id, tag, payload, idempotency_key
               FROM shoal_messages WHERE id = ANY($1)",
        )
        .bind(messages.iter().map(|m| m.id.get()).collect::<Vec<_>>())
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        // cluster, entity type, entity id, tag, payload, idempotency key
        type Content = (
            String,
            String,
            String,
            String,
            serde_json::Value,
            Option<String>,
        );
        let mut stored: HashMap<i64, Content> = HashMap::new();
        for row in rows {
            stored.insert(
                row.try_get("id").map_err(db_error)?,
                (
                    row.try_get("cluster").map_err(db_error)?,
                    row.try_get("entity_type").map_err(db_error)?,
                    row.try_get("entity_id").map_err(db_error)?,
                    row.try_get("tag").map_err(db_error)?,
                    row.try_get("payload").map_err(db_error)?,
                    row.try_get("idempotency_key").map_err(db_error)?,
                ),
            );
        }
        Ok(messages
            .iter()
            .map(|m| match stored.get(&m.id.get()) {
                Some((cluster, entity_type, entity_id, tag, payload, key)) => {
                    cluster != self.cluster.as_str()
                        || entity_type != m.address.entity_type.as_str()
                        || entity_id != m.address.entity_id.as_str()
                        || *tag != m.tag
                        || *payload != m.payload
                        || *key != m.idempotency_key
                }
                None => false,
            })
            .collect())
    }

    async fn find_by_keys(
        &self,
        messages: &[&NewMessage],
    ) -> Result<HashMap<(String, String, String), (MessageId, Option<Reply>)>, MessageStorageError>
    {
        let rows = sqlx::query(
            "SELECT m.entity_type, m.entity_id, m.idempotency_key, m.id, r.ok, r.payload
               FROM unnest($2::text[], $3::text[], $4::text[]) AS k(entity_type, entity_id, key)
               JOIN shoal_messages m
                 ON m.cluster = $1 AND m.entity_type = k.entity_type
                AND m.entity_id = k.entity_id AND m.idempotency_key = k.key
               LEFT JOIN shoal_replies r ON r.message_id = m.id",
        )
        .bind(self.cluster.as_str())
        .bind(
            messages
                .iter()
                .map(|m| m.address.entity_type.as_str().to_owned())
                .collect::<Vec<_>>(),
        )
        .bind(
            messages
                .iter()
                .map(|m| m.address.entity_id.as_str().to_owned())
                .collect::<Vec<_>>(),
        )
        .bind(
            messages
                .iter()
                .map(|m| m.idempotency_key.clone().unwrap_or_default())
                .collect::<Vec<_>>(),
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        let mut found = HashMap::new();
        for row in rows {
            let key = (
                row.try_get::<String, _>("entity_type").map_err(db_error)?,
                row.try_get::<String, _>("entity_id").map_err(db_error)?,
                row.try_get::<String, _>("idempotency_key")
                    .map_err(db_error)?,
            );
            let id = MessageId::new(row.try_get("id").map_err(db_error)?);
            let ok: Option<bool> = row.try_get("ok").map_err(db_error)?;
            let payload: Option<serde_json::Value> = row.try_get("payload").map_err(db_error)?;
            let reply = ok.zip(payload).map(|(ok, payload)| reply_from(ok, payload));
            found.insert(key, (id, reply));
        }
        Ok(found)
    }
}
