-- Queries of the worker's composition root.

-- name: worker_report_lag
-- For the periodic worker_stats line: how far behind report matching is (age of the oldest
-- report still waiting for its recipient) and how many reports wait. Uses the partial
-- index on state = 'new', so it stays cheap however many reports were ever stored.
SELECT coalesce(extract(epoch FROM now() - min(received_at)), 0)::float8 AS lag_s,
       count(*) AS waiting
  FROM campaign.delivery_reports
 WHERE state = 'new';
