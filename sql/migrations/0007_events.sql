-- Closing the loop with the application: an event outbox written by the database itself,
-- the forwarder's position and lease, replies linked to the campaign that caused them,
-- and what delivery reports teach (expiring suppressions, one more attempt).

-- The outbox. Every row is written by a trigger below, in the same statement (so the same
-- transaction) as the change it reports: a change never commits without its event, an
-- event never without its change, whichever code path (worker, application SQL, a
-- status some later migration adds) made it. Statement-level triggers with transition
-- tables: one INSERT .. SELECT and at most one NOTIFY per statement, never per row.
CREATE TABLE campaign.events (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind         text        NOT NULL,
    campaign_id  bigint,
    recipient_id bigint,
    msisdn       text,
    status       text,
    code         text,
    data         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_kind_check CHECK (kind IN (
        'recipient_final', 'campaign_status', 'opt_out', 'opt_in', 'reply'))
);

ALTER TABLE campaign.events SET (
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.05
);

-- Which events are written: one row, written by `campaign worker` at start from
-- [events] enabled / kinds (the database cannot read the config file, and every writer,
-- an application's UPDATE included, must see the same choice). No row: every kind.
CREATE TABLE campaign.event_settings (
    singleton  boolean     PRIMARY KEY DEFAULT true,
    enabled    boolean     NOT NULL DEFAULT true,
    kinds      text[]      NOT NULL
        DEFAULT ARRAY['recipient_final', 'campaign_status', 'opt_out', 'opt_in', 'reply'],
    written_by text,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT event_settings_singleton_check CHECK (singleton)
);

-- Whether events of `wanted` are written. STABLE: read once per statement at most.
CREATE FUNCTION campaign.event_wanted(wanted text) RETURNS boolean
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce((SELECT s.enabled AND wanted = ANY(s.kinds)
                       FROM campaign.event_settings s), true)
$$;

-- A recipient reached a final status: one event when it first enters one, and one more
-- each time a later report replaces it with another final status (a late `delivered`
-- after the report timeout's `failed`): data.replaces names the status it replaced, so
-- the application's view can be corrected; a final status replaced by the same status
-- (a second failure report) writes nothing. A move back to `pending` (a transient failure
-- sent once more) is not final and writes nothing. `code` and data.description are the
-- worker's own reason when it recorded one (report_timeout, a rejection), else the
-- delivery report's (a final report clears the worker's reason).
-- SECURITY DEFINER: an application allowed to update recipients or campaigns must not
-- need INSERT on the outbox; runs as the schema's owner with a fixed search_path.
CREATE FUNCTION campaign.recipient_events() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    written bigint;
BEGIN
    IF NOT campaign.event_wanted('recipient_final') THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        -- EXECUTE: planned for this statement's row count. A cached plan is made for the
        -- first statement's transition tables and kept: made for one row (a nested loop),
        -- it made a 5,000-row match statement twelve times slower.
        EXECUTE $sql$
        INSERT INTO campaign.events (kind, campaign_id, recipient_id, msisdn, status, code, data)
        SELECT 'recipient_final', n.campaign_id, n.id, coalesce(n.msisdn_e164, n.msisdn),
               n.status, coalesce(n.error_code, n.dr_code),
               jsonb_strip_nulls(jsonb_build_object(
                   'description', coalesce(n.error_message, n.dr_description),
                   'transid', n.transid,
                   'correlation_id', n.correlation_id,
                   'attempts', n.attempts,
                   'reported_at', n.dr_at,
                   'replaces', CASE WHEN o.status IN ('delivered', 'failed', 'expired',
                                                      'rejected', 'invalid', 'suppressed',
                                                      'duplicate', 'capped', 'cancelled')
                                    THEN o.status END))
          FROM new_rows n
          JOIN old_rows o ON o.id = n.id
         WHERE n.status IN ('delivered', 'failed', 'expired', 'rejected', 'invalid',
                            'suppressed', 'duplicate', 'capped', 'cancelled')
           AND n.status IS DISTINCT FROM o.status
         ORDER BY n.id
        $sql$;
    ELSE
        -- Rows inserted already final (an application importing history).
        INSERT INTO campaign.events (kind, campaign_id, recipient_id, msisdn, status, code, data)
        SELECT 'recipient_final', n.campaign_id, n.id, coalesce(n.msisdn_e164, n.msisdn),
               n.status, coalesce(n.error_code, n.dr_code),
               jsonb_strip_nulls(jsonb_build_object(
                   'description', coalesce(n.error_message, n.dr_description),
                   'transid', n.transid,
                   'correlation_id', n.correlation_id,
                   'attempts', n.attempts,
                   'reported_at', n.dr_at))
          FROM new_rows n
         WHERE n.status IN ('delivered', 'failed', 'expired', 'rejected', 'invalid',
                            'suppressed', 'duplicate', 'capped', 'cancelled')
         ORDER BY n.id;
    END IF;
    GET DIAGNOSTICS written = ROW_COUNT;
    IF written > 0 THEN
        PERFORM pg_notify('campaign_events', 'recipient_final');
    END IF;
    RETURN NULL;
END;
$$;

-- Transition tables allow one event per trigger, hence two triggers.
CREATE TRIGGER recipients_events_update AFTER UPDATE ON campaign.recipients
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION campaign.recipient_events();
CREATE TRIGGER recipients_events_insert AFTER INSERT ON campaign.recipients
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION campaign.recipient_events();

-- A campaign entered running, paused, completed or cancelled. Paused carries
-- paused_reason when the campaigns table has one (read through to_jsonb, so this
-- function does not depend on the column); completed and cancelled carry the counts per
-- recipient status at that moment. `draft` and `ready` are the application's own writes.
CREATE FUNCTION campaign.campaign_events() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    written bigint;
BEGIN
    IF NOT campaign.event_wanted('campaign_status') THEN
        RETURN NULL;
    END IF;
    -- EXECUTE: planned for this statement's row count (see campaign.recipient_events).
    EXECUTE $sql$
    INSERT INTO campaign.events (kind, campaign_id, status, data)
    SELECT 'campaign_status', n.id, n.status,
           jsonb_strip_nulls(jsonb_build_object(
               'name', n.name,
               'previous', o.status,
               'paused_reason', CASE WHEN n.status = 'paused'
                                     THEN to_jsonb(n) -> 'paused_reason' END,
               'counts', CASE WHEN n.status IN ('completed', 'cancelled') THEN
                   coalesce((SELECT jsonb_object_agg(s.status, s.n)
                               FROM (SELECT r.status, count(*) AS n
                                       FROM campaign.recipients r
                                      WHERE r.campaign_id = n.id
                                      GROUP BY r.status) s), '{}'::jsonb) END))
      FROM new_rows n
      JOIN old_rows o ON o.id = n.id
     WHERE n.status IN ('running', 'paused', 'completed', 'cancelled')
       AND n.status IS DISTINCT FROM o.status
     ORDER BY n.id
    $sql$;
    GET DIAGNOSTICS written = ROW_COUNT;
    IF written > 0 THEN
        PERFORM pg_notify('campaign_events', 'campaign_status');
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER campaigns_events AFTER UPDATE ON campaign.campaigns
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION campaign.campaign_events();

-- Replies know their campaign: the receiver links an incoming message to the most recent
-- recipient sent to the same number within [optout] reply_window_h. No foreign keys: a
-- pruned campaign must not take its replies (or the opt-outs they caused) with it.
ALTER TABLE campaign.incoming_messages ADD COLUMN recipient_id bigint;
ALTER TABLE campaign.incoming_messages ADD COLUMN campaign_id bigint;
-- Opt-outs per campaign for `campaign status`.
CREATE INDEX incoming_messages_campaign_idx ON campaign.incoming_messages (campaign_id, action)
    WHERE campaign_id IS NOT NULL;
-- The reply's look-up: the latest send to one number. Partial: rows never accepted have
-- no sent_at and are never a reply's cause.
CREATE INDEX recipients_msisdn_sent_idx ON campaign.recipients (msisdn_e164, sent_at)
    WHERE sent_at IS NOT NULL;

-- Every stored incoming message is a `reply` (with the campaign and recipient it answers,
-- when one was found); a STOP or START is also an `opt_out` / `opt_in`. A duplicate
-- (same tid) inserts no row, so writes no event.
CREATE FUNCTION campaign.incoming_events() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    written bigint := 0;
    more bigint;
BEGIN
    IF campaign.event_wanted('reply') THEN
        INSERT INTO campaign.events (kind, campaign_id, recipient_id, msisdn, data)
        SELECT 'reply', n.campaign_id, n.recipient_id, coalesce(r.msisdn_e164, n.oa),
               jsonb_strip_nulls(jsonb_build_object(
                   'incoming_id', n.id, 'message', n.message, 'da', n.da, 'tid', n.tid,
                   'action', n.action))
          FROM new_rows n
          LEFT JOIN campaign.recipients r ON r.id = n.recipient_id
         ORDER BY n.id;
        GET DIAGNOSTICS written = ROW_COUNT;
    END IF;
    IF campaign.event_wanted('opt_out') OR campaign.event_wanted('opt_in') THEN
        INSERT INTO campaign.events (kind, campaign_id, recipient_id, msisdn, data)
        SELECT n.action, n.campaign_id, n.recipient_id, coalesce(r.msisdn_e164, n.oa),
               jsonb_strip_nulls(jsonb_build_object('incoming_id', n.id, 'message', n.message))
          FROM new_rows n
          LEFT JOIN campaign.recipients r ON r.id = n.recipient_id
         WHERE n.action IN ('opt_out', 'opt_in') AND campaign.event_wanted(n.action)
         ORDER BY n.id;
        GET DIAGNOSTICS more = ROW_COUNT;
        written := written + more;
    END IF;
    IF written > 0 THEN
        PERFORM pg_notify('campaign_events', 'incoming');
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER incoming_messages_events AFTER INSERT ON campaign.incoming_messages
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION campaign.incoming_events();

-- The forwarder's position (the last event id the application's URL answered 2xx for)
-- and its lease: one forwarder per fleet, another takes over once lease_until passed.
CREATE TABLE campaign.event_forwarder (
    singleton    boolean     PRIMARY KEY DEFAULT true,
    position     bigint      NOT NULL DEFAULT 0,
    holder       text,
    lease_until  timestamptz,
    forwarded_at timestamptz,
    CONSTRAINT event_forwarder_singleton_check CHECK (singleton)
);
INSERT INTO campaign.event_forwarder DEFAULT VALUES;

-- Suppressions learnt from delivery reports expire (NULL: never, as an operator's or a
-- STOP's). Adding a nullable column without a default rewrites nothing.
ALTER TABLE campaign.suppressions ADD COLUMN expires_at timestamptz;

-- A transient failure report sends the recipient once more: how many times it was, and
-- the transid of the attempt given up, so a late report for it changes nothing.
ALTER TABLE campaign.recipients ADD COLUMN report_retries smallint NOT NULL DEFAULT 0;
ALTER TABLE campaign.recipients ADD COLUMN retried_transid text;
