-- The producer: picks the campaign to serve, claims a batch of its pending recipients under
-- a lease, records what rendering found, and sweeps pending rows that can no longer be sent.

-- name: producer_next_campaign
-- The campaign the next batch comes from: runnable (ready or running, send_after passed,
-- not expired), on a service this worker sends for and has room for, with at least one
-- recipient due now; highest priority first, then oldest. Campaigns a concurrent claimer
-- just emptied are passed in $2 so one pass does not spin on them.
-- $1 services (text[]), $2 campaign ids to skip (bigint[]), $3 jsonb object: campaign id ->
-- recipient id this worker has claimed up to (see producer_claim_batch), so the probe starts there.
-- A campaign in its canary (canary_size set, not judged yet) returns canary_left, how many
-- more recipients its canary takes (sent or being sent, counted through
-- recipients_campaign_status_idx: at most canary_size rows), and is passed over once that
-- is zero, until producer_judge_canaries has judged it; other campaigns return NULL.
SELECT c.id, c.service, c.sender_id, c.body, c.template_id, c.smartlinks, c.priority,
       c.expires_at, c.callback_data, c.window_start, c.window_end, k.canary_left,
       c.allow_duplicates, c.bypass_caps
  FROM campaign.campaigns c
 CROSS JOIN LATERAL (
       SELECT CASE WHEN c.canary_size IS NOT NULL AND c.canary_judged_at IS NULL
                   THEN c.canary_size - (
                        SELECT count(*)
                          FROM campaign.recipients x
                         WHERE x.campaign_id = c.id
                           AND x.status IN ('sending', 'queued', 'unknown', 'delivered',
                                            'failed', 'rejected'))
              END AS canary_left) k
 WHERE c.status IN ('ready', 'running')
   AND (k.canary_left IS NULL OR k.canary_left > 0)
   AND c.service = ANY($1::text[])
   AND NOT c.id = ANY($2::bigint[])
   AND (c.send_after IS NULL OR c.send_after <= now())
   AND (c.expires_at IS NULL OR c.expires_at > now())
   -- One probe of recipients_pending_idx per candidate, stopping at its first due row.
   -- The index holds only rows due at once (next_attempt_at NULL): rows waiting for their
   -- window or a retry are in recipients_waiting_idx until producer_release_due.
   -- Written as EXISTS, the planner may hash-join a scan of every recipient, or walk the
   -- primary key through rows already sent, because its statistics still call them
   -- pending; a range on campaign_id plus an ORDER BY only that index provides keeps this
   -- an index probe whatever the statistics say.
   AND (SELECT r.id
          FROM campaign.recipients r
         WHERE r.campaign_id >= c.id AND r.campaign_id <= c.id
           AND r.id > coalesce(($3::jsonb ->> c.id::text)::bigint, 0)
           AND r.status = 'pending'
           AND r.next_attempt_at IS NULL
         ORDER BY r.campaign_id, r.id
         LIMIT 1) IS NOT NULL
 ORDER BY c.priority DESC, c.id
 LIMIT 1;

-- name: producer_claim_batch
-- Claim up to $2 due recipients (next_attempt_at NULL) of one campaign, oldest first, for this worker: a batches
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
       AND r.next_attempt_at IS NULL
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

-- name: producer_lock_campaign_numbers
-- Serialise the duplicate decisions of one campaign across workers, to the end of the
-- transaction that stores them: two batches holding one number decide one after the
-- other, the second seeing the first's campaign_numbers rows. Transaction-scoped, so a
-- pooled connection never keeps it. Key: (1401, the campaign id folded into an int);
-- two campaigns sharing a key only wait for each other.
-- $1 campaign id
SELECT pg_advisory_xact_lock(1401, ($1::bigint % 2147483647)::int);

