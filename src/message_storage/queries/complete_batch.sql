-- Completes a batch of messages in one statement.
-- $1 cluster, $2 the batch's shards; per completion: $3 message id, $4 shard, $5 epoch,
-- $6 reply ok, $7 reply payload, $8/$9 entity type/id of the state, $10 state (or NULL);
-- per outbox message: $11 the position (1-based) of its completion in the batch, $12 id,
-- $13 shard, $14/$15 entity type/id, $16 tag, $17 payload, $18 idempotency key,
-- $19 deliver_at.
WITH epochs AS (
    -- FOR SHARE: a new owner's epoch bump waits for this statement's transaction, and this
    -- statement sees any bump that committed before it. One index lookup per shard, in the
    -- order of $2 (ascending, so concurrent batches lock shards in one order): a scan
    -- filtered by `shard = ANY($2)` reads every shard row of the cluster per batch.
    SELECT s.shard, s.epoch
      FROM unnest($2::int4[]) AS b(shard),
           LATERAL (SELECT shard, epoch FROM shoal_shards
                     WHERE cluster = $1 AND shard = b.shard
                       FOR SHARE) s
),
input AS (
    SELECT * FROM unnest($3::int8[], $4::int4[], $5::int8[], $6::bool[], $7::jsonb[],
                         $8::text[], $9::text[], $10::jsonb[])
        WITH ORDINALITY AS c(id, shard, epoch, ok, payload, state_type, state_id, state, n)
),
current AS (
    -- One completion per message (the first in the batch), under the shard's epoch.
    SELECT DISTINCT ON (input.id) input.*
      FROM input JOIN epochs ON epochs.shard = input.shard AND epochs.epoch = input.epoch
     ORDER BY input.id, input.n
),
marked AS (
    -- Returns what the reply and the state need, so neither joins back.
    UPDATE shoal_messages m
       SET processed = true, processed_at = now(), epoch = current.epoch
      FROM current
     WHERE m.cluster = $1 AND m.id = current.id AND NOT m.processed
    RETURNING m.id, current.n, current.ok, current.payload, current.state_type,
              current.state_id, current.state
),
replies AS (
    INSERT INTO shoal_replies (message_id, ok, payload)
    SELECT id, ok, payload FROM marked
),
states AS (
    -- The state after each entity's latest message in the batch.
    INSERT INTO shoal_entity_state (cluster, entity_type, entity_id, state, message_id)
    SELECT DISTINCT ON (state_type, state_id) $1, state_type, state_id, state, id
      FROM marked
     WHERE state IS NOT NULL
     ORDER BY state_type, state_id, id DESC
    ON CONFLICT (cluster, entity_type, entity_id) DO UPDATE
       SET state = EXCLUDED.state, message_id = EXCLUDED.message_id, updated_at = now()
),
outbox AS (
    -- The messages of the completions that marked their message, deduplicated as a save
    -- is (a taken id, or a key the target entity already holds, inserts nothing), in the
    -- saves' global order (key, then id) so that batches holding the same keys queue
    -- instead of deadlocking.
    INSERT INTO shoal_messages
        (id, cluster, shard, entity_type, entity_id, tag, payload, idempotency_key,
         deliver_at)
    SELECT o.id, $1, o.shard, o.entity_type, o.entity_id, o.tag, o.payload, o.key,
           o.deliver_at
      FROM unnest($11::int8[], $12::int8[], $13::int4[], $14::text[], $15::text[],
                  $16::text[], $17::jsonb[], $18::text[], $19::timestamptz[])
           AS o(n, id, shard, entity_type, entity_id, tag, payload, key, deliver_at)
      JOIN marked ON marked.n = o.n
     ORDER BY o.key IS NULL, o.entity_type, o.entity_id, o.key, o.id
    ON CONFLICT DO NOTHING
)
SELECT 'epoch' AS kind, shard::int8 AS a, epoch AS b FROM epochs
UNION ALL
SELECT 'marked', id, 0 FROM marked
