-- The last instant each cron schedule fired, so a new driver knows what was missed.
CREATE TABLE shoal_cron_state (
    cluster    TEXT NOT NULL,
    name       TEXT NOT NULL,
    last_fired TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (cluster, name)
);
