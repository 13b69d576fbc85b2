-- The database is campaign's public interface: applications insert campaigns and
-- recipients here, the worker does the rest. Everything lives in schema `campaign`.

CREATE SCHEMA IF NOT EXISTS campaign;

-- Campaigns: one message (text or template) sent through one configured service.
-- Users write status draft / ready / paused / cancelled; the worker writes
-- running and completed.
CREATE TABLE campaign.campaigns (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          text        NOT NULL,
    service       text        NOT NULL,
    sender_id     text,
    body          text,
    template_id   text,
    smartlinks    jsonb       NOT NULL DEFAULT '[]',
    priority      smallint    NOT NULL DEFAULT 2,
    send_after    timestamptz,
    expires_at    timestamptz,
    callback_data text,
    status        text        NOT NULL DEFAULT 'draft',
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz,
    completed_at  timestamptz,
    CONSTRAINT campaigns_status_check
        CHECK (status IN ('draft', 'ready', 'running', 'paused', 'cancelled', 'completed')),
    CONSTRAINT campaigns_priority_check CHECK (priority BETWEEN 1 AND 3),
    CONSTRAINT campaigns_body_or_template_check
        CHECK ((body IS NULL) <> (template_id IS NULL)),
    CONSTRAINT campaigns_body_length_check CHECK (body IS NULL OR length(body) BETWEEN 1 AND 1024),
    CONSTRAINT campaigns_name_check CHECK (length(name) BETWEEN 1 AND 200),
    CONSTRAINT campaigns_service_check CHECK (length(service) BETWEEN 1 AND 100),
    CONSTRAINT campaigns_smartlinks_check CHECK (jsonb_typeof(smartlinks) = 'array'),
    CONSTRAINT campaigns_window_check
        CHECK (expires_at IS NULL OR send_after IS NULL OR expires_at > send_after),
    CONSTRAINT campaigns_callback_data_check
        CHECK (callback_data IS NULL OR length(callback_data) <= 2000)
);

-- The producer looks only at campaigns that can have work.
CREATE INDEX campaigns_runnable_idx ON campaign.campaigns (priority DESC, id)
    WHERE status IN ('ready', 'running');

-- Recipients: one row per destination. Applications insert campaign_id, msisdn and
-- variables; every other column is the worker's.
CREATE TABLE campaign.recipients (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    campaign_id     bigint      NOT NULL REFERENCES campaign.campaigns (id) ON DELETE CASCADE,
    msisdn          text        NOT NULL,
    variables       jsonb       NOT NULL DEFAULT '{}',
    status          text        NOT NULL DEFAULT 'pending',
    -- Derived from id: unique by construction and cheap to index (a random default
    -- doubled the cost of a bulk COPY). Sent as each destination's correlationid.
    correlation_id  text COLLATE "C" GENERATED ALWAYS AS ('r' || id::text) STORED,
    msisdn_e164     text,
    encoding        text,
    parts           smallint,
    batch_id        bigint,
    transid         text,
    error_code      text,
    error_message   text,
    dr_code         text,
    dr_status       text,
    dr_description  text,
    dr_at           timestamptz,
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    CONSTRAINT recipients_status_check CHECK (status IN (
        'pending', 'sending', 'queued', 'unknown',
        'delivered', 'failed', 'rejected', 'invalid', 'suppressed', 'expired', 'cancelled')),
    CONSTRAINT recipients_variables_check CHECK (jsonb_typeof(variables) = 'object'),
    CONSTRAINT recipients_encoding_check CHECK (encoding IS NULL OR encoding IN ('gsm7', 'ucs2')),
    CONSTRAINT recipients_attempts_check CHECK (attempts >= 0)
);

CREATE UNIQUE INDEX recipients_correlation_id_key ON campaign.recipients (correlation_id);
-- Pending work of a campaign, oldest first: the claim's only access path.
CREATE INDEX recipients_pending_idx ON campaign.recipients (campaign_id, id)
    WHERE status = 'pending';
-- Delivery reports match by transid.
CREATE INDEX recipients_transid_idx ON campaign.recipients (transid) WHERE transid IS NOT NULL;
-- Rows in flight or in doubt, found by batch for results and crash recovery.
CREATE INDEX recipients_batch_idx ON campaign.recipients (batch_id)
    WHERE status IN ('sending', 'unknown');
-- Accepted rows awaiting a report, for the report timeout.
CREATE INDEX recipients_queued_idx ON campaign.recipients (sent_at) WHERE status = 'queued';
CREATE INDEX recipients_campaign_status_idx ON campaign.recipients (campaign_id, status);

-- Opt-outs. Numbers in E.164 with a leading '+'; the worker compares after normalising.
CREATE TABLE campaign.suppressions (
    msisdn     text PRIMARY KEY,
    reason     text        NOT NULL DEFAULT 'manual',
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT suppressions_msisdn_check CHECK (msisdn ~ '^\+[1-9][0-9]{6,14}$')
);

