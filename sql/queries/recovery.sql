-- Crash recovery: batches whose worker died or stopped, and recipients left in doubt.

-- name: recovery_expired_batches
-- Batches whose lease ran out (their worker died or hung). A 'claimed' batch never left:
-- its recipients go back to 'pending'. A 'posting' batch may have reached the API: its
-- recipients become 'unknown' with the attempt counted, and recovery_resolve_unknown decides
-- (wait for a report, resend or fail). SKIP LOCKED: a live worker writing results wins.
-- $1 maximum batches per call
WITH expired AS (
    SELECT id, status
      FROM campaign.batches
     WHERE status IN ('claimed', 'posting') AND lease_until < now()
     ORDER BY lease_until
     LIMIT $1
       FOR UPDATE SKIP LOCKED
), closed AS (
    UPDATE campaign.batches b
       SET status = CASE e.status WHEN 'claimed' THEN 'released' ELSE 'abandoned' END,
           error_code = 'lease_expired', finished_at = now()
      FROM expired e
     WHERE b.id = e.id
    RETURNING b.id, e.status AS was
), moved AS (
    UPDATE campaign.recipients r
       SET status = CASE c.was WHEN 'claimed' THEN 'pending' ELSE 'unknown' END,
           attempts = r.attempts + CASE c.was WHEN 'claimed' THEN 0 ELSE 1 END,
           error_code = CASE c.was WHEN 'claimed' THEN r.error_code ELSE 'lease_expired' END,
           error_message = CASE c.was WHEN 'claimed' THEN r.error_message
                                ELSE 'worker lost while the request was in flight' END,
           updated_at = now()
      FROM closed c
     WHERE r.batch_id = c.id AND r.status = 'sending'
    RETURNING c.was
)
SELECT (SELECT count(*) FROM closed) AS batches,
       count(*) FILTER (WHERE was = 'claimed') AS released,
       count(*) FILTER (WHERE was = 'posting') AS in_doubt
  FROM moved;

-- name: recovery_release_worker
-- At shutdown, this worker's open batches, whatever their lease: as recovery_expired_batches
-- ('claimed' -> recipients 'pending'; 'posting', whose results could not be written ->
-- 'unknown'), so a restart does not wait for the lease.
-- $1 worker id
WITH mine AS (
    SELECT id, status
      FROM campaign.batches
     WHERE status IN ('claimed', 'posting') AND worker_id = $1
       FOR UPDATE
), closed AS (
    UPDATE campaign.batches b
       SET status = CASE m.status WHEN 'claimed' THEN 'released' ELSE 'abandoned' END,
           error_code = 'worker_stopped', finished_at = now()
      FROM mine m
     WHERE b.id = m.id
    RETURNING b.id, m.status AS was
), moved AS (
    UPDATE campaign.recipients r
       SET status = CASE c.was WHEN 'claimed' THEN 'pending' ELSE 'unknown' END,
           attempts = r.attempts + CASE c.was WHEN 'claimed' THEN 0 ELSE 1 END,
           error_code = CASE c.was WHEN 'claimed' THEN r.error_code ELSE 'worker_stopped' END,
           error_message = CASE c.was WHEN 'claimed' THEN r.error_message
                                ELSE 'worker stopped while the request was in flight' END,
           updated_at = now()
      FROM closed c
     WHERE r.batch_id = c.id AND r.status = 'sending'
    RETURNING c.was
)
SELECT (SELECT count(*) FROM closed) AS batches,
       count(*) FILTER (WHERE was = 'claimed') AS released,
       count(*) FILTER (WHERE was = 'posting') AS in_doubt
  FROM moved;

-- name: recovery_resolve_unknown
-- Recipients of one service left 'unknown' (in doubt) for $2 seconds without a delivery
-- report resolving them: back to 'pending' to be sent again, or 'failed' when the service
-- says on_timeout = "fail" or their attempts are used up. Bounded per call.
-- A row whose report has arrived but waits to be matched ('new', found by correlation id
-- as the reconciler finds it) is left to the reconciler: the report proves the API took
-- the message, so a reconciler running late must not turn into a second send. The grace
-- is the time for a report to arrive, not for a pass to get to it. One probe of
-- delivery_reports_new_correlation_idx per row (migration 0009).
-- $1 service, $2 seconds to wait for a report, $3 fail instead of resend (bool),
-- $4 max attempts, $5 maximum rows
WITH due AS (
    SELECT r.id
      FROM campaign.campaigns c
      JOIN campaign.recipients r ON r.campaign_id = c.id AND r.status = 'unknown'
     WHERE c.service = $1
       AND r.updated_at <= now() - make_interval(secs => $2)
       -- COLLATE: recipients.correlation_id is "C", the reports' column the default; without
       -- it the two collations conflict, the index is not usable and each row scanned every
       -- waiting report (3,000 rows in doubt x 50,000 waiting: 105 s instead of 0.1 s).
       AND NOT EXISTS (
            SELECT 1
              FROM campaign.delivery_reports d
             WHERE d.state = 'new'
               AND d.correlation_id = r.correlation_id COLLATE "default")
     LIMIT $5
       FOR UPDATE OF r SKIP LOCKED
)
UPDATE campaign.recipients r
   SET status = CASE WHEN $3 OR r.attempts >= $4 THEN 'failed' ELSE 'pending' END,
       error_code = coalesce(r.error_code, 'in_doubt'),
       next_attempt_at = NULL,
       updated_at = now()
  FROM due
 WHERE r.id = due.id
RETURNING r.status;

-- name: recovery_work_remaining
-- Whether drain mode must keep going: rows in flight or in doubt, or pending rows of
-- runnable (or cancelled, not yet swept) campaigns whose send_after has passed and that
-- do not wait for their sending window to open, on the services this worker sends for.
-- $1 services (text[])
SELECT EXISTS (
    SELECT 1
      FROM campaign.campaigns c
      JOIN campaign.recipients r ON r.campaign_id = c.id
     WHERE c.service = ANY($1::text[])
       AND (r.status IN ('sending', 'unknown')
            OR (r.status = 'pending'
                AND c.status IN ('ready', 'running', 'cancelled')
                AND (c.send_after IS NULL OR c.send_after <= now())
                -- Waiting hours for a sending window to open is not drain mode's work.
                AND (r.error_code IS DISTINCT FROM 'outside_window'
                     OR r.next_attempt_at IS NULL OR r.next_attempt_at <= now()))));
