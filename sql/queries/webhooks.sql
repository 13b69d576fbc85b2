-- The webhook receiver: delivery reports in groups, incoming messages and opt-outs,
-- bodies that could not be parsed.

-- name: webhook_insert_reports
-- Store one group of delivery reports from many requests in one statement (one commit).
-- A report seen before (same transid, correlation id, code and timestamp, a missing one
-- equal to a missing one) is skipped by the dedup index, so a platform retry or a client
-- resending after a 503 stores nothing twice; two recipients' reports never collide, even
-- without a transid or a timestamp. The caller sorts by that key so two receivers
-- inserting overlapping groups lock index entries in the same order and cannot deadlock.
-- $1 one jsonb object of arrays of equal length: transid, correlation_id, code,
-- delivery_status, description, destination, reported_at (ISO 8601 with offset),
-- callback_data, message_count, carrier, raw (each report's object as received). One
-- document costs the receiver far less than eleven bound arrays.
INSERT INTO campaign.delivery_reports
       (transid, correlation_id, code, delivery_status, description, destination,
        reported_at, callback_data, message_count, carrier, raw)
SELECT t.transid, t.correlation_id, t.code, t.delivery_status, t.description, t.destination,
       t.reported_at::timestamptz, t.callback_data, t.message_count::integer, t.carrier, t.raw
  FROM ROWS FROM (
           jsonb_array_elements_text($1::jsonb -> 'transid'),
           jsonb_array_elements_text($1::jsonb -> 'correlation_id'),
           jsonb_array_elements_text($1::jsonb -> 'code'),
           jsonb_array_elements_text($1::jsonb -> 'delivery_status'),
           jsonb_array_elements_text($1::jsonb -> 'description'),
           jsonb_array_elements_text($1::jsonb -> 'destination'),
           jsonb_array_elements_text($1::jsonb -> 'reported_at'),
           jsonb_array_elements_text($1::jsonb -> 'callback_data'),
           jsonb_array_elements_text($1::jsonb -> 'message_count'),
           jsonb_array_elements_text($1::jsonb -> 'carrier'),
           jsonb_array_elements($1::jsonb -> 'raw'))
       AS t(transid, correlation_id, code, delivery_status, description, destination,
            reported_at, callback_data, message_count, carrier, raw)
    ON CONFLICT (transid, correlation_id, code, reported_at) DO NOTHING;

-- name: webhook_store_incoming
-- Store one incoming message, linked to the recipient it answers, and apply its opt-out,
-- in the same statement. A message seen before (same tid) stores nothing and changes no
-- suppression: the first copy did. The recipient it answers is the most recent one sent
-- to the same number within $11 hours (recipients_msisdn_sent_idx: one index probe); its
-- campaign is the one a STOP opts out of (`campaign status` counts them). A STOP's
-- suppression never expires: it replaces one learnt from a delivery report (dr:<code>,
-- expiring); START removes only suppressions that a STOP created, never one an operator
-- added or a report taught.
-- $1 tid $2 oa $3 da $4 message $5 user_id $6 channel $7 sent_at $8 action
-- ('opt_out' / 'opt_in' / NULL) $9 raw (jsonb) $10 normalised oa (E.164 with '+'), or NULL
-- $11 reply window in hours
WITH answers AS (
    SELECT r.id, r.campaign_id
      FROM campaign.recipients r
     WHERE r.msisdn_e164 = $10::text
       AND r.sent_at > now() - make_interval(secs => $11::float8 * 3600)
     ORDER BY r.sent_at DESC, r.id DESC
     LIMIT 1
), mo AS (
    INSERT INTO campaign.incoming_messages
           (tid, oa, da, message, user_id, channel, sent_at, action, raw, recipient_id,
            campaign_id)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, (SELECT id FROM answers),
            (SELECT campaign_id FROM answers))
        ON CONFLICT (tid) WHERE tid IS NOT NULL DO NOTHING
    RETURNING id, action, recipient_id, campaign_id
), added AS (
    INSERT INTO campaign.suppressions (msisdn, reason)
    SELECT $10, 'opt_out' FROM mo WHERE mo.action = 'opt_out' AND $10::text IS NOT NULL
        ON CONFLICT (msisdn) DO UPDATE
       SET reason = 'opt_out', expires_at = NULL, created_at = now()
     WHERE campaign.suppressions.reason LIKE 'dr:%'
    RETURNING msisdn
), removed AS (
    DELETE FROM campaign.suppressions s
     USING mo
     WHERE mo.action = 'opt_in' AND s.msisdn = $10 AND s.reason = 'opt_out'
    RETURNING s.msisdn
)
SELECT mo.id, mo.recipient_id, mo.campaign_id,
       (SELECT count(*) FROM added)   AS suppressions_added,
       (SELECT count(*) FROM removed) AS suppressions_removed
  FROM mo;

-- name: webhook_insert_reject
-- Keep a body that could not be parsed, verbatim, for an operator to look at.
-- $1 kind ('dr' / 'mo') $2 reason $3 content type $4 remote address $5 body (bytes)
INSERT INTO campaign.webhook_rejects (kind, reason, content_type, remote, body)
VALUES ($1, $2, $3, $4, $5)
RETURNING id;
