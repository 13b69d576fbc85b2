-- Guard rails before sending (issue 14): a number is texted once per campaign, and at most
-- [policy] max_per_msisdn messages accepted by the API reach one number within
-- cap_window_h, across campaigns and workers. Both are decided by the producer when it
-- prepares a batch (docs/sending.md, "Duplicates and the frequency cap").

-- Two new final statuses: `duplicate` (another row of the campaign has the same E.164
-- number and a lower id) and `capped` (the number reached the frequency cap). Checking
-- the new constraint reads the table once under the migration's lock (on a large table,
-- migrate while the workers are stopped, as docs/scaling.md says for every upgrade).
ALTER TABLE campaign.recipients DROP CONSTRAINT recipients_status_check;
ALTER TABLE campaign.recipients ADD CONSTRAINT recipients_status_check CHECK (status IN (
    'pending', 'sending', 'queued', 'unknown',
    'delivered', 'failed', 'rejected', 'invalid', 'suppressed', 'duplicate', 'capped',
    'expired', 'cancelled'));

-- allow_duplicates: send every row even when numbers repeat (two OTPs to one number on
-- purpose). bypass_caps: transactional traffic, neither counted against the cap nor
-- stopped by it. Constant defaults: adding them rewrites nothing.
ALTER TABLE campaign.campaigns
    ADD COLUMN allow_duplicates boolean NOT NULL DEFAULT false,
    ADD COLUMN bypass_caps boolean NOT NULL DEFAULT false;

-- When the producer decided a batch's rows (duplicates registered, caps reserved). Rows
-- of a batch without it (claimed by a worker that has not prepared it yet, or that died
-- first) are "unregistered": a batch prepared meanwhile looks at them too, so the lowest
-- id of a number is the one sent whichever worker prepares first.
ALTER TABLE campaign.batches ADD COLUMN prepared_at timestamptz;
-- Batches from before this migration were decided by the producer of that version; only
-- claimed ones (their worker stopped for the upgrade before preparing them) were not.
UPDATE campaign.batches SET prepared_at = created_at WHERE status <> 'claimed';
-- producer_unregistered_below finds the claimed batches not prepared yet by campaign.
CREATE INDEX batches_unprepared_idx ON campaign.batches (campaign_id) WHERE prepared_at IS NULL;

-- One row per number a campaign sends to: which recipient is (or will be) sent. The
-- primary key is the uniqueness rule; the producer writes it under a per-campaign
-- transaction lock, so two workers never both decide to send one number.
-- No foreign key: its per-row check made registering a batch of 1000 numbers take
-- 80-150 ms instead of 15-25; a statement trigger on campaigns deletes a deleted
-- campaign's numbers instead (prune, the demo's clean-up).
CREATE TABLE campaign.campaign_numbers (
    campaign_id  bigint NOT NULL,
    msisdn_e164  text   COLLATE "C" NOT NULL,
    recipient_id bigint NOT NULL,
    PRIMARY KEY (campaign_id, msisdn_e164)
);

CREATE FUNCTION campaign.forget_campaign_numbers() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM campaign.campaign_numbers n USING old_rows o WHERE n.campaign_id = o.id;
    RETURN NULL;
END;
$$;

CREATE TRIGGER campaigns_forget_numbers AFTER DELETE ON campaign.campaigns
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION campaign.forget_campaign_numbers();

-- The frequency cap: one reservation per recipient the producer let through while a cap
-- was configured. Taken before the request under the number's row lock in cap_numbers (so
-- the count is exact across workers), given back when the API did not accept the message
-- (sender_write_results), so what is counted is what the API accepted or may still
-- accept. Rows older than the window are deleted by the producer's sweep.
CREATE TABLE campaign.cap_reservations (
    recipient_id bigint      PRIMARY KEY,
    msisdn_e164  text        COLLATE "C" NOT NULL,
    reserved_at  timestamptz NOT NULL DEFAULT now()
);
-- One row per number under the cap, locked (upserted) by the producer before it counts and
-- reserves for it: a row lock, so a batch of 1000 numbers does not fill the shared lock
-- table as 1000 advisory locks would. touched_at is not indexed: the upsert is a HOT
-- update. Rows untouched for longer than the window are deleted by the producer's sweep.
CREATE TABLE campaign.cap_numbers (
    msisdn_e164 text        COLLATE "C" PRIMARY KEY,
    touched_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX cap_reservations_msisdn_idx ON campaign.cap_reservations (msisdn_e164, reserved_at);
CREATE INDEX cap_reservations_reserved_idx ON campaign.cap_reservations (reserved_at);
