-- Read-only queries behind `campaign check` (it also runs the producer's reads of
-- suppressions, campaign_numbers and cap counts, through producer.read_guards).

-- name: check_campaign
-- The campaign as the producer reads it (producer_next_campaign), in any status.
-- $1 campaign id
SELECT c.id, c.name, c.status, c.service, c.sender_id, c.body, c.template_id, c.smartlinks,
       c.priority, c.expires_at, c.callback_data, c.allow_duplicates, c.bypass_caps,
       c.window_start, c.window_end
  FROM campaign.campaigns c
 WHERE c.id = $1;

-- name: check_pending
-- The campaign's pending recipients due now in id order, a page after $2. The range on
-- campaign_id and ORDER BY (campaign_id, id) keep this on recipients_pending_idx, as
-- producer_claim_batch does (rows waiting for a time are counted by check_waiting).
-- $1 campaign id, $2 last id of the previous page (0: from the start), $3 page size
SELECT r.id, r.msisdn, r.msisdn_e164, r.variables, r.correlation_id, r.attempts
  FROM campaign.recipients r
 WHERE r.campaign_id >= $1 AND r.campaign_id <= $1
   AND r.id > $2
   AND r.status = 'pending'
   AND r.next_attempt_at IS NULL
 ORDER BY r.campaign_id, r.id
 LIMIT $3;

-- name: check_waiting
-- Pending recipients already waiting for a time (their sending window, a retry's
-- backoff), and the earliest of those times: decided when it comes, not now.
-- $1 campaign id
SELECT count(*) AS waiting, min(next_attempt_at) AS next_at
  FROM campaign.recipients
 WHERE campaign_id = $1 AND status = 'pending' AND next_attempt_at IS NOT NULL;

-- name: check_in_flight
-- Recipients already claimed or sent and not final: decided by a producer before, so
-- counted as they are, not decided again.
-- $1 campaign id
SELECT count(*) FROM campaign.recipients
 WHERE campaign_id = $1 AND status IN ('sending', 'unknown', 'queued');
