-- What identifies a delivery report; inserts that lock their campaigns against
-- completion; which stored report a recipient's dr_* came from.

-- A report is one destination's (transid or correlation id) report of one code at one
-- time. The platform may leave out the transid (the parser accepts a correlation id
-- alone) and the timestamp: without the correlation id in the key, four recipients'
-- 7500s with neither were "duplicates" of each other, three were dropped, and the
-- platform was still told 200. Widening a unique key cannot fail on rows already stored.
-- A migration is one transaction, so no CONCURRENTLY: the build blocks inserts (the
-- receiver answers 503 past store_timeout_s and the platform retries), the old index is
-- dropped only at the end so reads wait just for that. On a large table, prune first.
CREATE UNIQUE INDEX delivery_reports_report_key ON campaign.delivery_reports
    (transid, correlation_id, code, reported_at) NULLS NOT DISTINCT;
DROP INDEX campaign.delivery_reports_dedup_key;
ALTER INDEX campaign.delivery_reports_report_key RENAME TO delivery_reports_dedup_key;

-- Recipients added to a completed campaign reopen it, so they are sent rather than
-- stranded behind a status the producer no longer looks at.
--
-- Why the lock: the completer (reconcile_lock_finished_campaigns, then
-- reconcile_complete_campaigns, in one transaction) locks a candidate FOR UPDATE, then
-- looks for open recipients again with a fresh snapshot. This trigger locks the inserted
-- rows' campaigns FOR KEY SHARE, which conflicts with FOR UPDATE and with nothing an
-- ordinary UPDATE takes (two transactions may each insert into a campaign and update it),
-- holds it to the end of the inserting transaction, and only then, in a statement of its
-- own (READ COMMITTED: a fresh snapshot), reads which campaigns are completed. So either
--   - the insert locked first: the completer's SKIP LOCKED passes the campaign by until
--     the insert commits, and its next look sees the rows; or
--   - the completer locked first: the lock waits for it to commit, the read after it sees
--     the campaign completed and reopens it; or
--   - the insert committed before the completer's second look, which sees the rows.
-- The read is a statement of its own so that it sees the completer's commit whatever row
-- version the lock was granted on (a KEY SHARE lock need not wait for, nor follow, an
-- update that changed no key). Insert under READ COMMITTED (the default): a REPEATABLE
-- READ transaction reads its old snapshot after the lock too.
--
-- Cost: one statement-level call per INSERT or COPY and one lock per distinct campaign,
-- never per row (the foreign key check takes this same lock per row already).
--
-- SECURITY DEFINER: the lock needs UPDATE on campaign.campaigns, the read SELECT; an
-- application allowed only to insert recipients must not need either. It runs as the
-- schema's owner with a fixed search_path, and touches nothing but the campaigns of the
-- rows being inserted.
CREATE OR REPLACE FUNCTION campaign.reopen_completed() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    inserted_into bigint[];
    reopened bigint[];
BEGIN
    SELECT array_agg(DISTINCT n.campaign_id) INTO inserted_into FROM new_rows n;
    -- One order for every inserter: no deadlock between two of them.
    PERFORM 1
       FROM campaign.campaigns c
      WHERE c.id = ANY(inserted_into)
      ORDER BY c.id
        FOR KEY SHARE;
    SELECT array_agg(c.id) INTO reopened
      FROM campaign.campaigns c
     WHERE c.id = ANY(inserted_into) AND c.status = 'completed';
    -- Only when there is one: an UPDATE of no rows would still fire the NOTIFY trigger.
    IF reopened IS NOT NULL THEN
        UPDATE campaign.campaigns
           SET status = 'running', completed_at = NULL
         WHERE id = ANY(reopened) AND status = 'completed';
    END IF;
    RETURN NULL;
END;
$$;

-- The stored report whose values the recipient's dr_* hold. Orders reports without a
-- timestamp by arrival (their id) without reading our clock into dr_at, which now holds
-- only the platform's timestamp (NULL when the winning report carried none). Rows
-- matched before this migration keep the dr_at they have (for a report without a
-- timestamp, its arrival time), taken as a timestamp. Nullable without a default:
-- adding it rewrites nothing.
ALTER TABLE campaign.recipients ADD COLUMN dr_report_id bigint;