-- One row per request sent (or about to be sent) to the messaging API. The lease tells
-- crash recovery whether a request may have gone out: a 'claimed' batch never left,
-- a 'posting' batch may have.
CREATE TABLE campaign.batches (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    campaign_id   bigint      NOT NULL REFERENCES campaign.campaigns (id) ON DELETE CASCADE,
    service       text        NOT NULL,
    worker_id     text        NOT NULL,
    status        text        NOT NULL DEFAULT 'claimed',
    lease_until   timestamptz NOT NULL,
    destinations  integer     NOT NULL DEFAULT 0,
    accepted      integer     NOT NULL DEFAULT 0,
    rejected      integer     NOT NULL DEFAULT 0,
    http_status   integer,
    error_code    text,
    error_message text,
    duration_ms   integer,
    created_at    timestamptz NOT NULL DEFAULT now(),
    posted_at     timestamptz,
    finished_at   timestamptz,
    CONSTRAINT batches_status_check CHECK (status IN (
        'claimed', 'posting', 'done', 'retry', 'in_doubt', 'released', 'abandoned'))
);

-- Crash recovery scans open batches only.
CREATE INDEX batches_open_idx ON campaign.batches (lease_until)
    WHERE status IN ('claimed', 'posting');

-- Delivery reports, stored verbatim-enough before they are matched. A report that
-- arrives before its submit response waits here in state 'new'.
CREATE TABLE campaign.delivery_reports (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transid         text,
    correlation_id  text,
    code            text        NOT NULL,
    delivery_status text,
    description     text,
    destination     text,
    reported_at     timestamptz,
    callback_data   text,
    message_count   integer,
    carrier         text,
    received_at     timestamptz NOT NULL DEFAULT now(),
    state           text        NOT NULL DEFAULT 'new',
    recipient_id    bigint,
    matched_at      timestamptz,
    raw             jsonb       NOT NULL,
    CONSTRAINT delivery_reports_state_check CHECK (state IN ('new', 'matched', 'orphaned'))
);

-- Idempotency: the platform retries callbacks; the same report is stored once.
CREATE UNIQUE INDEX delivery_reports_dedup_key ON campaign.delivery_reports
    (transid, code, reported_at) NULLS NOT DISTINCT;
CREATE INDEX delivery_reports_new_idx ON campaign.delivery_reports (id) WHERE state = 'new';

-- Incoming messages (MO). `action` records what the worker did with it.
CREATE TABLE campaign.incoming_messages (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tid         text,
    oa          text        NOT NULL,
    da          text,
    message     text        NOT NULL DEFAULT '',
    user_id     text,
    channel     text,
    sent_at     text,
    received_at timestamptz NOT NULL DEFAULT now(),
    action      text,
    raw         jsonb       NOT NULL,
    CONSTRAINT incoming_messages_action_check CHECK (action IS NULL OR action IN ('opt_out', 'opt_in'))
);

CREATE UNIQUE INDEX incoming_messages_tid_key ON campaign.incoming_messages (tid)
    WHERE tid IS NOT NULL;

-- Webhook bodies that could not be parsed, kept so nothing is lost.
CREATE TABLE campaign.webhook_rejects (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind         text        NOT NULL,
    reason       text        NOT NULL,
    content_type text,
    remote       text,
    body         bytea       NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT webhook_rejects_kind_check CHECK (kind IN ('dr', 'mo'))
);

-- Wake the worker. Statement-level on recipients so a COPY of a million rows sends
-- one notification, not a million; NOTIFY only wakes, the worker still polls.
CREATE FUNCTION campaign.notify_work() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('campaign_work', TG_TABLE_NAME);
    RETURN NULL;
END;
$$;

CREATE TRIGGER recipients_notify AFTER INSERT ON campaign.recipients
    FOR EACH STATEMENT EXECUTE FUNCTION campaign.notify_work();
CREATE TRIGGER campaigns_notify AFTER INSERT OR UPDATE OF status ON campaign.campaigns
    FOR EACH STATEMENT EXECUTE FUNCTION campaign.notify_work();

-- Recipients added to a completed campaign reopen it, so they are sent rather than
-- stranded behind a status the producer no longer looks at.
CREATE FUNCTION campaign.reopen_completed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    reopened bigint[];
BEGIN
    SELECT array_agg(c.id) INTO reopened
      FROM campaign.campaigns c
     WHERE c.status = 'completed'
       AND c.id IN (SELECT DISTINCT n.campaign_id FROM new_rows n);
    -- Only when there is one: an UPDATE of no rows would still fire the NOTIFY trigger.
    IF reopened IS NOT NULL THEN
        UPDATE campaign.campaigns
           SET status = 'running', completed_at = NULL
         WHERE id = ANY(reopened);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER recipients_reopen AFTER INSERT ON campaign.recipients
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION campaign.reopen_completed();

CREATE FUNCTION campaign.touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

CREATE TRIGGER campaigns_touch BEFORE UPDATE ON campaign.campaigns
    FOR EACH ROW EXECUTE FUNCTION campaign.touch_updated_at();
