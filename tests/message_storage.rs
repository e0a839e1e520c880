//! Conformance suite of [`MessageStorage`]: every case is written once, over `&dyn Fixture`,
//! and runs against the memory backend (`memory::`) and against PostgreSQL (`postgres::`,
//! group commit on, a fresh database and a unique cluster name per test). A few
//! Postgres-only cases check what only the schema and the batchers can show: the unique
//! reply constraint, malformed rows, cluster isolation and saves under load.
//!
//! The Postgres tests connect to `SHOAL_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`), create `shoal_t_<uuid>` there (the
//! testkit's `TestDb`) and drop it afterwards, also when the case fails.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use futures::future::BoxFuture;
use serde_json::json;
use shoal::message_storage::storable::UNSTORABLE_REPLY;
use shoal::message_storage::{
    Completion, CompletionOutcome, MessageStorage, MessageStorageError, NewMessage, Reply,
    SaveOutcome, StoredMessage,
};
use shoal::snowflake::Snowflake;
use shoal::{EntityAddress, EntityId, EntityType, Epoch, MessageId, ShardId};
use tokio::sync::Barrier;

/// How long one case may run before it counts as hung.
const CASE_DEADLINE: Duration = Duration::from_secs(60);

/// What a case needs from a backend besides the trait: a way to move a shard's epoch on,
/// as an owner's acquisition does.
#[async_trait]
trait Fixture: Send + Sync {
    /// The storage under test (shared, so cases can spawn tasks on it).
    fn storage(&self) -> Arc<dyn MessageStorage>;
    /// Makes `epoch` the shard's current epoch.
    async fn set_epoch(&self, shard: ShardId, epoch: Epoch) -> anyhow::Result<()>;
}

fn address(entity_type: &str, entity_id: &str) -> anyhow::Result<EntityAddress> {
    Ok(EntityAddress {
        entity_type: EntityType::new(entity_type)?,
        entity_id: EntityId::new(entity_id)?,
    })
}

/// A `counter` message to `entity` on `shard`.
fn message(
    id: MessageId,
    shard: u32,
    entity: &str,
    key: Option<&str>,
) -> anyhow::Result<NewMessage> {
    Ok(NewMessage {
        id,
        shard: ShardId::new(shard),
        address: address("counter", entity)?,
        tag: "increment".to_owned(),
        payload: json!({ "by": 1, "sent_as": id.get() }),
        idempotency_key: key.map(str::to_owned),
        deliver_at: None,
    })
}

fn completion(message: &NewMessage, epoch: i64, reply: Reply) -> Completion {
    Completion {
        message_id: message.id,
        shard: message.shard,
        epoch: Epoch::new(epoch),
        reply,
        state: None,
        outbox: Vec::new(),
    }
}

fn ok(value: serde_json::Value) -> Reply {
    Reply::Ok { value }
}

/// An instant a whole number of seconds from now, so it survives Postgres' microsecond
/// timestamps unchanged.
fn whole_seconds_from_now(seconds: i64) -> anyhow::Result<DateTime<Utc>> {
    DateTime::from_timestamp(Utc::now().timestamp() + seconds, 0).context("instant in range")
}

fn ids_of(messages: &[StoredMessage]) -> Vec<MessageId> {
    messages.iter().map(|m| m.id).collect()
}

/// The cases every backend must pass.
mod suite {
    use super::*;

    pub async fn save_returns_stored(fx: &dyn Fixture) -> anyhow::Result<()> {
        let storage = fx.storage();
        let ids = Snowflake::new(1);
        let m = message(ids.next_id(), 3, "a", None)?;

        assert_eq!(storage.save(m.clone()).await?, SaveOutcome::Stored(m.id));
        // Stored as given, with no attempts yet, and not answered.
        let listed = storage.unprocessed(m.shard, Utc::now(), 10).await?;
        assert_eq!(listed, vec![StoredMessage::from(m.clone())]);
        assert_eq!(storage.reply(m.id).await?, None);
        Ok(())
    }

    pub async fn duplicate_key_returns_first_id_then_its_reply(
        fx: &dyn Fixture,
    ) -> anyhow::Result<()> {
        let storage = fx.storage();
        let ids = Snowflake::new(1);
        fx.set_epoch(ShardId::new(1), Epoch::new(1)).await?;
        let first = message(ids.next_id(), 1, "a", Some("k"))?;
        let second = message(ids.next_id(), 1, "a", Some("k"))?;

        assert_eq!(
            storage.save(first.clone()).await?,
            SaveOutcome::Stored(first.id)
        );
        let pending = SaveOutcome::Duplicate {
            id: first.id,
            reply: None,
        };
        assert_eq!(storage.save(second.clone()).await?, pending);
        let listed = storage.unprocessed(first.shard, Utc::now(), 10).await?;
        assert_eq!(
            ids_of(&listed),
            vec![first.id],
            "the duplicate was not stored"
        );

        let reply = ok(json!({ "total": 1 }));
        let done = storage
            .complete(completion(&first, 1, reply.clone()))
            .await?;
        assert_eq!(done, CompletionOutcome::Committed);
        let answered = SaveOutcome::Duplicate {
            id: first.id,
            reply: Some(reply),
        };
        // A retry of the duplicate, and a brand-new send with the key, both meet the reply.
        assert_eq!(storage.save(second).await?, answered);
        let third = message(ids.next_id(), 1, "a", Some("k"))?;
        assert_eq!(storage.save(third).await?, answered);
        Ok(())
    }

    pub async fn same_key_on_another_entity_is_a_new_message(
        fx: &dyn Fixture,
    ) -> anyhow::Result<()> {
        let storage = fx.storage();
        let ids = Snowflake::new(1);
        let a = message(ids.next_id(), 1, "a", Some("k"))?;
        let b = message(ids.next_id(), 1, "b", Some("k"))?;
        // Same entity id, other entity type: another entity too.
        let mut c = message(ids.next_id(), 1, "a", Some("k"))?;
        c.address = address("job", "a")?;

        for m in [&a, &b, &c] {
            assert_eq!(storage.save(m.clone()).await?, SaveOutcome::Stored(m.id));
        }
        let listed = storage.unprocessed(a.shard, Utc::now(), 10).await?;
        assert_eq!(ids_of(&listed), vec![a.id, b.id, c.id]);
        Ok(())
    }

    pub async fn saving_the_same_id_twice_is_stored(fx: &dyn Fixture) -> anyhow::Result<()> {
        let storage = fx.storage();
        let ids = Snowflake::new(1);
        fx.set_epoch(ShardId::new(2), Epoch::new(1)).await?;
        let keyed = message(ids.next_id(), 2, "a", Some("k"))?;
        let plain = message(ids.next_id(), 2, "b", None)?;

        for m in [&keyed, &plain, &keyed, &plain] {
            assert_eq!(storage.save(m.clone()).await?, SaveOutcome::Stored(m.id));
        }
        let listed = storage.unprocessed(keyed.shard, Utc::now(), 10).await?;
        assert_eq!(
            ids_of(&listed),
            vec![keyed.id, plain.id],
            "stored once each"
        );

        // A retry that arrives after completion does not bring the message back.
        let done = storage
            .complete(completion(&keyed, 1, ok(json!(1))))
            .await?;
        assert_eq!(done, CompletionOutcome::Committed);
        assert_eq!(
            storage.save(keyed.clone()).await?,
            SaveOutcome::Stored(keyed.id)
        );
        let listed = storage.unprocessed(keyed.shard, Utc::now(), 10).await?;
        assert_eq!(ids_of(&listed), vec![plain.id]);
        Ok(())
    }

