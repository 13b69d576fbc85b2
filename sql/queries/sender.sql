-- The senders: mark a batch as possibly sent just before its request, then write every
-- recipient's outcome and close the batch in one statement.

-- name: mark_posting
-- Just before the POST: from here on crash recovery must treat the batch as possibly sent
-- (its recipients become 'unknown', never silently 'pending'). The lease is renewed for the
-- request's duration. No row means the lease was lost (recovery released the batch, its
-- recipients may already be claimed elsewhere): the batch must not be sent.
-- $1 batch id, $2 worker id, $3 lease seconds
UPDATE campaign.batches
   SET status = 'posting', posted_at = now(), lease_until = now() + make_interval(secs => $3)
 WHERE id = $1 AND worker_id = $2 AND status = 'claimed'
RETURNING id;

-- name: write_results
-- Every recipient's outcome from arrays (matched by correlation id in the caller), and the
-- batch closed, in one statement, so the lease ends exactly when the results are stored.
-- Rows are touched only while still in this batch and in flight ('sending', or 'unknown'
-- if recovery got there first); a recipient a report already resolved keeps its status.
-- $1 batch id; arrays of equal length: $2 ids, $3 statuses, $4 transids, $5 error codes,
-- $6 error messages, $7 seconds until the next attempt (NULL: none), $8 attempts to add;
-- then the batch: $9 status, $10 destinations posted, $11 accepted, $12 rejected,
-- $13 http status, $14 error code, $15 error message, $16 duration ms; and per recipient
-- what the producer found at claim time (arrays like $2): $17 msisdn_e164, $18 encodings,
-- $19 parts, written here rather than in a separate statement at claim (NULL keeps the
-- stored value).
WITH outcome AS (
    SELECT *
      FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[],
                  $7::float8[], $8::int[], $17::text[], $18::text[], $19::smallint[])
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
    RETURNING r.id
)
UPDATE campaign.batches
   SET status = $9, destinations = $10, accepted = $11, rejected = $12, http_status = $13,
       error_code = $14, error_message = $15, duration_ms = $16, finished_at = now()
 WHERE id = $1
RETURNING (SELECT count(*) FROM updated) AS recipients;

-- name: release_batch
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
