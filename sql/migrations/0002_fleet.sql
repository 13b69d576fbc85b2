-- A fleet of workers against one database: membership for sharing each service's rate,
-- the fleet-wide AIMD factor, what `campaign prune` needs, and autovacuum settings for
-- the tables every message updates several times.

-- One row per worker that sends. Each live worker (heartbeat younger than a few seconds)
-- takes an equal part of every service it sends for; a clean stop deletes the row, a
-- dead worker's row stops counting once its heartbeat is old. Tiny: one row per process.
CREATE TABLE campaign.workers (
    worker_id    text        PRIMARY KEY,
    -- The services this worker sends for and its configured rate_per_s for each, in the
    -- same order; the fleet shares the smallest configured rate, so a stale config errs
    -- on the slow side.
    services     text[]      NOT NULL,
    rates_per_s  float8[]    NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT workers_worker_id_check CHECK (length(worker_id) BETWEEN 1 AND 200),
    CONSTRAINT workers_rates_check
        CHECK (cardinality(services) = cardinality(rates_per_s))
);

-- The fleet's AIMD factor per service: the provider's limit is per account, so a 7020
-- seen by one worker slows every worker. Lowered at once by any worker, raised one step
-- per interval by whichever worker gets there first (updated_at says when it last moved).
CREATE TABLE campaign.service_rates (
    service    text        PRIMARY KEY,
    factor     float8      NOT NULL DEFAULT 1.0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT service_rates_factor_check CHECK (factor > 0 AND factor <= 1)
);

-- `campaign prune` deletes an old campaign's batches in bounded chunks, and the cascade
-- from campaigns would otherwise scan the whole table once per campaign.
CREATE INDEX batches_campaign_idx ON campaign.batches (campaign_id);

-- Every recipient is updated three or four times (pending, sending, queued, delivered)
-- and none of these updates can be HOT (status is indexed), so the defaults (vacuum at
-- 20 % dead rows, analyze at 10 % changed) let the table and its indexes bloat and the
-- planner's idea of how many rows are pending lag far behind. Per-table settings, so the
-- rest of the database keeps the server's defaults.
ALTER TABLE campaign.recipients SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.05
);
ALTER TABLE campaign.delivery_reports SET (
    autovacuum_vacuum_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.05
);
ALTER TABLE campaign.batches SET (
    autovacuum_vacuum_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.05
);
