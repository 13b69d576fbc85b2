-- The producer: picks the campaign to serve, claims a batch of its pending recipients under
-- a lease, records what rendering found, and sweeps pending rows that can no longer be sent.

-- name: producer_next_campaign
-- The campaign the next batch comes from: runnable (ready or running, send_after passed,
-- not expired), on a service this worker sends for and has room for, with at least one
-- recipient due now; highest priority first, then oldest. Campaigns a concurrent claimer
-- just emptied are passed in $2 so one pass does not spin on them.
-- $1 services (text[]), $2 campaign ids to skip (bigint[]), $3 jsonb object: campaign id ->
-- recipient id this worker has claimed up to (see producer_claim_batch), so the probe starts there.
SELECT c.id, c.service, c.sender_id, c.body, c.template_id, c.smartlinks, c.priority,
       c.expires_at, c.callback_data
  FROM campaign.campaigns c
 WHERE c.status IN ('ready', 'running')
   AND c.service = ANY($1::text[])
   AND NOT c.id = ANY($2::bigint[])
   AND (c.send_after IS NULL OR c.send_after <= now())
   AND (c.expires_at IS NULL OR c.expires_at > now())
   -- One probe of recipients_pending_idx per candidate, stopping at its first due row.
   -- Written as EXISTS, the planner may hash-join a scan of every recipient, or walk the
   -- primary key through rows already sent, because its statistics still call them
   -- pending; a range on campaign_id plus an ORDER BY only that index provides keeps this
   -- an index probe whatever the statistics say.
   AND (SELECT r.id
          FROM campaign.recipients r
         WHERE r.campaign_id >= c.id AND r.campaign_id <= c.id
           AND r.id > coalesce(($3::jsonb ->> c.id::text)::bigint, 0)
           AND r.status = 'pending'
           AND (r.next_attempt_at IS NULL OR r.next_attempt_at <= now())
         ORDER BY r.campaign_id, r.id
         LIMIT 1) IS NOT NULL
 ORDER BY c.priority DESC, c.id
 LIMIT 1;

-- name: producer_claim_batch
-- Claim up to $2 due recipients of one campaign, oldest first, for this worker: a batches
-- row holds the lease, the recipients move to 'sending' with its id. SKIP LOCKED lets two
-- workers claim from one campaign at once without ever taking the same row; the campaign
-- check is repeated here so a pause or cancel committed since producer_next_campaign wins. A ready
-- campaign becomes running on its first claim. No row is returned when nothing was due.
-- $1 campaign id, $2 batch size, $3 service, $4 worker id, $5 lease seconds, $6 the
-- highest recipient id this worker claimed from the campaign so far (0: from the start).
-- Every row sent leaves a dead entry in recipients_pending_idx until vacuum removes it;
-- starting at $6 keeps a claim from walking them all (74 -> 18 ms a claim with 7,000,000
-- rows sent and no vacuum yet). Rows that became due again below $6 (retries, released
-- batches) are found when the producer starts again from 0 (see Producer._after).
-- The range on campaign_id and ORDER BY (campaign_id, id) make recipients_pending_idx the
-- only index that yields rows in order: with `campaign_id = $1 ORDER BY id` the planner,
-- trusting statistics that still call the rows already sent pending, walks the primary
-- key through every one of them on each claim (quadratic over a campaign).
WITH picked AS (
    SELECT r.id
      FROM campaign.recipients r
     WHERE r.campaign_id >= $1 AND r.campaign_id <= $1
       AND r.id > $6
       AND r.status = 'pending'
       AND (r.next_attempt_at IS NULL OR r.next_attempt_at <= now())
       AND EXISTS (
            SELECT 1
              FROM campaign.campaigns c
             WHERE c.id = $1
               AND c.status IN ('ready', 'running')
               AND (c.expires_at IS NULL OR c.expires_at > now()))
     ORDER BY r.campaign_id, r.id
     LIMIT $2
       FOR UPDATE OF r SKIP LOCKED
), batch AS (
    INSERT INTO campaign.batches (campaign_id, service, worker_id, lease_until, destinations)
    SELECT $1, $3, $4, now() + make_interval(secs => $5), count(*)
      FROM picked
    HAVING count(*) > 0
    RETURNING id
), started AS (
    UPDATE campaign.campaigns
       SET status = 'running', started_at = coalesce(started_at, now())
     WHERE id = $1 AND status = 'ready' AND EXISTS (SELECT 1 FROM batch)
)
UPDATE campaign.recipients r
   SET status = 'sending', batch_id = batch.id, updated_at = now()
  FROM picked, batch
 WHERE r.id = picked.id
RETURNING r.id, r.batch_id, r.msisdn, r.msisdn_e164, r.variables, r.correlation_id, r.attempts;

