-- Read-only queries behind the dashboard (GET / and /api/campaigns on the ops address)
-- and `campaign report ID --html`. Per-campaign figures come from here, never from the
-- process's metrics (those carry no campaign id).

-- name: dashboard_campaigns
-- One row per campaign (newest first, or the one asked for): counts per recipient status
-- as a jsonb object, and destinations accepted in the last minute (rate and ETA).
-- paused_reason: why the worker paused it (canary or brake), NULL otherwise.
-- $1 campaign id or NULL for all; $2 row limit.
SELECT c.id, c.name, c.service, c.status, c.priority, c.created_at, c.started_at,
       c.completed_at, c.expires_at,
       c.paused_reason,
       coalesce((SELECT jsonb_object_agg(s.status, s.n)
                   FROM (SELECT r.status, count(*) AS n
                           FROM campaign.recipients r
                          WHERE r.campaign_id = c.id
                          GROUP BY r.status) s), '{}'::jsonb) AS counts,
       (SELECT count(*) FROM campaign.recipients r
         WHERE r.campaign_id = c.id AND r.sent_at > now() - interval '60 seconds')
           AS sent_last_minute,
       now() AS now
  FROM campaign.campaigns c
 WHERE $1::bigint IS NULL OR c.id = $1
 ORDER BY c.id DESC
 LIMIT $2;

-- name: dashboard_series
-- Sends (recipients accepted, by sent_at) and final reports (the report each recipient's
-- dr_* came from, by the time it arrived) of one campaign in $4 buckets of $3 seconds
-- from $2; a bucket without any is a 0 row, so the chart has no gaps.
-- $1 campaign id $2 start (timestamptz) $3 bucket seconds $4 buckets
WITH sends AS (
    SELECT floor(extract(epoch FROM r.sent_at - $2::timestamptz) / $3)::int AS i,
           count(*) AS n
      FROM campaign.recipients r
     WHERE r.campaign_id = $1 AND r.sent_at >= $2::timestamptz
     GROUP BY 1
),
reports AS (
    SELECT floor(extract(epoch FROM d.received_at - $2::timestamptz) / $3)::int AS i,
           count(*) AS n
      FROM campaign.recipients r
      JOIN campaign.delivery_reports d ON d.id = r.dr_report_id
     WHERE r.campaign_id = $1 AND d.received_at >= $2::timestamptz
     GROUP BY 1
)
SELECT g.i, coalesce(s.n, 0) AS sends, coalesce(p.n, 0) AS reports
  FROM generate_series(0, $4::int - 1) AS g(i)
  LEFT JOIN sends s ON s.i = g.i
  LEFT JOIN reports p ON p.i = g.i
 ORDER BY g.i;

-- name: dashboard_report_delay
-- Report delay percentiles of one campaign: from the API accepting a message (sent_at)
-- to its delivery report's own timestamp (dr_at), over every recipient that has both.
-- $1 campaign id
SELECT count(*) AS reports,
       percentile_cont(ARRAY[0.5, 0.9, 0.95, 0.99]::float8[])
           WITHIN GROUP (ORDER BY greatest(extract(epoch FROM dr_at - sent_at), 0))
           AS percentiles_s
  FROM campaign.recipients
 WHERE campaign_id = $1 AND dr_at IS NOT NULL AND sent_at IS NOT NULL;

-- name: dashboard_reasons
-- Recipients of one campaign in the given statuses by reason: the report's code when
-- there is one, else the worker's error code. $1 campaign id $2 statuses $3 rows at most
SELECT r.status, coalesce(r.dr_code, r.error_code, '') AS code, count(*) AS n
  FROM campaign.recipients r
 WHERE r.campaign_id = $1 AND r.status = ANY($2::text[])
 GROUP BY 1, 2
 ORDER BY n DESC, code
 LIMIT $3;