    pub async fn concurrent_saves_with_one_key_store_one_message(
        fx: &dyn Fixture,
    ) -> anyhow::Result<()> {
        const SENDERS: usize = 10;
        let storage = fx.storage();
        let ids = Snowflake::new(1);
        let start = Arc::new(Barrier::new(SENDERS));
        let mut tasks = Vec::new();
        for _ in 0..SENDERS {
            let m = message(ids.next_id(), 2, "a", Some("once"))?;
            let (storage, start) = (storage.clone(), start.clone());
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                storage.save(m).await
            }));
        }
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await??);
        }

        let stored: Vec<MessageId> = outcomes
            .iter()
            .filter_map(|o| match o {
                SaveOutcome::Stored(id) => Some(*id),
                SaveOutcome::Duplicate { .. } => None,
            })
            .collect();
        assert_eq!(stored.len(), 1, "exactly one save stores: {outcomes:?}");
        let winner = stored[0];
        let duplicate = SaveOutcome::Duplicate {
            id: winner,
            reply: None,
        };
        let duplicates = outcomes.iter().filter(|o| **o == duplicate).count();
        assert_eq!(duplicates, SENDERS - 1, "{outcomes:?}");
        let listed = storage
            .unprocessed(ShardId::new(2), Utc::now(), 100)
            .await?;
        assert_eq!(ids_of(&listed), vec![winner]);
        Ok(())
    }

    pub async fn unprocessed_lists_one_shard_in_id_order_up_to_limit(
        fx: &dyn Fixture,
    ) -> anyhow::Result<()> {
        let storage = fx.storage();
        let ids = Snowflake::new(1);
        let a = message(ids.next_id(), 4, "a", None)?;
        let b = message(ids.next_id(), 4, "b", None)?;
        let other_shard = message(ids.next_id(), 5, "c", None)?;
        let c = message(ids.next_id(), 4, "a", None)?;
        // Saved out of id order: the listing still follows ids.
        for m in [&c, &other_shard, &a, &b] {
            storage.save(m.clone()).await?;
        }

        let now = Utc::now();
        let shard = ShardId::new(4);
        assert_eq!(
            ids_of(&storage.unprocessed(shard, now, 10).await?),
            vec![a.id, b.id, c.id]
        );
        assert_eq!(
            ids_of(&storage.unprocessed(shard, now, 2).await?),
            vec![a.id, b.id]
        );
        assert_eq!(storage.unprocessed(shard, now, 0).await?, vec![]);
        let fifth = storage.unprocessed(ShardId::new(5), now, 10).await?;
        assert_eq!(ids_of(&fifth), vec![other_shard.id]);
        assert_eq!(storage.unprocessed(ShardId::new(6), now, 10).await?, vec![]);
        Ok(())
    }

    pub async fn scheduled_message_waits_for_its_instant(fx: &dyn Fixture) -> anyhow::Result<()> {
        let storage = fx.storage();
        let ids = Snowflake::new(1);
        let now = Utc::now();
        let at = whole_seconds_from_now(3600)?;
        let later = at + TimeDelta::hours(1);
        let mut scheduled = message(ids.next_id(), 7, "a", None)?;
        scheduled.deliver_at = Some(at);
        let mut last = message(ids.next_id(), 7, "b", None)?;
        last.deliver_at = Some(later);
        let plain = message(ids.next_id(), 7, "c", None)?;
        for m in [&scheduled, &last, &plain] {
            storage.save(m.clone()).await?;
        }
        let shard = ShardId::new(7);

        assert_eq!(
            ids_of(&storage.unprocessed(shard, now, 10).await?),
            vec![plain.id]
        );
        assert_eq!(storage.next_due(shard, now).await?, Some(at));
        let just_before = at - TimeDelta::milliseconds(1);
        assert_eq!(
            ids_of(&storage.unprocessed(shard, just_before, 10).await?),
            vec![plain.id]
        );

        let due = storage.unprocessed(shard, at, 10).await?;
        assert_eq!(ids_of(&due), vec![scheduled.id, plain.id]);
        assert_eq!(
            due[0],
            StoredMessage::from(scheduled),
            "deliver_at kept as saved"
        );
        assert_eq!(storage.next_due(shard, at).await?, Some(later));
        assert_eq!(storage.next_due(shard, later).await?, None);
        assert_eq!(storage.next_due(ShardId::new(8), now).await?, None);
        Ok(())
    }

    pub async fn complete_commits_once_then_already_processed(
        fx: &dyn Fixture,
    ) -> anyhow::Result<()> {
        let storage = fx.storage();
        let ids = Snowflake::new(1);
        fx.set_epoch(ShardId::new(1), Epoch::new(3)).await?;
        let m = message(ids.next_id(), 1, "a", None)?;
        storage.save(m.clone()).await?;

        let reply = Reply::Err {
            code: "insufficient_funds".to_owned(),
            message: "balance is 0".to_owned(),
        };
        let done = storage.complete(completion(&m, 3, reply.clone())).await?;
        assert_eq!(done, CompletionOutcome::Committed);
        assert_eq!(storage.unprocessed(m.shard, Utc::now(), 10).await?, vec![]);
        assert_eq!(storage.reply(m.id).await?, Some(reply.clone()));

        let again = storage
            .complete(completion(&m, 3, ok(json!("other"))))
            .await?;
        assert_eq!(again, CompletionOutcome::AlreadyProcessed);
        assert_eq!(
            storage.reply(m.id).await?,
            Some(reply),
            "the first reply stays"
        );
        Ok(())
    }

    pub async fn stale_epoch_is_fenced_and_writes_nothing(fx: &dyn Fixture) -> anyhow::Result<()> {
        let storage = fx.storage();
        let ids = Snowflake::new(1);
        let shard = ShardId::new(2);
        fx.set_epoch(shard, Epoch::new(1)).await?;
        let m = message(ids.next_id(), 2, "a", None)?;
        storage.save(m.clone()).await?;
        fx.set_epoch(shard, Epoch::new(2)).await?;

        let account = address("counter", "a")?;
        let mut stale = completion(&m, 1, ok(json!("stale")));
        stale.state = Some((account.clone(), json!({ "n": 1 })));
        assert_eq!(storage.complete(stale).await?, CompletionOutcome::Fenced);
        // An epoch from the future, or a shard nobody acquired, is no better.
        let ahead = completion(&m, 3, ok(json!("ahead")));
        assert_eq!(storage.complete(ahead).await?, CompletionOutcome::Fenced);
        let unowned = message(ids.next_id(), 9, "z", None)?;
        storage.save(unowned.clone()).await?;
        let orphan = completion(&unowned, 1, ok(json!("orphan")));
        assert_eq!(storage.complete(orphan).await?, CompletionOutcome::Fenced);

        // Nothing was written: still unprocessed, no reply, no state.
        let listed = storage.unprocessed(shard, Utc::now(), 10).await?;
        assert_eq!(listed, vec![StoredMessage::from(m.clone())]);
        assert_eq!(storage.reply(m.id).await?, None);
        assert_eq!(storage.load_state(&account).await?, None);
        assert_eq!(storage.reply(unowned.id).await?, None);

        // The current owner can still complete it.
        let current = completion(&m, 2, ok(json!("current")));
        assert_eq!(
            storage.complete(current).await?,
            CompletionOutcome::Committed
        );
        assert_eq!(storage.reply(m.id).await?, Some(ok(json!("current"))));
        Ok(())
    }

    pub async fn state_commits_only_with_its_completion(fx: &dyn Fixture) -> anyhow::Result<()> {
        let storage = fx.storage();
        let ids = Snowflake::new(1);
        let shard = ShardId::new(1);
        fx.set_epoch(shard, Epoch::new(1)).await?;
        let account = address("counter", "acct")?;
        let first = message(ids.next_id(), 1, "acct", None)?;
        let second = message(ids.next_id(), 1, "acct", None)?;
        let third = message(ids.next_id(), 1, "acct", None)?;
        for m in [&first, &second, &third] {
            storage.save(m.clone()).await?;
        }
        let with_state = |m: &NewMessage, epoch: i64, state: serde_json::Value| Completion {
            state: Some((account.clone(), state)),
            ..completion(m, epoch, ok(json!(null)))
        };

        let done = storage
            .complete(with_state(&first, 1, json!({ "balance": 10 })))
            .await?;
        assert_eq!(done, CompletionOutcome::Committed);
        let committed = Some(json!({ "balance": 10 }));
        assert_eq!(storage.load_state(&account).await?, committed);

        let redelivered = storage
            .complete(with_state(&first, 1, json!({ "balance": 20 })))
            .await?;
        assert_eq!(redelivered, CompletionOutcome::AlreadyProcessed);
        assert_eq!(storage.load_state(&account).await?, committed);

        fx.set_epoch(shard, Epoch::new(2)).await?;
        let fenced = storage
            .complete(with_state(&second, 1, json!({ "balance": -1 })))
            .await?;
        assert_eq!(fenced, CompletionOutcome::Fenced);
        assert_eq!(storage.load_state(&account).await?, committed);

        // A completion without state leaves the stored state alone.
        let plain = storage
            .complete(completion(&second, 2, ok(json!(null))))
            .await?;
        assert_eq!(plain, CompletionOutcome::Committed);
        assert_eq!(storage.load_state(&account).await?, committed);
        // The next committed state replaces it.
        let next = storage
            .complete(with_state(&third, 2, json!({ "balance": 25 })))
            .await?;
        assert_eq!(next, CompletionOutcome::Committed);
        let replaced = Some(json!({ "balance": 25 }));
        assert_eq!(storage.load_state(&account).await?, replaced);
        assert_eq!(
            storage.load_state(&address("counter", "other")?).await?,
            None
        );
        Ok(())
    }

    pub async fn concurrent_completions_store_exactly_one_reply(
        fx: &dyn Fixture,
    ) -> anyhow::Result<()> {
        const OWNERS: usize = 20;
        let storage = fx.storage();
        let ids = Snowflake::new(1);
        fx.set_epoch(ShardId::new(1), Epoch::new(1)).await?;
        let account = address("counter", "a")?;
        let m = message(ids.next_id(), 1, "a", None)?;
        storage.save(m.clone()).await?;

        let start = Arc::new(Barrier::new(OWNERS));
        let mut tasks = Vec::new();
        for i in 0..OWNERS {
            let mut c = completion(&m, 1, ok(json!({ "winner": i })));
            c.state = Some((account.clone(), json!({ "winner": i })));
            let (storage, start) = (storage.clone(), start.clone());
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                storage.complete(c).await
            }));
        }
        let mut committed = Vec::new();
        let mut already = 0;
        for (i, task) in tasks.into_iter().enumerate() {
            match task.await?? {
                CompletionOutcome::Committed => committed.push(i),
                CompletionOutcome::AlreadyProcessed => already += 1,
                other => anyhow::bail!("completion {i}: {other:?}"),
            }
        }
        assert_eq!(committed.len(), 1, "one winner: {committed:?}");
        assert_eq!(already, OWNERS - 1);
        let winner = committed[0];
        // The stored reply and state are the winner's, not a later loser's.
        let expected = Some(ok(json!({ "winner": winner })));
        assert_eq!(storage.reply(m.id).await?, expected);
        let state = storage.load_state(&account).await?;
        assert_eq!(state, Some(json!({ "winner": winner })));
        Ok(())
    }

    pub async fn record_attempts_counts_deliveries(fx: &dyn Fixture) -> anyhow::Result<()> {
        let storage = fx.storage();
        let ids = Snowflake::new(1);
        let a = message(ids.next_id(), 3, "a", None)?;
        let b = message(ids.next_id(), 3, "b", None)?;
        storage.save(a.clone()).await?;
        storage.save(b.clone()).await?;

        storage.record_attempts(&[]).await?;
        storage.record_attempts(&[a.id]).await?;
        storage.record_attempts(&[a.id, b.id]).await?;
        storage.record_attempts(&[a.id, ids.next_id()]).await?;

        let listed = storage.unprocessed(a.shard, Utc::now(), 10).await?;
        let attempts: Vec<(MessageId, i32)> = listed.iter().map(|m| (m.id, m.attempts)).collect();
        assert_eq!(attempts, vec![(a.id, 3), (b.id, 1)]);
        Ok(())
    }

    pub async fn unprocessed_after_pages_by_id(fx: &dyn Fixture) -> anyhow::Result<()> {
        let storage = fx.storage();
        let ids = Snowflake::new(1);
        let rows: Vec<NewMessage> = (0..5)
            .map(|n| message(ids.next_id(), 11, &format!("p{n}"), None))
            .collect::<anyhow::Result<_>>()?;
        for m in &rows {
            storage.save(m.clone()).await?;
        }
        let shard = ShardId::new(11);
        let now = Utc::now();
        let first = storage.unprocessed_after(shard, now, None, 2).await?;
        assert_eq!(ids_of(&first), vec![rows[0].id, rows[1].id]);
        let second = storage
            .unprocessed_after(shard, now, Some(rows[1].id), 2)
            .await?;
        assert_eq!(ids_of(&second), vec![rows[2].id, rows[3].id]);
        let last = storage
            .unprocessed_after(shard, now, Some(rows[3].id), 2)
            .await?;
        assert_eq!(ids_of(&last), vec![rows[4].id]);
        assert_eq!(
            storage
                .unprocessed_after(shard, now, Some(rows[4].id), 2)
                .await?,
            vec![]
        );
        Ok(())
    }

    pub async fn postpone_counts_an_attempt_and_moves_the_due_time(
        fx: &dyn Fixture,
    ) -> anyhow::Result<()> {
        let storage = fx.storage();
        let ids = Snowflake::new(1);
        let m = message(ids.next_id(), 12, "later", None)?;
        storage.save(m.clone()).await?;
        let until = whole_seconds_from_now(3600)?;
        storage.postpone(m.id, until).await?;
        let shard = ShardId::new(12);
        assert_eq!(storage.unprocessed(shard, Utc::now(), 10).await?, vec![]);
        assert_eq!(storage.next_due(shard, Utc::now()).await?, Some(until));
        let due = storage.unprocessed(shard, until, 10).await?;
        assert_eq!(ids_of(&due), vec![m.id]);
        assert_eq!(due[0].attempts, 1);
        assert_eq!(due[0].deliver_at, Some(until));
        Ok(())
    }

    pub async fn unstorable_message_is_refused_alone_naming_the_field(
        fx: &dyn Fixture,
    ) -> anyhow::Result<()> {
        const GOOD: usize = 60;
        let storage = fx.storage();
        let ids = Snowflake::new(1);
        // Every fifth save holds a NUL: in the payload, deep down, or in its key.
        let start = Arc::new(Barrier::new(GOOD + GOOD / 5));
        let mut tasks = Vec::new();
        for i in 0..GOOD + GOOD / 5 {
            let mut m = message(ids.next_id(), 2, &format!("e{i}"), Some(&format!("k{i}")))?;
            let bad = i % 6 == 5;
            if bad && i % 12 == 5 {
                m.payload = json!({ "by": 1, "notes": [{ "text": "a" }, { "text": "b\u{0}c" }] });
            } else if bad {
                m.idempotency_key = Some(format!("k\u{0}{i}"));
            }
            let (storage, start) = (storage.clone(), start.clone());
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                (i, m.id, storage.save(m).await)
            }));
        }
        let mut stored = Vec::new();
        for task in tasks {
            let (i, id, saved) = task.await?;
            match (i % 6 == 5, saved) {
                (false, Ok(SaveOutcome::Stored(got))) if got == id => stored.push(id),
                (false, other) => anyhow::bail!("good save {i}: {other:?}"),
                (true, Err(MessageStorageError::Unstorable { field, .. })) => {
                    let expected = if i % 12 == 5 {
                        "payload/notes/1/text"
                    } else {
                        "idempotency_key"
                    };
                    assert_eq!(field, expected, "save {i}");
                }
                (true, other) => anyhow::bail!("bad save {i} must be refused: {other:?}"),
            }
        }
        let error = MessageStorageError::Unstorable {
            field: "f".into(),
            problem: "p".into(),
        };
        assert!(!error.is_retryable(), "the same data is refused again");
        let listed = storage
            .unprocessed(ShardId::new(2), Utc::now(), 1000)
            .await?;
        stored.sort();
        assert_eq!(ids_of(&listed), stored, "exactly the good saves are stored");
        Ok(())
    }

    pub async fn unstorable_completion_completes_once_with_an_error_reply(
        fx: &dyn Fixture,
    ) -> anyhow::Result<()> {
        const N: usize = 40;
        let storage = fx.storage();
        let ids = Snowflake::new(1);
        fx.set_epoch(ShardId::new(4), Epoch::new(1)).await?;
        let mut messages = Vec::new();
        for i in 0..N {
            let m = message(ids.next_id(), 4, &format!("e{i}"), None)?;
            storage.save(m.clone()).await?;
            messages.push(m);
        }
        // Every eighth reply holds a NUL, every eighth state (offset by four) too.
        let start = Arc::new(Barrier::new(N));
        let mut tasks = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            let mut c = completion(m, 1, ok(json!({ "n": i })));
            if i % 8 == 0 {
                c.reply = ok(json!({ "n": i, "text": "x\u{0}y" }));
            }
            let state = if i % 8 == 4 {
                json!(["s\u{0}"])
            } else {
                json!({ "n": i })
            };
            c.state = Some((m.address.clone(), state));
            let (storage, start) = (storage.clone(), start.clone());
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                storage.complete(c).await
            }));
        }
        for (i, task) in tasks.into_iter().enumerate() {
            let outcome = task.await??;
            let (reply, state) = (
                storage.reply(messages[i].id).await?,
                storage.load_state(&messages[i].address).await?,
            );
            if i % 4 == 0 {
                assert_eq!(outcome, CompletionOutcome::Unstorable, "completion {i}");
                let Some(Reply::Err { code, message }) = reply else {
                    anyhow::bail!("completion {i}: error reply expected, got {reply:?}");
                };
                assert_eq!(code, UNSTORABLE_REPLY);
                let field = if i % 8 == 0 { "reply/text" } else { "state/0" };
                assert!(message.contains(field), "{message}");
                assert_eq!(state, None, "completion {i}: no state written");
            } else {
                assert_eq!(outcome, CompletionOutcome::Committed, "completion {i}");
                assert_eq!(reply, Some(ok(json!({ "n": i }))));
                assert_eq!(state, Some(json!({ "n": i })));
            }
        }
        // Completed once: nothing is left to deliver, and a redelivery finds it processed.
        assert_eq!(
            storage
                .unprocessed(ShardId::new(4), Utc::now(), 100)
                .await?,
            vec![]
        );
        let again = completion(&messages[0], 1, ok(json!("x\u{0}")));
        assert_eq!(
            storage.complete(again).await?,
            CompletionOutcome::AlreadyProcessed
        );
        Ok(())
    }

    pub async fn purge_removes_old_processed_messages_only(fx: &dyn Fixture) -> anyhow::Result<()> {
        let storage = fx.storage();
        let ids = Snowflake::new(1);
        fx.set_epoch(ShardId::new(5), Epoch::new(1)).await?;
        // An unprocessed message older than everything else, then three processed ones
        // (the first with a key), then one scheduled far ahead.
        let pending = message(ids.next_id(), 5, "p", None)?;
        storage.save(pending.clone()).await?;
        let mut done = Vec::new();
        for (i, key) in [Some("key-a"), None, None].into_iter().enumerate() {
            let m = message(ids.next_id(), 5, &format!("d{i}"), key)?;
            storage.save(m.clone()).await?;
            let reply = ok(json!({ "done": i }));
            assert_eq!(
                storage.complete(completion(&m, 1, reply)).await?,
                CompletionOutcome::Committed
            );
            done.push(m);
        }
        let mut scheduled = message(ids.next_id(), 5, "s", None)?;
        scheduled.deliver_at = Some(whole_seconds_from_now(3600)?);
        storage.save(scheduled.clone()).await?;

        // Inside the retention window nothing goes, and a duplicate gets the stored reply.
        let window_start = Utc::now() - TimeDelta::hours(1);
        assert_eq!(storage.purge(window_start, 100).await?, 0);
        let duplicate = message(ids.next_id(), 5, "d0", Some("key-a"))?;
        let expected = SaveOutcome::Duplicate {
            id: done[0].id,
            reply: Some(ok(json!({ "done": 0 }))),
        };
        assert_eq!(storage.save(duplicate).await?, expected);
        assert_eq!(
            storage
                .stats()
                .await?
                .oldest_kept
                .map(|t| t.timestamp_millis()),
            shoal::snowflake::created_at(pending.id).map(|t| t.timestamp_millis())
        );

        // Past it, processed rows go in bounded batches, oldest first; unprocessed stay.
        let later = Utc::now() + TimeDelta::seconds(1);
        assert_eq!(storage.purge(later, 2).await?, 2);
        assert_eq!(
            storage.reply(done[0].id).await?,
            None,
            "the oldest went first"
        );
        assert_eq!(
            storage.reply(done[2].id).await?,
            Some(ok(json!({ "done": 2 })))
        );
        assert_eq!(storage.purge(later, 2).await?, 1);
        assert_eq!(storage.purge(later, 2).await?, 0);
        assert_eq!(storage.reply(done[2].id).await?, None);
        let left = storage
            .unprocessed(ShardId::new(5), Utc::now() + TimeDelta::hours(2), 10)
            .await?;
        assert_eq!(
            ids_of(&left),
            vec![pending.id, scheduled.id],
            "unprocessed rows are kept"
        );
        // The forgotten key is a new message now.
        let resent = message(ids.next_id(), 5, "d0", Some("key-a"))?;
        assert_eq!(
            storage.save(resent.clone()).await?,
            SaveOutcome::Stored(resent.id)
        );
        Ok(())
    }

    /// An outbox message for `entity` on `shard` (another entity type than the sender's).
    fn outgoing(
        id: MessageId,
        shard: u32,
        entity: &str,
        key: Option<&str>,
    ) -> anyhow::Result<NewMessage> {
        Ok(NewMessage {
            address: address("probe", entity)?,
            tag: "record".to_owned(),
            payload: json!({ "value": id.get() }),
            ..message(id, shard, entity, key)?
        })
    }

    pub async fn outbox_commits_with_its_completion(fx: &dyn Fixture) -> anyhow::Result<()> {
        let storage = fx.storage();
        let ids = Snowflake::new(1);
        fx.set_epoch(ShardId::new(1), Epoch::new(1)).await?;
        let sender = message(ids.next_id(), 1, "sender", None)?;
        storage.save(sender.clone()).await?;
        let now_due = outgoing(ids.next_id(), 2, "target", Some("m/0"))?;
        let at = whole_seconds_from_now(3600)?;
        let later = NewMessage {
            deliver_at: Some(at),
            ..outgoing(ids.next_id(), 2, "target", Some("m/1"))?
        };
        let c = Completion {
            state: Some((sender.address.clone(), json!({ "sent": 2 }))),
            outbox: vec![now_due.clone(), later.clone()],
            ..completion(&sender, 1, ok(json!(null)))
        };

        assert_eq!(storage.complete(c).await?, CompletionOutcome::Committed);
        assert_eq!(
            storage.load_state(&sender.address).await?,
            Some(json!({ "sent": 2 }))
        );
        // Stored as given: the due one is listed, the scheduled one waits for its instant.
        let listed = storage.unprocessed(ShardId::new(2), Utc::now(), 10).await?;
        assert_eq!(listed, vec![StoredMessage::from(now_due.clone())]);
        assert_eq!(
            storage.next_due(ShardId::new(2), Utc::now()).await?,
            Some(at)
        );
        let then = storage.unprocessed(ShardId::new(2), at, 10).await?;
        assert_eq!(ids_of(&then), vec![now_due.id, later.id]);
        // Their keys are taken, as a save's would be.
        let again = outgoing(ids.next_id(), 2, "target", Some("m/0"))?;
        let dup = storage.save(again).await?;
        assert_eq!(
            dup,
            SaveOutcome::Duplicate {
                id: now_due.id,
                reply: None
            }
        );
        Ok(())
    }

    pub async fn fenced_or_repeated_completion_writes_no_outbox(
        fx: &dyn Fixture,
    ) -> anyhow::Result<()> {
        let storage = fx.storage();
        let ids = Snowflake::new(1);
        let shard = ShardId::new(1);
        fx.set_epoch(shard, Epoch::new(1)).await?;
        let first = message(ids.next_id(), 1, "sender", None)?;
        let second = message(ids.next_id(), 1, "sender", None)?;
        storage.save(first.clone()).await?;
        storage.save(second.clone()).await?;
        let with_outbox = |m: &NewMessage, epoch: i64, key: &str| -> anyhow::Result<_> {
            Ok(Completion {
                state: Some((m.address.clone(), json!({ "key": key }))),
                outbox: vec![outgoing(ids.next_id(), 3, "target", Some(key))?],
                ..completion(m, epoch, ok(json!(null)))
            })
        };

        let done = storage.complete(with_outbox(&first, 1, "first")?).await?;
        assert_eq!(done, CompletionOutcome::Committed);
        // A redelivery of a completed message writes none of its (new) outbox.
        let repeated = storage.complete(with_outbox(&first, 1, "again")?).await?;
        assert_eq!(repeated, CompletionOutcome::AlreadyProcessed);
        // A completion under a stale epoch writes none of it either.
        fx.set_epoch(shard, Epoch::new(2)).await?;
        let fenced = storage.complete(with_outbox(&second, 1, "fenced")?).await?;
        assert_eq!(fenced, CompletionOutcome::Fenced);

        let listed = storage.unprocessed(ShardId::new(3), Utc::now(), 10).await?;
        let keys: Vec<Option<String>> = listed.iter().map(|m| m.idempotency_key.clone()).collect();
        assert_eq!(keys, vec![Some("first".to_owned())]);
        assert_eq!(
            storage.load_state(&first.address).await?,
            Some(json!({ "key": "first" }))
        );
        // The fenced key was never taken: a save of it is a new message.
        let fresh = outgoing(ids.next_id(), 3, "target", Some("fenced"))?;
        assert_eq!(
            storage.save(fresh.clone()).await?,
            SaveOutcome::Stored(fresh.id)
        );
        Ok(())
    }

    pub async fn outbox_keys_are_deduplicated(fx: &dyn Fixture) -> anyhow::Result<()> {
        let storage = fx.storage();
        let ids = Snowflake::new(1);
        fx.set_epoch(ShardId::new(1), Epoch::new(1)).await?;
        let sender = message(ids.next_id(), 1, "sender", None)?;
        storage.save(sender.clone()).await?;
        // A message already holds key `k` at the target.
        let earlier = outgoing(ids.next_id(), 2, "target", Some("k"))?;
        storage.save(earlier.clone()).await?;
        let met = outgoing(ids.next_id(), 2, "target", Some("k"))?;
        let twice_a = outgoing(ids.next_id(), 2, "target", Some("j"))?;
        let twice_b = outgoing(ids.next_id(), 2, "target", Some("j"))?;
        // The same key at another entity is another message.
        let elsewhere = outgoing(ids.next_id(), 2, "other", Some("k"))?;
        let c = Completion {
            outbox: vec![met, twice_a.clone(), twice_b, elsewhere.clone()],
            ..completion(&sender, 1, ok(json!(null)))
        };

        assert_eq!(storage.complete(c).await?, CompletionOutcome::Committed);
        let listed = storage.unprocessed(ShardId::new(2), Utc::now(), 10).await?;
        assert_eq!(ids_of(&listed), vec![earlier.id, twice_a.id, elsewhere.id]);
        assert_eq!(
            listed[0],
            StoredMessage::from(earlier),
            "the earlier one stands"
        );
        Ok(())
    }

    pub async fn unstorable_outbox_completes_with_an_error_reply_and_writes_nothing(
        fx: &dyn Fixture,
    ) -> anyhow::Result<()> {
        let storage = fx.storage();
        let ids = Snowflake::new(1);
        fx.set_epoch(ShardId::new(1), Epoch::new(1)).await?;
        let sender = message(ids.next_id(), 1, "sender", None)?;
        storage.save(sender.clone()).await?;
        let fine = outgoing(ids.next_id(), 2, "target", Some("fine"))?;
        let bad = NewMessage {
            payload: json!({ "text": "x\u{0}y" }),
            ..outgoing(ids.next_id(), 2, "target", Some("bad"))?
        };
        let c = Completion {
            state: Some((sender.address.clone(), json!({ "sent": 2 }))),
            outbox: vec![fine, bad],
            ..completion(&sender, 1, ok(json!(null)))
        };

        assert_eq!(storage.complete(c).await?, CompletionOutcome::Unstorable);
        let Some(Reply::Err { code, message }) = storage.reply(sender.id).await? else {
            anyhow::bail!("an error reply expected");
        };
        assert_eq!(code, UNSTORABLE_REPLY);
        assert!(message.contains("payload/text"), "{message}");
        assert_eq!(storage.load_state(&sender.address).await?, None);
        let listed = storage.unprocessed(ShardId::new(2), Utc::now(), 10).await?;
        assert_eq!(listed, vec![], "no outbox message without its state");
        Ok(())
    }
}

