-- Guard rails while sending: a sending window in the recipient's local time, a canary,
-- and a brake on failures (README "Database contract").

-- Allowed local times [window_start, window_end) in each recipient's zone; a window that
-- wraps midnight (22:00-06:00) has window_end < window_start. Both NULL: the service's
-- send_window, if any. canary_size: send this many first and judge them before the rest.
-- max_failure_ratio: pause when failed / (delivered + failed) exceeds it. paused_reason,
-- canary_judged_at and brake_since are the worker's: why it paused the campaign, when
-- its canary was judged (sending goes on past the canary from then), and from when the
-- brake counts reports (set when an operator resumes a paused campaign, see the trigger
-- below).
ALTER TABLE campaign.campaigns
    ADD COLUMN window_start      time,
    ADD COLUMN window_end        time,
    ADD COLUMN canary_size       integer,
    ADD COLUMN max_failure_ratio real,
    ADD COLUMN paused_reason     text,
    ADD COLUMN canary_judged_at  timestamptz,
    ADD COLUMN brake_since       timestamptz,
    ADD CONSTRAINT campaigns_send_window_check
        CHECK ((window_start IS NULL) = (window_end IS NULL) AND window_start <> window_end),
    ADD CONSTRAINT campaigns_canary_size_check CHECK (canary_size > 0),
    ADD CONSTRAINT campaigns_max_failure_ratio_check
        CHECK (max_failure_ratio >= 0 AND max_failure_ratio <= 1);

-- Resuming a paused campaign (status back to 'ready' or 'running', by `campaign resume`
-- or a plain UPDATE) starts the brake's count afresh, so the failures that paused it do
-- not pause it again at once; the canary is not run again.
CREATE FUNCTION campaign.campaigns_resumed() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status = 'paused' AND NEW.status IN ('ready', 'running') THEN
        NEW.brake_since := now();
        NEW.paused_reason := NULL;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER campaigns_resumed
    BEFORE UPDATE OF status ON campaign.campaigns
    FOR EACH ROW EXECUTE FUNCTION campaign.campaigns_resumed();

-- Pending rows split in two indexes, so rows waiting for their window (or for a retry's
-- backoff) cost the claim nothing: recipients_pending_idx now holds only rows due at
-- once (next_attempt_at NULL), the claim's access path as before; recipients_waiting_idx
-- holds the rows with a time to wait for, ordered by it, and producer_release_due moves
-- each one back (next_attempt_at NULL) when its time comes. With the old index a
-- campaign whose remaining rows all waited for a window walked every one of them on each
-- claim attempt. A migration is one transaction, so no CONCURRENTLY: the build reads the
-- whole table and blocks writes to it meanwhile; on a large table, run it between
-- campaigns.
CREATE INDEX recipients_due_idx ON campaign.recipients (campaign_id, id)
    WHERE status = 'pending' AND next_attempt_at IS NULL;
CREATE INDEX recipients_waiting_idx ON campaign.recipients (next_attempt_at)
    WHERE status = 'pending' AND next_attempt_at IS NOT NULL;
DROP INDEX campaign.recipients_pending_idx;
ALTER INDEX campaign.recipients_due_idx RENAME TO recipients_pending_idx;

-- The failure brake reads a campaign's latest final outcomes (delivered, failed,
-- rejected), newest first: one index entry per row when it becomes final, so the brake
-- reads failure_window rows, not the whole campaign.
CREATE INDEX recipients_final_idx ON campaign.recipients (campaign_id, updated_at)
    WHERE status IN ('delivered', 'failed', 'rejected');
