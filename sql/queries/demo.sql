-- `campaign demo`: seed one campaign and follow it to completion.

-- name: demo_create_campaign
-- The demo's campaign, as a draft: smartlink 1, priority 3, a day to live.
-- $1 service $2 body
INSERT INTO campaign.campaigns (name, service, body, smartlinks, priority, expires_at,
                                callback_data)
VALUES ('demo ' || to_char(now(), 'YYYY-MM-DD HH24:MI:SS'), $1, $2,
        '[{"linkid": 1, "validity": 1440}]', 3, now() + interval '1 day', 'demo')
RETURNING id;

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