/// Declares one `#[tokio::test]` per conformance case, each run through `$run` (a function
/// that builds the backend's fixture, runs the case and cleans up).
macro_rules! conformance_tests {
    ($run:path) => {
        conformance_tests!(@cases $run;
            save_returns_stored,
            duplicate_key_returns_first_id_then_its_reply,
            same_key_on_another_entity_is_a_new_message,
            saving_the_same_id_twice_is_stored,
            concurrent_saves_with_one_key_store_one_message,
            unprocessed_lists_one_shard_in_id_order_up_to_limit,
            scheduled_message_waits_for_its_instant,
            complete_commits_once_then_already_processed,
            stale_epoch_is_fenced_and_writes_nothing,
            state_commits_only_with_its_completion,
            concurrent_completions_store_exactly_one_reply,
            record_attempts_counts_deliveries,
            unprocessed_after_pages_by_id,
            postpone_counts_an_attempt_and_moves_the_due_time,
            unstorable_message_is_refused_alone_naming_the_field,
            unstorable_completion_completes_once_with_an_error_reply,
            purge_removes_old_processed_messages_only,
            outbox_commits_with_its_completion,
            fenced_or_repeated_completion_writes_no_outbox,
            outbox_keys_are_deduplicated,
            unstorable_outbox_completes_with_an_error_reply_and_writes_nothing,
        );
    };
    (@cases $run:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() -> anyhow::Result<()> {
                $run(|fx| Box::pin(crate::suite::$case(fx))).await
            }
        )*
    };
}