-- name: producer_unregistered_below
-- Rows of the campaign below this batch's highest id that no prepared batch has decided
-- yet: pending rows never claimed (another worker's claim not committed yet) or given
-- back by a worker that died before preparing them, and rows of batches claimed but not
-- prepared yet. The producer decides them too (without storing their status) so that a
-- number's lowest id owns it even when a batch of higher ids is prepared first. Read
-- under producer_lock_campaign_numbers. Two parts so each has its index: the pending
-- rows through recipients_pending_idx (the range on campaign_id as in
-- producer_claim_batch), the claimed ones through batches_unprepared_idx and
-- recipients_batch_idx; one OR of both read every recipient of the campaign.
-- $1 campaign id, $2 this batch's highest recipient id, $3 this batch's id, $4 the lowest
-- id the pending part looks at
-- The pending part is bounded (the lowest 5000, ids from $4): with more undecided rows
-- below a batch than that, or one further below (the producer passes the batch's lowest id
-- less UNDECIDED_SPAN), a number's owner may be a higher row than its lowest (never sent
-- twice). Without the floor the scan walked the index entries of every row the campaign
-- had sent (dead until vacuumed): 390 ms a batch 1.4 M rows into a campaign, under the
-- campaign's lock.
(SELECT r.id, r.msisdn, r.msisdn_e164, r.variables, r.correlation_id, r.attempts
   FROM campaign.recipients r
  WHERE r.campaign_id >= $1 AND r.campaign_id <= $1
    AND r.id < $2 AND r.id >= $4
    AND r.status = 'pending'
    AND r.next_attempt_at IS NULL
    AND NOT EXISTS (SELECT 1
                      FROM campaign.batches b
                     WHERE b.id = r.batch_id AND b.prepared_at IS NOT NULL)
  ORDER BY r.campaign_id, r.id
  LIMIT 5000)
UNION ALL
(SELECT r.id, r.msisdn, r.msisdn_e164, r.variables, r.correlation_id, r.attempts
   FROM campaign.batches b
   JOIN campaign.recipients r ON r.batch_id = b.id
  WHERE b.campaign_id = $1 AND b.prepared_at IS NULL AND b.id <> $3
    AND r.status = 'sending'
    AND r.id < $2)
ORDER BY 1;

-- name: producer_campaign_owners
-- Which recipient of the campaign each of these numbers is sent to, when one is already
-- decided. Read under producer_lock_campaign_numbers.
-- $1 campaign id, $2 E.164 numbers (text[])
SELECT msisdn_e164, recipient_id
  FROM campaign.campaign_numbers
 WHERE campaign_id = $1 AND msisdn_e164 = ANY($2::text[]);

-- name: producer_register_numbers
-- Record the recipient each newly seen number of the campaign is sent to. The primary
-- key (campaign_id, msisdn_e164) is the rule "one row per number"; under the campaign's
-- lock no conflict is expected, and DO NOTHING keeps an earlier owner if one appears.
-- $1 campaign id, $2 numbers (text[]), $3 recipient ids (bigint[]), of equal length
INSERT INTO campaign.campaign_numbers (campaign_id, msisdn_e164, recipient_id)
SELECT $1, u.msisdn_e164, u.recipient_id
  FROM unnest($2::text[], $3::bigint[]) AS u(msisdn_e164, recipient_id)
ON CONFLICT (campaign_id, msisdn_e164) DO NOTHING;

-- name: producer_lock_numbers
-- The frequency cap is counted and reserved under one row lock per number: its
-- cap_numbers row, inserted or updated here (an insert racing another for a new number
-- waits for it). Rows are taken in one global order (sorted), so two workers never
-- deadlock; the locks last to the end of the transaction that reserves, so a count and
-- the reservation after it are exact whoever else sends to the number.
-- $1 E.164 numbers (text[])
INSERT INTO campaign.cap_numbers (msisdn_e164)
SELECT DISTINCT n FROM unnest($1::text[]) AS n ORDER BY n
ON CONFLICT (msisdn_e164) DO UPDATE SET touched_at = now();

-- name: producer_cap_counts
-- Messages counted against each number in the cap window: reservations of every
-- campaign (see producer_reserve_caps). Read under producer_lock_numbers.
-- $1 E.164 numbers (text[]), $2 window hours
SELECT msisdn_e164, count(*) AS n
  FROM campaign.cap_reservations
 WHERE msisdn_e164 = ANY($1::text[])
   AND reserved_at > now() - make_interval(secs => $2::float8 * 3600)
 GROUP BY msisdn_e164;

-- name: producer_cap_held
-- Which of these recipients hold a reservation already (a retry, or a batch given back
-- unsent): counted once, not stopped by their own reservation.
-- $1 recipient ids (bigint[])
SELECT recipient_id FROM campaign.cap_reservations WHERE recipient_id = ANY($1::bigint[]);

-- name: producer_reserve_caps
-- Take a place under the cap for each recipient about to be sent; the sender gives it
-- back when the API does not accept the message (sender_write_results).
-- $1 recipient ids (bigint[]), $2 numbers (text[]), of equal length
INSERT INTO campaign.cap_reservations (recipient_id, msisdn_e164)
SELECT u.recipient_id, u.msisdn_e164
  FROM unnest($1::bigint[], $2::text[]) AS u(recipient_id, msisdn_e164)
