-- Clusters, runner registrations and shard epochs.
-- Ownership itself is not stored: it is whichever session holds a shard's advisory lock.

CREATE TABLE shoal_clusters (
    name             TEXT PRIMARY KEY,
    shards_per_group INT  NOT NULL CHECK (shards_per_group > 0),
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per runner incarnation. `id` doubles as the second half of the runner's
-- liveness-lock key, so it is an int4.
CREATE TABLE shoal_runners (
    id         SERIAL PRIMARY KEY,
    cluster    TEXT NOT NULL,
    address    TEXT NOT NULL,
    version    TEXT NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX shoal_runners_cluster ON shoal_runners (cluster);

-- The epoch grows by one on every acquisition. Writes that complete work for a shard lock
-- this row FOR SHARE and check the epoch (fencing).
CREATE TABLE shoal_shards (
    cluster     TEXT   NOT NULL,
    shard       INT    NOT NULL,
    epoch       BIGINT NOT NULL,
    runner_id   INT    NOT NULL,
    acquired_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (cluster, shard)
);