mod memory {
    use shoal::message_storage::memory::MemoryMessageStorage;

    use super::*;

    struct MemoryFixture(MemoryMessageStorage);

    #[async_trait]
    impl Fixture for MemoryFixture {
        fn storage(&self) -> Arc<dyn MessageStorage> {
            Arc::new(self.0.clone())
        }

        async fn set_epoch(&self, shard: ShardId, epoch: Epoch) -> anyhow::Result<()> {
            self.0.set_epoch(shard, epoch);
            Ok(())
        }
    }

    async fn run<F>(case: F) -> anyhow::Result<()>
    where
        F: for<'a> FnOnce(&'a MemoryFixture) -> BoxFuture<'a, anyhow::Result<()>>,
    {
        let fx = MemoryFixture(MemoryMessageStorage::new());
        tokio::time::timeout(CASE_DEADLINE, case(&fx))
            .await
            .context("case did not finish in time")?
    }

    conformance_tests!(run);
}

mod postgres {
    use shoal::ClusterName;
    use shoal::message_storage::postgres::{BatchConfig, PgMessageStorage};
    use shoal_testkit::TestDb;
    use sqlx::PgPool;

    use super::*;

    /// A fresh database with Shoal's schema and a storage for a unique cluster in it.
    pub(crate) struct PgFixture {
        pub(crate) pool: PgPool,
        cluster: ClusterName,
        pub(crate) storage: Arc<PgMessageStorage>,
        // Last: the database is dropped (also when the case panics) after its pool.
        _db: TestDb,
    }

