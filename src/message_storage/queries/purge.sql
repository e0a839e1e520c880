-- Removes one bounded batch of old processed messages of a cluster, with their replies.
-- $1 cluster, $2 the first snowflake id at the cutoff, $3 the cutoff, $4 the batch size.
-- `id < $2` walks the primary key from its oldest end (snowflakes are time-ordered), so a
-- batch reads about $4 rows plus the old rows that are kept (unprocessed ones, or ones
-- processed after the cutoff), never the whole table. SKIP LOCKED: rows a completion or a
-- save holds are left for the next pass instead of being waited for.
WITH doomed AS (
    SELECT id FROM shoal_messages
     WHERE id < $2 AND cluster = $1 AND processed AND processed_at < $3
     ORDER BY id
     LIMIT $4
       FOR UPDATE SKIP LOCKED
),
gone AS (
    DELETE FROM shoal_messages m USING doomed WHERE m.id = doomed.id
    RETURNING m.id
),
replies AS (
    DELETE FROM shoal_replies r USING gone WHERE r.message_id = gone.id
)
SELECT count(*) FROM gone