-- name: producer_suppressed_numbers
-- Which of these E.164 numbers (with '+') are opted out. A suppression learnt from a
-- delivery report expires (expires_at); an operator's or a STOP's never does (NULL).
-- $1 numbers (text[])
SELECT msisdn
  FROM campaign.suppressions
 WHERE msisdn = ANY($1::text[]) AND (expires_at IS NULL OR expires_at > now());

-- name: producer_prepare_recipients
-- Give the claimed rows that must not be sent (invalid / suppressed) their final status
-- and reason in one statement; they leave the batch. Rows still to send are not touched
-- here: their number, encoding and parts are written with their results (sender_write_results),
-- so a sent row is written twice, not three times. The batch keeps the count still to
-- send and is closed at once when that is zero (nothing will be posted). Only called
-- when there is at least one such row.
-- $1 batch id; arrays of equal length: $2 ids, $3 final statuses, $4 msisdn_e164 (NULL
-- when the number is invalid), $5 error codes, $6 error messages
WITH updated AS (
    UPDATE campaign.recipients r
       SET status = u.status,
           msisdn_e164 = u.msisdn_e164,
           error_code = u.error_code,
           error_message = u.error_message,
           updated_at = now()
      FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[])
           AS u(id, status, msisdn_e164, error_code, error_message)
     WHERE r.id = u.id AND r.batch_id = $1 AND r.status = 'sending'
    RETURNING r.id
), left_to_send AS (
    SELECT b.destinations - (SELECT count(*) FROM updated) AS n
      FROM campaign.batches b
     WHERE b.id = $1
)
UPDATE campaign.batches b
   SET destinations = l.n,
       status = CASE WHEN l.n = 0 THEN 'done' ELSE b.status END,
       finished_at = CASE WHEN l.n = 0 THEN now() ELSE b.finished_at END
  FROM left_to_send l
 WHERE b.id = $1
RETURNING b.destinations;

-- name: producer_cancel_pending
-- Unsent recipients of cancelled campaigns become 'cancelled'; rows in flight finish.
-- Bounded per call so a huge campaign does not hold one long transaction; call again
-- while it returns $1.
-- $1 maximum rows
WITH doomed AS (
    SELECT r.id
      FROM campaign.campaigns c
      JOIN campaign.recipients r ON r.campaign_id = c.id AND r.status = 'pending'
     WHERE c.status = 'cancelled'
     LIMIT $1
       FOR UPDATE OF r SKIP LOCKED
)
UPDATE campaign.recipients r
   SET status = 'cancelled', next_attempt_at = NULL, updated_at = now()
  FROM doomed
 WHERE r.id = doomed.id;

-- name: producer_expire_pending
-- Unsent recipients of campaigns past expires_at become 'expired': the API would refuse
-- them (7005) and a late message is worse than none. Bounded like producer_cancel_pending.
-- $1 maximum rows
WITH doomed AS (
    SELECT r.id
      FROM campaign.campaigns c
      JOIN campaign.recipients r ON r.campaign_id = c.id AND r.status = 'pending'
     WHERE c.status IN ('ready', 'running', 'paused')
       AND c.expires_at <= now()
     LIMIT $1
       FOR UPDATE OF r SKIP LOCKED
)
UPDATE campaign.recipients r
   SET status = 'expired', error_code = 'expired', error_message = 'campaign expired before sending',
       next_attempt_at = NULL, updated_at = now()
  FROM doomed
 WHERE r.id = doomed.id;

-- name: producer_unknown_service_campaigns
-- Runnable campaigns with pending recipients on a service this worker has no settings
-- for. They are not touched (another worker may send for that service); the producer
-- logs each once so a typo in `service` does not leave a campaign waiting in silence.
-- $1 services this worker sends for (text[])
SELECT c.id, c.service
  FROM campaign.campaigns c
 WHERE c.status IN ('ready', 'running')
   AND NOT c.service = ANY($1::text[])
   -- The same index-only probe as producer_next_campaign: one pending row is enough.
   AND (SELECT r.id
          FROM campaign.recipients r
         WHERE r.campaign_id >= c.id AND r.campaign_id <= c.id AND r.status = 'pending'
         ORDER BY r.campaign_id, r.id
         LIMIT 1) IS NOT NULL
 ORDER BY c.id
 LIMIT 100;

-- name: producer_renew_leases
-- Keep the leases of batches this worker claimed and has not posted yet (waiting in its
-- queue or for the rate limiter), so a long wait never lets recovery take them back.
-- Posted batches are not touched: sender_mark_posting gave them a lease for the request.
-- $1 batch ids (bigint[]), $2 worker id, $3 lease seconds
UPDATE campaign.batches
   SET lease_until = now() + make_interval(secs => $3)
 WHERE id = ANY($1::bigint[]) AND worker_id = $2 AND status = 'claimed'
RETURNING id;
