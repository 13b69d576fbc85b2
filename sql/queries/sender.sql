-- The senders: mark a batch as possibly sent just before its request, then write every
-- recipient's outcome and close the batch in one statement.

-- name: sender_mark_posting
-- Just before the POST: from here on crash recovery must treat the batch as possibly sent
-- (its recipients become 'unknown', never silently 'pending'). The lease is renewed for the
-- request's duration. No row means the lease was lost (recovery released the batch, its
-- recipients may already be claimed elsewhere): the batch must not be sent.
-- This is also the last moment a pause, cancel or expiry can stop the batch, which may have
-- waited in a queue and at the rate limiter since its claim: when its campaign is no longer
-- ready or running, or expires_at has passed, the batch is released instead of posted (its
-- recipients back to 'pending', attempts unchanged; the producer's sweeps then cancel or
-- expire them, a paused campaign's wait for a resume). held_back says why ('campaign_paused',
-- 'campaign_cancelled', 'campaign_expired'; NULL: posting), released how many went back.
-- Read in the same statement as the update: a change committed before it is always seen.
-- A batch claimed at a higher share or AIMD factor than the limiter now allows is cut by
-- the sender to its first recipients; the others ($4, never posted) go back to 'pending'
-- here, attempts unchanged, and are claimed again at the current size. released counts
-- them too.
-- $1 batch id, $2 worker id, $3 lease seconds, $4 recipient ids cut off the batch (bigint[])
WITH mine AS (
    SELECT b.id,
           CASE WHEN c.status NOT IN ('ready', 'running') THEN 'campaign_' || c.status
                WHEN c.expires_at <= now() THEN 'campaign_expired'
           END AS held_back
      FROM campaign.batches b
      JOIN campaign.campaigns c ON c.id = b.campaign_id
     WHERE b.id = $1 AND b.worker_id = $2 AND b.status = 'claimed'
       FOR UPDATE OF b
), returned AS (
    UPDATE campaign.recipients r
       SET status = 'pending', updated_at = now()
      FROM mine m
     WHERE r.batch_id = m.id AND r.status = 'sending'
       AND (m.held_back IS NOT NULL OR r.id = ANY($4::bigint[]))
    RETURNING r.id
)
UPDATE campaign.batches b
   SET status = CASE WHEN m.held_back IS NULL THEN 'posting' ELSE 'released' END,
       destinations = CASE WHEN m.held_back IS NULL
                           THEN b.destinations - (SELECT count(*) FROM returned)
                           ELSE b.destinations END,
       posted_at = CASE WHEN m.held_back IS NULL THEN now() END,
       lease_until = CASE WHEN m.held_back IS NULL THEN now() + make_interval(secs => $3)
                          ELSE b.lease_until END,
       error_code = m.held_back,
       error_message = CASE WHEN m.held_back IS NOT NULL
                            THEN 'not posted: the campaign stopped sending since the claim' END,
       finished_at = CASE WHEN m.held_back IS NOT NULL THEN now() END
  FROM mine m
 WHERE b.id = m.id
RETURNING b.id, m.held_back, (SELECT count(*) FROM returned) AS released;

-- name: sender_write_results
-- Every recipient's outcome (matched by correlation id in the caller), and the batch
-- closed, in one statement, so the lease ends exactly when the results are stored.
-- Rows are touched only while still in this batch and in flight ('sending', or 'unknown'
-- if recovery got there first); a recipient a report already resolved keeps its status.
-- $1 batch id; $2 one jsonb object of per-recipient arrays of equal length: id, status,
-- transid, error_code, error_message, retry_in_s (seconds until the next attempt, null:
-- none), attempts_added, and what the producer found at claim time: msisdn_e164,
-- encoding, parts (null keeps the stored value). One jsonb document costs the client a
-- tenth of ten bound arrays (asyncpg encodes those element by element) and the server
-- less too. Then the batch: $3 status, $4 destinations posted, $5 accepted, $6 rejected,
-- $7 http status, $8 error code, $9 error message, $10 duration ms.
WITH outcome AS (
    SELECT u.id::bigint AS id, u.status, u.transid, u.error_code, u.error_message,
           u.retry_in_s::float8 AS retry_in_s, u.attempts_added::int AS attempts_added,
           u.msisdn_e164, u.encoding, u.parts::smallint AS parts
      FROM ROWS FROM (
               jsonb_array_elements_text($2::jsonb -> 'id'),
               jsonb_array_elements_text($2::jsonb -> 'status'),
               jsonb_array_elements_text($2::jsonb -> 'transid'),
               jsonb_array_elements_text($2::jsonb -> 'error_code'),
               jsonb_array_elements_text($2::jsonb -> 'error_message'),
               jsonb_array_elements_text($2::jsonb -> 'retry_in_s'),
               jsonb_array_elements_text($2::jsonb -> 'attempts_added'),
               jsonb_array_elements_text($2::jsonb -> 'msisdn_e164'),
               jsonb_array_elements_text($2::jsonb -> 'encoding'),
               jsonb_array_elements_text($2::jsonb -> 'parts'))
           AS u(id, status, transid, error_code, error_message, retry_in_s, attempts_added,
                msisdn_e164, encoding, parts)
), updated AS (
    UPDATE campaign.recipients r
       SET status = u.status,
           msisdn_e164 = coalesce(u.msisdn_e164, r.msisdn_e164),
           encoding = coalesce(u.encoding, r.encoding),
           parts = coalesce(u.parts, r.parts),
           transid = u.transid,
           error_code = u.error_code,
           error_message = u.error_message,
           attempts = r.attempts + u.attempts_added,
           next_attempt_at = now() + make_interval(secs => u.retry_in_s),
           sent_at = CASE WHEN u.status = 'queued' THEN now() ELSE r.sent_at END,
           updated_at = now()
      FROM outcome u
     WHERE r.id = u.id AND r.batch_id = $1 AND r.status IN ('sending', 'unknown')
    RETURNING r.id, u.status AS outcome
), uncapped AS (
    -- The frequency cap counts what the API accepted: a recipient it did not accept
    -- (refused, failed, expired, or to be tried again) gives its reservation back; a
    -- retry reserves again when it is prepared. In doubt (`unknown`) keeps it.
    DELETE FROM campaign.cap_reservations c
     USING updated d
     WHERE c.recipient_id = d.id AND d.outcome IN ('rejected', 'failed', 'expired', 'pending')
)
UPDATE campaign.batches
   SET status = $3, destinations = $4, accepted = $5, rejected = $6, http_status = $7,
       error_code = $8, error_message = $9, duration_ms = $10, finished_at = now()
 WHERE id = $1
RETURNING (SELECT count(*) FROM updated) AS recipients;

-- name: sender_release_batch
-- Give back a batch that was never posted (service stopped, worker stopping): its
-- recipients return to 'pending' untouched, attempts unchanged.
-- $1 batch id, $2 error code (why), $3 error message
WITH returned AS (
    UPDATE campaign.recipients
       SET status = 'pending', updated_at = now()
     WHERE batch_id = $1 AND status = 'sending'
    RETURNING id
)
UPDATE campaign.batches
   SET status = 'released', error_code = $2, error_message = $3, finished_at = now()
 WHERE id = $1 AND status IN ('claimed', 'posting')
RETURNING (SELECT count(*) FROM returned) AS recipients;
