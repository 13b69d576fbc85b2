-- Read-only queries behind `campaign status`.

-- name: status_campaigns
-- One row per campaign (all, or the one asked for), newest first, with counts per
-- recipient status as a jsonb object. $1 campaign id or NULL for all; $2 row limit.
SELECT c.id, c.name, c.service, c.status, c.priority, c.created_at, c.started_at,
       c.completed_at,
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