ON CONFLICT (recipient_id) DO NOTHING;

-- name: producer_mark_prepared
-- The batch's rows are decided (duplicates registered, caps reserved): from now on
-- producer_unregistered_below leaves them out.
-- $1 batch id
UPDATE campaign.batches SET prepared_at = now() WHERE id = $1;

-- name: producer_prune_reservations
-- Reservations older than the cap window count for nothing, nor does a cap_numbers row
-- untouched as long (every reservation touches its number): delete both, bounded.
-- $1 window hours, $2 maximum rows of each
WITH numbers AS (
    DELETE FROM campaign.cap_numbers
     WHERE msisdn_e164 IN (
            SELECT msisdn_e164
              FROM campaign.cap_numbers
             WHERE touched_at <= now() - make_interval(secs => $1::float8 * 3600)
             LIMIT $2
               FOR UPDATE SKIP LOCKED)
)
DELETE FROM campaign.cap_reservations
 WHERE recipient_id IN (
        SELECT recipient_id
          FROM campaign.cap_reservations
         WHERE reserved_at <= now() - make_interval(secs => $1::float8 * 3600)
         LIMIT $2);

-- name: producer_prepare_recipients
-- The claimed rows that leave the batch unsent, in one statement (one round trip a batch):
-- the ones that must not be sent (invalid / suppressed / duplicate / capped) get their
-- final status and reason; the ones outside their sending window go back to 'pending'
-- with next_attempt_at at the window's next opening (attempts unchanged, so waiting is
-- not a try), or become 'expired' when it opens only after the campaign's expires_at.
-- Rows still to send are not touched here: their number, encoding and parts are written
-- with their results (sender_write_results), so a sent row is written twice, not three
-- times. The batch keeps the count still to send and is closed at once when that is zero
-- (nothing will be posted). Only called when there is at least one such row.
-- $1 batch id; arrays of equal length: $2 ids, $3 statuses, $4 msisdn_e164 (NULL when
-- the number is invalid), $5 next_attempt_at (NULL for rows that become final), $6 error
-- codes, $7 error messages
WITH updated AS (
    UPDATE campaign.recipients r
       SET status = u.status,
           msisdn_e164 = u.msisdn_e164,
           next_attempt_at = u.next_attempt_at,
           error_code = u.error_code,
           error_message = u.error_message,
           updated_at = now()
      FROM unnest($2::bigint[], $3::text[], $4::text[], $5::timestamptz[], $6::text[],
                  $7::text[])
           AS u(id, status, msisdn_e164, next_attempt_at, error_code, error_message)
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
           AND r.next_attempt_at IS NULL
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

-- name: producer_release_due
-- Rows whose wait is over (a retry's backoff, a sending window that opened) become due:
-- next_attempt_at NULL moves them from recipients_waiting_idx into recipients_pending_idx,
-- where claims find them. One range of the waiting index, so rows still waiting cost
-- nothing however many there are. Bounded like the sweeps; call again while it returns $1.
-- $1 maximum rows
WITH due AS (
    SELECT r.id
      FROM campaign.recipients r
     WHERE r.status = 'pending'
       AND r.next_attempt_at IS NOT NULL
       AND r.next_attempt_at <= now()
     ORDER BY r.next_attempt_at
     LIMIT $1
       FOR UPDATE OF r SKIP LOCKED
)
UPDATE campaign.recipients r
   SET next_attempt_at = NULL, updated_at = now()
  FROM due
 WHERE r.id = due.id AND r.status = 'pending';

-- name: producer_judge_canaries
-- Campaigns whose canary is out (canary_size recipients sent or being sent) and done:
-- every one of them has a final status, or the last was accepted $1 seconds ago. Failed
-- (failed or rejected) / (delivered + failed) above max_failure_ratio pauses the campaign
-- with the ratio and the commonest codes as its reason; otherwise sending goes on.
-- Either way the canary is judged once (canary_judged_at), so a resumed campaign is not
-- held again. Returns the campaigns judged, paused or not, for the log.
-- $1 canary_wait_s
WITH canary AS (
    SELECT c.id, c.max_failure_ratio, s.delivered, s.failed, s.codes
      FROM campaign.campaigns c
     CROSS JOIN LATERAL (
           SELECT count(*) AS taken,
                  count(*) FILTER (WHERE x.status IN ('sending', 'queued', 'unknown')) AS open,
                  count(*) FILTER (WHERE x.status = 'delivered') AS delivered,
                  count(*) FILTER (WHERE x.status IN ('failed', 'rejected')) AS failed,
                  max(x.sent_at) AS last_sent,
                  (SELECT string_agg(t.code || ' x' || t.n, ', ' ORDER BY t.n DESC, t.code)
                     FROM (SELECT coalesce(y.dr_code, y.error_code, '?') AS code, count(*) AS n
                             FROM campaign.recipients y
                            WHERE y.campaign_id = c.id AND y.status IN ('failed', 'rejected')
                            GROUP BY 1
                            ORDER BY n DESC, code
                            LIMIT 3) t) AS codes
             FROM campaign.recipients x
            WHERE x.campaign_id = c.id
              AND x.status IN ('sending', 'queued', 'unknown', 'delivered', 'failed',
                               'rejected')) s
     WHERE c.status IN ('ready', 'running')
       AND c.canary_size IS NOT NULL
       AND c.canary_judged_at IS NULL
       AND s.taken >= c.canary_size
       AND (s.open = 0 OR s.last_sent < now() - make_interval(secs => $1))
       FOR UPDATE OF c SKIP LOCKED
), verdict AS (
    SELECT canary.*,
           canary.max_failure_ratio IS NOT NULL AND canary.failed > 0
               AND canary.failed > canary.max_failure_ratio * (canary.delivered + canary.failed)
               AS paused
      FROM canary
)
UPDATE campaign.campaigns c
   SET canary_judged_at = now(),
       status = CASE WHEN v.paused THEN 'paused' ELSE c.status END,
       paused_reason = CASE WHEN v.paused THEN
           'canary: ' || v.failed || ' of ' || (v.delivered + v.failed) || ' reports failed ('
           || round(100.0 * v.failed / (v.delivered + v.failed), 1) || '% > '
           || round(100.0 * v.max_failure_ratio::numeric, 1) || '%); top codes: ' || v.codes
           ELSE c.paused_reason END,
       updated_at = now()
  FROM verdict v
 WHERE c.id = v.id
RETURNING c.id, v.paused, v.delivered, v.failed, c.paused_reason;

-- name: producer_brake_campaigns
-- The rolling brake: a running campaign with max_failure_ratio whose latest $1 final
-- outcomes (delivered, failed, rejected; since the last resume, brake_since) are all in
-- and hold more failures than the ratio allows is paused with the ratio and the
-- commonest codes as its reason. Reads $1 entries of recipients_final_idx per campaign.
-- Requests in flight finish; batches not yet posted are given back (sender_mark_posting).
-- $1 failure_window
WITH latest AS (
    SELECT c.id, c.max_failure_ratio, w.n, w.failed, w.codes
      FROM campaign.campaigns c
     CROSS JOIN LATERAL (
           WITH last AS (
               SELECT x.status, coalesce(x.dr_code, x.error_code, '?') AS code
                 FROM campaign.recipients x
                WHERE x.campaign_id = c.id
                  AND x.status IN ('delivered', 'failed', 'rejected')
                  AND x.updated_at >= coalesce(c.brake_since, '-infinity')
                ORDER BY x.updated_at DESC
                LIMIT $1
           )
           SELECT count(*) AS n,
                  count(*) FILTER (WHERE last.status <> 'delivered') AS failed,
                  (SELECT string_agg(t.code || ' x' || t.n, ', ' ORDER BY t.n DESC, t.code)
                     FROM (SELECT l.code, count(*) AS n
                             FROM last l
                            WHERE l.status <> 'delivered'
                            GROUP BY 1
                            ORDER BY n DESC, l.code
                            LIMIT 3) t) AS codes
             FROM last) w
     WHERE c.status IN ('ready', 'running')
       AND c.max_failure_ratio IS NOT NULL
       AND w.n >= $1
       AND w.failed > c.max_failure_ratio * w.n
       FOR UPDATE OF c SKIP LOCKED
)
UPDATE campaign.campaigns c
   SET status = 'paused',
       paused_reason = 'brake: ' || l.failed || ' of the last ' || l.n || ' reports failed ('
           || round(100.0 * l.failed / l.n, 1) || '% > '
           || round(100.0 * l.max_failure_ratio::numeric, 1) || '%); top codes: ' || l.codes,
       updated_at = now()
  FROM latest l
 WHERE c.id = l.id AND c.status IN ('ready', 'running')
RETURNING c.id, l.n, l.failed, c.paused_reason;
