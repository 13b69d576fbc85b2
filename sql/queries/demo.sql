-- `campaign demo`: seed one campaign and follow it to completion.

-- name: demo_create_campaign
-- The demo's campaign, as a draft: smartlink 1, priority 3, a day to live; guard rails
-- while sending: a twelve-hour sending window that is open now in India (where the demo's
-- numbers are), a canary of $3 recipients and a brake at 25 % failures.
-- $1 service $2 body $3 canary size
INSERT INTO campaign.campaigns (name, service, body, smartlinks, priority, expires_at,
                                callback_data, window_start, window_end, canary_size,
                                max_failure_ratio)
VALUES ('demo ' || to_char(now(), 'YYYY-MM-DD HH24:MI:SS'), $1, $2,
        '[{"linkid": 1, "validity": 1440}]', 3, now() + interval '1 day', 'demo',
        date_trunc('minute', (now() AT TIME ZONE 'Asia/Kolkata') - interval '2 hours')::time,
        date_trunc('minute', (now() AT TIME ZONE 'Asia/Kolkata') + interval '10 hours')::time,
        $3, 0.25)
RETURNING id;

-- name: demo_guard_rails
-- The campaign's guard rails while sending and what they did, for the summary.
-- $1 campaign id
SELECT c.window_start, c.window_end, c.canary_size, c.max_failure_ratio,
       c.canary_judged_at, c.status, c.paused_reason,
       (SELECT count(*) FROM campaign.recipients r
         WHERE r.campaign_id = c.id AND r.status = 'pending'
           AND r.error_code = 'outside_window') AS waiting_for_window
  FROM campaign.campaigns c
 WHERE c.id = $1;

-- name: demo_seed_recipients
-- $2 valid recipients numbered 1..$2 with their variables, in one statement.
-- $1 campaign id $2 count
INSERT INTO campaign.recipients (campaign_id, msisdn, variables)
SELECT $1, '+9198' || lpad(g::text, 8, '0'),
       jsonb_build_object('name', 'Customer ' || g, 'code', 'NOV' || (1000 + g))
  FROM generate_series(1, $2::int) AS g;

-- name: demo_insert_recipient
-- One recipient as an application inserts it (the demo's bad rows).
-- $1 campaign id $2 msisdn $3 variables
INSERT INTO campaign.recipients (campaign_id, msisdn, variables) VALUES ($1, $2, $3);

-- name: demo_counts
-- Recipients per status.
-- $1 campaign id
SELECT status, count(*) AS n FROM campaign.recipients WHERE campaign_id = $1 GROUP BY status;

-- name: demo_is_suppressed
-- Whether the STOP reply was stored as an opt-out.
-- $1 msisdn (E.164 with '+')
SELECT true FROM campaign.suppressions WHERE msisdn = $1;

-- name: demo_campaign_status
-- $1 campaign id
SELECT status FROM campaign.campaigns WHERE id = $1;

-- name: demo_delivery_stats
-- Submit -> report lag percentiles and the send window, for the summary.
-- $1 campaign id
SELECT percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP
           (ORDER BY extract(epoch FROM dr_at - sent_at)) AS lag,
       min(sent_at) AS first_sent, max(sent_at) AS last_sent
  FROM campaign.recipients
 WHERE campaign_id = $1 AND dr_at IS NOT NULL AND sent_at IS NOT NULL;

-- name: demo_delete_earlier
-- Every run seeds a new campaign into the same database; without this the embedded
-- database grew by a whole run each time. Deletes the earlier demo campaigns (known by
-- what demo_create_campaign sets: service, callback data and name) with their recipients
-- and batches (ON DELETE CASCADE) and the delivery reports matched to those recipients
-- (not tied by a foreign key).
-- $1 service; returns the number of campaigns deleted
WITH earlier AS (
    SELECT id FROM campaign.campaigns
     WHERE service = $1 AND callback_data = 'demo' AND name LIKE 'demo %'
), reports AS (
    DELETE FROM campaign.delivery_reports d
     WHERE d.recipient_id IN (SELECT r.id FROM campaign.recipients r
                                JOIN earlier e ON e.id = r.campaign_id)
), gone AS (
    DELETE FROM campaign.campaigns c USING earlier e WHERE c.id = e.id RETURNING c.id
)
SELECT count(*) FROM gone;

-- name: demo_vacuum
-- After demo_delete_earlier: make the deleted rows' space reusable by this run at once
-- (autovacuum would come only after the run had grown the files by a run's worth).
VACUUM campaign.recipients, campaign.batches, campaign.delivery_reports;

-- name: demo_limit_wal
-- The embedded server only (superuser, our own data directory). PostgreSQL keeps up to
-- max_wal_size of WAL after a run (1 GB by default; a 20,000-recipient run writes about
-- 130 MB), which a demo database on a laptop does not need. Takes effect with
-- demo_reload_config; persists in the data directory's postgresql.auto.conf.
ALTER SYSTEM SET max_wal_size = '128MB';

-- name: demo_reload_config
SELECT pg_reload_conf();

-- name: demo_learning
-- What the campaign's reports taught and the events it wrote, for the summary: recipients
-- sent once more after a transient failure, numbers suppressed by a report, events per kind.
-- $1 campaign id
SELECT (SELECT count(*) FROM campaign.recipients
         WHERE campaign_id = $1 AND report_retries > 0) AS retried,
       (SELECT count(*) FROM campaign.suppressions s
         WHERE s.reason LIKE 'dr:%'
           AND s.msisdn IN (SELECT r.msisdn_e164 FROM campaign.recipients r
                             WHERE r.campaign_id = $1 AND r.status = 'failed')) AS suppressed,
       coalesce((SELECT jsonb_object_agg(e.kind, e.n)
                   FROM (SELECT kind, count(*) AS n FROM campaign.events
                          WHERE campaign_id = $1 GROUP BY kind) e), '{}'::jsonb) AS events;
