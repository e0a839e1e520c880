-- Persisted messages, their replies, and entity state written by transactional handlers.

CREATE TABLE shoal_messages (
    id              BIGINT PRIMARY KEY,             -- snowflake: time-ordered
    cluster         TEXT NOT NULL,
    shard           INT  NOT NULL,
    entity_type     TEXT NOT NULL,
    entity_id       TEXT NOT NULL,
    tag             TEXT NOT NULL,
    payload         JSONB NOT NULL,
    idempotency_key TEXT,
    deliver_at      TIMESTAMPTZ,
    attempts        INT NOT NULL DEFAULT 0,
    processed       BOOLEAN NOT NULL DEFAULT false,
    processed_at    TIMESTAMPTZ,
    epoch           BIGINT,                         -- epoch of the owner that completed it
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- A duplicate send (same entity, same key) meets the first one.
CREATE UNIQUE INDEX shoal_messages_idempotency
    ON shoal_messages (cluster, entity_type, entity_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- The backlog of a shard, in insertion order.
CREATE INDEX shoal_messages_unprocessed
    ON shoal_messages (cluster, shard, id)
    WHERE NOT processed;

-- Exactly one final reply per message.
CREATE TABLE shoal_replies (
    message_id BIGINT PRIMARY KEY REFERENCES shoal_messages (id) ON DELETE CASCADE,
    ok         BOOLEAN NOT NULL,
    payload    JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- State of entities whose handlers keep it in Postgres; written in the transaction that
-- completes the message that changed it.
CREATE TABLE shoal_entity_state (
    cluster     TEXT NOT NULL,
    entity_type TEXT NOT NULL,
    entity_id   TEXT NOT NULL,
    state       JSONB NOT NULL,
    message_id  BIGINT NOT NULL,                   -- last message applied
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (cluster, entity_type, entity_id)
);