    fn unique_cluster() -> anyhow::Result<ClusterName> {
        Ok(ClusterName::new(format!(
            "t{}",
            uuid::Uuid::now_v7().simple()
        ))?)
    }

    impl PgFixture {
        async fn create() -> anyhow::Result<Self> {
            let db = TestDb::migrated().await?;
            let pool =
                shoal::runner_storage::postgres::connect_pool(&db.url, 16, Duration::from_secs(10))
                    .await
                    .context("connecting to the test database")?;
            let cluster = unique_cluster()?;
            let storage =
                PgMessageStorage::new(pool.clone(), cluster.clone(), BatchConfig::GROUP_COMMIT);
            Ok(Self {
                pool,
                cluster,
                storage: Arc::new(storage),
                _db: db,
            })
        }
    }

    async fn set_cluster_epoch(
        pool: &PgPool,
        cluster: &ClusterName,
        shard: ShardId,
        epoch: Epoch,
    ) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO shoal_shards (cluster, shard, epoch, runner_id) VALUES ($1, $2, $3, 1)
             ON CONFLICT (cluster, shard) DO UPDATE SET epoch = EXCLUDED.epoch",
        )
        .bind(cluster.as_str())
        .bind(shard.lock_key())
        .bind(epoch.get())
        .execute(pool)
        .await?;
        Ok(())
    }

    #[async_trait]
    impl Fixture for PgFixture {
        fn storage(&self) -> Arc<dyn MessageStorage> {
            self.storage.clone()
        }

        async fn set_epoch(&self, shard: ShardId, epoch: Epoch) -> anyhow::Result<()> {
            set_cluster_epoch(&self.pool, &self.cluster, shard, epoch).await
        }
    }

    pub(crate) async fn run<F>(case: F) -> anyhow::Result<()>
    where
        F: for<'a> FnOnce(&'a PgFixture) -> BoxFuture<'a, anyhow::Result<()>>,
    {
        let fx = PgFixture::create().await?;
        let outcome = tokio::time::timeout(CASE_DEADLINE, case(&fx)).await;
        fx.pool.close().await;
        outcome.context("case did not finish in time")?
    }

    conformance_tests!(run);

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_second_reply_row_violates_the_unique_constraint() -> anyhow::Result<()> {
        run(|fx| Box::pin(second_reply_row_is_refused(fx))).await
    }

    async fn second_reply_row_is_refused(fx: &PgFixture) -> anyhow::Result<()> {
        let ids = Snowflake::new(1);
        fx.set_epoch(ShardId::new(1), Epoch::new(1)).await?;
        let m = message(ids.next_id(), 1, "a", None)?;
        fx.storage.save(m.clone()).await?;
        let done = fx
            .storage
            .complete(completion(&m, 1, ok(json!("first"))))
            .await?;
        assert_eq!(done, CompletionOutcome::Committed);

        let second = sqlx::query(
            "INSERT INTO shoal_replies (message_id, ok, payload) VALUES ($1, true, '\"second\"')",
        )
        .bind(m.id.get())
        .execute(&fx.pool)
        .await;
        let error = second.expect_err("a second reply row must be refused");
        let code = error
            .as_database_error()
            .and_then(|e| e.code().map(|c| c.into_owned()));
        assert_eq!(code.as_deref(), Some("23505"), "{error}");
        assert_eq!(fx.storage.reply(m.id).await?, Some(ok(json!("first"))));
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_malformed_row_gets_an_error_reply_once() -> anyhow::Result<()> {
        run(|fx| Box::pin(malformed_row_is_rejected(fx))).await
    }

    async fn malformed_row_is_rejected(fx: &PgFixture) -> anyhow::Result<()> {
        let ids = Snowflake::new(1);
        let before = message(ids.next_id(), 1, "a", None)?;
        let bad = ids.next_id();
        let after = message(ids.next_id(), 1, "b", None)?;
        fx.storage.save(before.clone()).await?;
        fx.storage.save(after.clone()).await?;
        sqlx::query(
            "INSERT INTO shoal_messages (id, cluster, shard, entity_type, entity_id, tag, payload)
             VALUES ($1, $2, 1, 'bad type!', 'x', 'increment', '{}')",
        )
        .bind(bad.get())
        .bind(fx.cluster.as_str())
        .execute(&fx.pool)
        .await?;

        let shard = ShardId::new(1);
        let listed = fx.storage.unprocessed(shard, Utc::now(), 10).await?;
        assert_eq!(ids_of(&listed), vec![before.id, after.id]);
        let processed: bool =
            sqlx::query_scalar("SELECT processed FROM shoal_messages WHERE id = $1")
                .bind(bad.get())
                .fetch_one(&fx.pool)
                .await?;
        assert!(processed, "the malformed row is taken out of the backlog");
        let reply = fx.storage.reply(bad).await?;
        let Some(Reply::Err { code, message }) = reply.clone() else {
            anyhow::bail!("expected an error reply, got {reply:?}");
        };
        assert_eq!(code, "malformed_message");
        assert!(message.contains("entity type"), "{message}");

        // The next scan neither sees it nor reports it again.
        let listed = fx.storage.unprocessed(shard, Utc::now(), 10).await?;
        assert_eq!(ids_of(&listed), vec![before.id, after.id]);
        assert_eq!(fx.storage.reply(bad).await?, reply);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn clusters_in_one_database_do_not_see_each_other() -> anyhow::Result<()> {
        run(|fx| Box::pin(clusters_are_isolated(fx))).await
    }

    async fn clusters_are_isolated(fx: &PgFixture) -> anyhow::Result<()> {
        let ids = Snowflake::new(1);
        let shard = ShardId::new(1);
        let other_cluster = unique_cluster()?;
        let other = PgMessageStorage::new(
            fx.pool.clone(),
            other_cluster.clone(),
            BatchConfig::GROUP_COMMIT,
        );
        fx.set_epoch(shard, Epoch::new(1)).await?;
        set_cluster_epoch(&fx.pool, &other_cluster, shard, Epoch::new(1)).await?;
        let account = address("counter", "a")?;
        let mine = message(ids.next_id(), 1, "a", Some("k"))?;
        let theirs = message(ids.next_id(), 1, "a", Some("k"))?;

        assert_eq!(
            fx.storage.save(mine.clone()).await?,
            SaveOutcome::Stored(mine.id)
        );
        // The same entity and key in the other cluster is its own message.
        assert_eq!(
            other.save(theirs.clone()).await?,
            SaveOutcome::Stored(theirs.id)
        );
        let now = Utc::now();
        assert_eq!(
            ids_of(&fx.storage.unprocessed(shard, now, 10).await?),
            vec![mine.id]
        );
        assert_eq!(
            ids_of(&other.unprocessed(shard, now, 10).await?),
            vec![theirs.id]
        );

        // The other cluster cannot complete this cluster's message...
        let mut foreign = completion(&mine, 1, ok(json!("foreign")));
        foreign.state = Some((account.clone(), json!("foreign")));
        assert_eq!(
            other.complete(foreign).await?,
            CompletionOutcome::AlreadyProcessed
        );
        assert_eq!(
            ids_of(&fx.storage.unprocessed(shard, now, 10).await?),
            vec![mine.id]
        );
        assert_eq!(fx.storage.reply(mine.id).await?, None);
        // ...and its entity state is its own.
        let mut own = completion(&theirs, 1, ok(json!("theirs")));
        own.state = Some((account.clone(), json!("theirs")));
        assert_eq!(other.complete(own).await?, CompletionOutcome::Committed);
        assert_eq!(fx.storage.load_state(&account).await?, None);
        assert_eq!(other.load_state(&account).await?, Some(json!("theirs")));

        // A duplicate send meets its own cluster's first message and reply.
        let done = fx
            .storage
            .complete(completion(&mine, 1, ok(json!("mine"))))
            .await?;
        assert_eq!(done, CompletionOutcome::Committed);
        let again = message(ids.next_id(), 1, "a", Some("k"))?;
        let expected = SaveOutcome::Duplicate {
            id: mine.id,
            reply: Some(ok(json!("mine"))),
        };
        assert_eq!(fx.storage.save(again.clone()).await?, expected);
        let expected = SaveOutcome::Duplicate {
            id: theirs.id,
            reply: Some(ok(json!("theirs"))),
        };
        assert_eq!(other.save(again).await?, expected);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_thousand_concurrent_saves_are_all_stored() -> anyhow::Result<()> {
        run(|fx| Box::pin(saves_under_load(fx))).await
    }

    async fn saves_under_load(fx: &PgFixture) -> anyhow::Result<()> {
        const SAVES: usize = 2_000;
        const SHARDS: u32 = 16;
        let ids = Snowflake::new(1);
        let mut sent = BTreeSet::new();
        let mut tasks = Vec::with_capacity(SAVES);
        for i in 0..SAVES {
            let key = format!("k{i}");
            let shard = i as u32 % SHARDS;
            // Half of them keyed, so the conflict path runs under load too.
            let m = message(
                ids.next_id(),
                shard,
                &format!("e{i}"),
                (i % 2 == 0).then_some(&*key),
            )?;
            sent.insert(m.id);
            let storage = fx.storage.clone();
            tasks.push(tokio::spawn(async move {
                let id = m.id;
                (id, storage.save(m).await)
            }));
        }
        for task in tasks {
            let (id, outcome) = task.await?;
            assert_eq!(outcome?, SaveOutcome::Stored(id));
        }

        let mut listed = BTreeSet::new();
        for shard in 0..SHARDS {
            let backlog = fx
                .storage
                .unprocessed(ShardId::new(shard), Utc::now(), SAVES)
                .await?;
            listed.extend(backlog.iter().map(|m| m.id));
        }
        assert_eq!(listed, sent, "every save is listed once");
        // Rows written by one statement share their inserting transaction: fewer
        // transactions than messages shows the saves were batched.
        let transactions: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT xmin::text) FROM shoal_messages WHERE cluster = $1",
        )
        .bind(fx.cluster.as_str())
        .fetch_one(&fx.pool)
        .await?;
        eprintln!("{SAVES} saves committed in {transactions} transactions");
        assert!(
            transactions <= (SAVES / 2) as i64,
            "{SAVES} saves took {transactions} transactions"
        );
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn duplicate_sends_in_opposite_orders_do_not_deadlock() -> anyhow::Result<()> {
        run(|fx| Box::pin(crossed_duplicates(fx))).await
    }

    /// Two nodes (two storages of one cluster) send the same keyed messages at once, one
    /// in the opposite order of the other: each key is stored once and nobody fails.
    async fn crossed_duplicates(fx: &PgFixture) -> anyhow::Result<()> {
        const ROUNDS: usize = 10;
        const KEYS: usize = 100;
        let ids = Snowflake::new(1);
        let nodes = [false, true].map(|reversed| {
            let storage = PgMessageStorage::new(
                fx.pool.clone(),
                fx.cluster.clone(),
                BatchConfig::GROUP_COMMIT,
            );
            (Arc::new(storage), reversed)
        });
        for round in 0..ROUNDS {
            let mut tasks = Vec::new();
            for (storage, reversed) in &nodes {
                for j in 0..KEYS {
                    let k = if *reversed { KEYS - 1 - j } else { j };
                    let key = format!("r{round}k{k}");
                    let m = message(ids.next_id(), 1, "e", Some(&key))?;
                    let storage = storage.clone();
                    tasks.push(tokio::spawn(async move { (key, storage.save(m).await) }));
                }
            }
            let mut by_key: std::collections::BTreeMap<String, Vec<SaveOutcome>> =
                std::collections::BTreeMap::new();
            for task in tasks {
                let (key, outcome) = task.await?;
                by_key
                    .entry(key)
                    .or_default()
                    .push(outcome.context("save failed")?);
            }
            assert_eq!(by_key.len(), KEYS);
            for (key, outcomes) in by_key {
                let stored = outcomes
                    .iter()
                    .filter(|o| matches!(o, SaveOutcome::Stored(_)))
                    .count();
                let same_id = outcomes.iter().all(|o| o.id() == outcomes[0].id());
                assert!(stored == 1 && same_id, "{key}: {outcomes:?}");
            }
        }
        Ok(())
    }
}

/// Postgres-only: what the database refuses for reasons no validation knows in advance
/// still fails only the rows to blame (the batchers split a refused batch), and the
/// validation is exact: everything it lets through is stored.
mod postgres_refusals {
    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::TestRunner;
    use shoal::message_storage::storable::nul_pointer;

    use super::postgres::{PgFixture, run};
    use super::*;

    /// A CHECK constraint the validation knows nothing of: rows marked `refuse-me` violate
    /// it (SQLSTATE 23514), as a NUL or an oversized index row would.
    async fn refuse_marked_rows(fx: &PgFixture, table: &str) -> anyhow::Result<()> {
        let sql = format!(
            "ALTER TABLE {table} ADD CONSTRAINT test_refusal CHECK (payload::text NOT LIKE '%refuse-me%')"
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&fx.pool)
            .await?;
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_refused_save_fails_alone_in_its_batch() -> anyhow::Result<()> {
        run(|fx| Box::pin(refused_saves(fx))).await
    }

    async fn refused_saves(fx: &PgFixture) -> anyhow::Result<()> {
        const N: usize = 300;
        refuse_marked_rows(fx, "shoal_messages").await?;
        let ids = Snowflake::new(1);
        let start = Arc::new(Barrier::new(N));
        let mut tasks = Vec::new();
        for i in 0..N {
            let mut m = message(ids.next_id(), 1, &format!("e{i}"), None)?;
            if i % 15 == 7 {
                m.payload = json!({ "by": 1, "note": "refuse-me" });
            }
            let (storage, start) = (fx.storage.clone(), start.clone());
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                storage.save(m).await
            }));
        }
        let (mut stored, mut refused) = (0, 0);
        for (i, task) in tasks.into_iter().enumerate() {
            match (i % 15 == 7, task.await?) {
                (false, Ok(SaveOutcome::Stored(_))) => stored += 1,
                (true, Err(MessageStorageError::Unstorable { problem, .. })) => {
                    assert!(problem.contains("23514"), "{problem}");
                    refused += 1;
                }
                (bad, other) => anyhow::bail!("save {i} (refusable: {bad}): {other:?}"),
            }
        }
        assert_eq!((stored, refused), (N - N / 15, N / 15));
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_refused_completion_completes_once_with_an_error_reply() -> anyhow::Result<()> {
        run(|fx| Box::pin(refused_completions(fx))).await
    }

    async fn refused_completions(fx: &PgFixture) -> anyhow::Result<()> {
        const N: usize = 300;
        refuse_marked_rows(fx, "shoal_replies").await?;
        fx.set_epoch(ShardId::new(1), Epoch::new(1)).await?;
        let ids = Snowflake::new(1);
        let mut messages = Vec::new();
        for i in 0..N {
            messages.push(message(ids.next_id(), 1, &format!("e{i}"), None)?);
        }
        let saves = messages.iter().map(|m| fx.storage.save(m.clone()));
        for saved in futures::future::join_all(saves).await {
            saved?;
        }
        let start = Arc::new(Barrier::new(N));
        let mut tasks = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            let text = if i % 15 == 7 { "refuse-me" } else { "fine" };
            let c = completion(m, 1, ok(json!({ "n": i, "text": text })));
            let (storage, start) = (fx.storage.clone(), start.clone());
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                storage.complete(c).await
            }));
        }
        for (i, task) in tasks.into_iter().enumerate() {
            let outcome = task.await??;
            let reply = fx.storage.reply(messages[i].id).await?;
            if i % 15 == 7 {
                assert_eq!(outcome, CompletionOutcome::Unstorable, "completion {i}");
                assert!(
                    matches!(&reply, Some(Reply::Err { code, .. }) if code == UNSTORABLE_REPLY),
                    "completion {i}: {reply:?}"
                );
            } else {
                assert_eq!(outcome, CompletionOutcome::Committed, "completion {i}");
                assert_eq!(reply, Some(ok(json!({ "n": i, "text": "fine" }))));
            }
        }
        let left = fx
            .storage
            .unprocessed(ShardId::new(1), Utc::now(), 1000)
            .await?;
        assert_eq!(left, vec![], "every message completed once");
        Ok(())
    }

    /// Any JSON value, strings drawn from characters that include NUL, other controls,
    /// backslashes, quotes and non-ASCII text; integers of any size and short floats.
    fn any_json() -> impl Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let text = prop::collection::vec(
            prop_oneof![
                Just('\0'),
                Just('\u{1}'),
                Just('\\'),
                Just('"'),
                Just('é'),
                Just('\u{10ffff}'),
                Just('\u{fffe}'),
                any::<char>(),
                prop::char::range('a', 'z'),
            ],
            0..6,
        )
        .prop_map(|chars| chars.into_iter().collect::<String>());
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            (-1_000_000i64..1_000_000).prop_map(|n| serde_json::Value::from(n as f64 / 8.0)),
            // Any finite double, and the extremes: Postgres prints 1.7976931348623157e308
            // as 309 digits and 5e-324 as 324 decimals; they must read back the same double
            // (serde_json's `float_roundtrip`), not fail "number out of range".
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(serde_json::Value::from),
            prop_oneof![
                Just(f64::MAX),
                Just(f64::MIN),
                Just(f64::MIN_POSITIVE),
                Just(5e-324),
                Just(-5e-324),
                Just(1e308),
                Just(123_456_789_012_345_680_000_000_000_000_000_000_000.0),
            ]
            .prop_map(serde_json::Value::from),
            text.clone().prop_map(serde_json::Value::from),
        ];
        let tree = leaf.prop_recursive(5, 48, 5, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::from),
                prop::collection::btree_map(text.clone(), inner, 0..5)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        });
        tree.prop_map(|v| json!({ "body": v }))
    }

    /// `n` values from [`any_json`] (the runner is not `Send`, so it stays out of the case).
    fn generate(n: usize) -> anyhow::Result<Vec<serde_json::Value>> {
        let mut runner = TestRunner::deterministic();
        let strategy = any_json();
        (0..n)
            .map(|_| strategy.new_tree(&mut runner).map(|tree| tree.current()))
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("generating values: {e}"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn any_json_is_stored_or_refused_as_bad_input() -> anyhow::Result<()> {
        run(|fx| Box::pin(any_json_case(fx))).await
    }

    /// What the gateway's check (`nul_pointer`) lets through is stored, as a message and as
    /// a reply and state, and reads back equal; what it refuses, storage refuses too, as
    /// `Unstorable` (a 400 at the gateway), never as an error a 500 would report.
    async fn any_json_case(fx: &PgFixture) -> anyhow::Result<()> {
        const CASES: usize = 400;
        let values = generate(CASES)?;
        fx.set_epoch(ShardId::new(1), Epoch::new(1)).await?;
        let ids = Snowflake::new(1);
        let storage = fx.storage.clone();
        let mut refused = 0;
        let cases = values.into_iter().enumerate().map(|(i, value)| {
            let storage = storage.clone();
            let id = ids.next_id();
            async move {
                let mut m = message(id, 1, &format!("e{i}"), None)?;
                m.payload = value.clone();
                let accepted = nul_pointer(&value).is_none();
                match (accepted, storage.save(m.clone()).await) {
                    (true, Ok(SaveOutcome::Stored(_))) => {}
                    (false, Err(MessageStorageError::Unstorable { .. })) => return Ok(false),
                    (_, other) => anyhow::bail!("case {i} {value}: save gave {other:?}"),
                }
                let mut c = completion(&m, 1, ok(value.clone()));
                c.state = Some((m.address.clone(), value.clone()));
                let done = storage.complete(c).await?;
                anyhow::ensure!(done == CompletionOutcome::Committed, "case {i}: {done:?}");
                let reply = storage.reply(m.id).await?;
                anyhow::ensure!(
                    reply == Some(ok(value.clone())),
                    "case {i}: reply {reply:?} for {value}"
                );
                anyhow::ensure!(
                    storage.load_state(&m.address).await? == Some(value),
                    "case {i}: state"
                );
                Ok(true)
            }
        });
        for stored in futures::future::join_all(cases).await {
            if !stored? {
                refused += 1;
            }
        }
        println!(
            "{CASES} values: {} stored, {refused} refused",
            CASES - refused
        );
        assert!(refused > 0 && refused < CASES, "both kinds were generated");
        Ok(())
    }
}
