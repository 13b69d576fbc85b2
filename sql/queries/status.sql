-- Read-only queries behind `campaign status`.

-- name: status_campaigns
-- One row per campaign (all, or the one asked for), newest first, with counts per
-- recipient status as a jsonb object. $1 campaign id or NULL for all; $2 row limit.
SELECT c.id, c.name, c.service, c.status, c.priority, c.created_at, c.started_at,
       c.completed_at, c.window_start, c.window_end, c.canary_size, c.max_failure_ratio,
       c.paused_reason,
       coalesce((SELECT jsonb_object_agg(s.status, s.n)
                   FROM (SELECT r.status, count(*) AS n
                           FROM campaign.recipients r
                          WHERE r.campaign_id = c.id
                          GROUP BY r.status) s), '{}'::jsonb) AS counts
  FROM campaign.campaigns c
 WHERE $1::bigint IS NULL OR c.id = $1
 ORDER BY c.id DESC
 LIMIT $2;

-- name: status_activity
-- Recent throughput and report lag of one campaign: destinations accepted in the last
-- minute, the oldest pending recipient, and report delay percentiles over the last hour.
-- $1 campaign id.
SELECT (SELECT count(*) FROM campaign.recipients
         WHERE campaign_id = $1 AND sent_at > now() - interval '60 seconds') AS sent_last_minute,
       (SELECT min(created_at) FROM campaign.recipients
         WHERE campaign_id = $1 AND status = 'pending') AS oldest_pending,
       lag.p50_s, lag.p95_s
  FROM (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM dr_at - sent_at)) AS p50_s,
               percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM dr_at - sent_at)) AS p95_s
          FROM campaign.recipients
         WHERE campaign_id = $1 AND dr_at > now() - interval '1 hour' AND sent_at IS NOT NULL) lag;

-- name: status_reasons
-- The commonest reasons of one campaign's recipients in the given statuses: the report's
-- code when there is one, else the worker's error code; one example row each.
-- $1 campaign id $2 statuses (text[]) $3 rows at most
SELECT r.status, coalesce(r.dr_code, r.error_code, '') AS code, count(*) AS n,
       min(r.id) AS example_id
  FROM campaign.recipients r
 WHERE r.campaign_id = $1 AND r.status = ANY($2::text[])
 GROUP BY 1, 2
 ORDER BY n DESC, code
 LIMIT $3;

-- name: status_live_senders
-- How many sending workers are alive for service $1, as the fleet counts them
-- (campaign.worker_live: heartbeat within $2 seconds, or quiet with its LISTEN open).
-- $1 service $2 seconds
SELECT count(*) AS n
  FROM campaign.workers w
 WHERE $1 = ANY(w.services) AND campaign.worker_live(w, $2);

-- name: status_send_window
-- When a finished campaign's first and last destinations were accepted, for its average
-- rate (read once the campaign is final: a scan of its recipients).
-- $1 campaign id
SELECT min(sent_at) AS first_sent, max(sent_at) AS last_sent,
       count(sent_at) AS accepted
  FROM campaign.recipients
 WHERE campaign_id = $1;

-- name: status_window_waiting
-- How many of one campaign's recipients wait for their sending window to open, and when
-- the first of them opens (producer_prepare_recipients marked them). The dashboard's
-- guard_rails show the same figures through this query.
-- $1 campaign id
SELECT count(*) AS waiting, min(next_attempt_at) AS next_opening
  FROM campaign.recipients
 WHERE campaign_id = $1 AND status = 'pending' AND error_code = 'outside_window'
   AND next_attempt_at > now();

-- name: status_replies
-- Replies linked to one campaign (the receiver links each incoming message to the latest
-- recipient sent to its number within [optout] reply_window_h) and how many were STOP /
-- START, through incoming_messages_campaign_idx.
-- $1 campaign id
SELECT count(*) AS replies,
       count(*) FILTER (WHERE action = 'opt_out') AS opt_outs,
       count(*) FILTER (WHERE action = 'opt_in') AS opt_ins
  FROM campaign.incoming_messages
 WHERE campaign_id = $1;
