-- The reconciler: delivery reports -> recipients, orphaned reports, the report timeout,
-- campaign completion. Every statement is set-based and takes rows with SKIP LOCKED, so
-- two reconcilers (the worker's and a standalone `campaign webhooks`) share the work.
--
-- Statuses a report can still change: pending, queued, unknown (in doubt) and the final
-- ones. `sending` rows belong to the sender until it records the submit response; a
-- report for one waits in state 'new' and is matched on a later pass.

-- name: reconcile_match_reports
-- Match up to $2 'new' reports after id $1 (a keyset cursor, so reports that must wait
-- never starve newer ones) to recipients and apply, per recipient, the report that wins.
-- Precedence: a final report replaces no report, an interim one, or an earlier final one;
-- an interim report only updates a recipient that is not final yet; duplicates change
-- nothing. "Earlier" is by the platform's own timestamp (reported_at), never our clock: a
-- report without one comes before every report with one, and among reports without one
-- the later arrival (the higher id) wins. A report of a superseded attempt (its transid
-- is not the recipient's) is linked to the recipient and changes nothing.
-- Learning ([policy], docs/webhooks.md#learning-from-delivery-reports): a failure whose
-- code is in $7 sends a recipient that is not final yet once more (back to pending after
-- $8 seconds, a new transid to come; the given-up transid is kept in retried_transid so a
-- late report for it changes nothing) if its campaign is not finished, will not have
-- expired by then, and its service's max_attempts allows; the second failure is final.
-- A failure whose code is in $11 suppresses the number for $12 days (0: for ever), never
-- replacing an operator's or a STOP's suppression.
-- $1 last id examined (0 to start) $2 limit $3 codes[] $4 statuses[] $5 meanings[] (the
-- code table, 'queued' = interim) $6 status for any other code $7 retry codes[]
-- $8 retry_after_s $9 services[] $10 their max_attempts[] ('*': any other service)
-- $11 suppress codes[] $12 suppress_days
WITH codes AS (
    SELECT * FROM unnest($3::text[], $4::text[], $5::text[]) AS t(code, status, meaning)
),
picked AS (
    SELECT d.id, d.transid, d.correlation_id, d.code, d.delivery_status, d.description,
           d.reported_at
      FROM campaign.delivery_reports d
     WHERE d.state = 'new' AND d.id > $1
     ORDER BY d.id
     LIMIT $2
       FOR UPDATE SKIP LOCKED
),
rated AS (
    SELECT p.*, coalesce(c.status, $6::text) AS status,
           CASE WHEN p.code IS NOT NULL THEN coalesce(c.meaning, 'undocumented code') END
               AS meaning
      FROM picked p
      LEFT JOIN codes c ON c.code = p.code
),
-- By transid first (the one whose correlation id also matches, should a transid ever be
-- shared), else by correlation id: that also finds recipients whose submit response never
-- arrived (`unknown`), which a report proves were accepted. Correlation ids (r<id>) repeat
-- after a restore and across environments sharing a report URL, so that fallback only
-- finds a recipient some request may have carried: in doubt, or posted at least once
-- (attempts counts every request that reached 'posting'). A never-posted recipient is
-- never settled by someone else's report; the report waits and is orphaned in the end.
matched AS (
    SELECT r.*, coalesce(by_transid.id, by_correlation.id) AS recipient_id
      FROM rated r
      LEFT JOIN LATERAL (
          SELECT x.id
            FROM campaign.recipients x
           WHERE x.transid = r.transid
           ORDER BY x.correlation_id = r.correlation_id DESC NULLS LAST, x.id
           LIMIT 1
      ) by_transid ON true
      -- LIMIT keeps this a per-report index probe; the IS NULL test skips it when the
      -- transid matched.
      LEFT JOIN LATERAL (
          SELECT x.id
            FROM campaign.recipients x
           WHERE x.correlation_id = r.correlation_id AND by_transid.id IS NULL
             AND (x.status = 'unknown' OR x.attempts > 0)
           LIMIT 1
      ) by_correlation ON true
),
-- Lock the recipients (in id order: no deadlock between two reconcilers) and read their
-- status and transid as of the lock, not as of the statement's snapshot.
locked AS (
    SELECT x.id, x.status, x.transid, x.retried_transid, x.report_retries, x.attempts,
           x.campaign_id
      FROM campaign.recipients x
     -- = ANY(ARRAY(...)) rather than IN: primary-key probes, not a hash join over a scan
     -- of every recipient (what the planner picks for IN on a table of any size).
     WHERE x.id = ANY(ARRAY(SELECT m.recipient_id FROM matched m))
     ORDER BY x.id
       FOR UPDATE
),
usable AS (
    SELECT m.*,
           -- Found by correlation id, for a recipient whose current request has another
           -- transid: the report of an attempt that was superseded (in doubt, then sent
           -- again). It says nothing about the current message.
           (m.transid IS NOT NULL AND l.transid IS NOT NULL AND l.transid <> m.transid)
           -- Or the report of an attempt given up for a retry (its transid cleared).
           OR coalesce(m.transid = l.retried_transid, false)
               AS superseded,
           -- A transient failure of a recipient not final yet, not retried before.
           coalesce(m.status = 'failed' AND m.code = ANY($7::text[]) AND l.report_retries = 0
            AND l.status IN ('queued', 'unknown')
            AND EXISTS (
                SELECT 1
                  FROM campaign.campaigns c
                 WHERE c.id = l.campaign_id
                   AND c.status IN ('running', 'ready', 'paused')
                   AND (c.expires_at IS NULL
                        OR c.expires_at > now() + make_interval(secs => $8::float8))
                   AND l.attempts < coalesce(
                       (SELECT s.max_attempts FROM unnest($9::text[], $10::int[])
                                                   AS s(service, max_attempts)
                         WHERE s.service = c.service),
                       (SELECT s.max_attempts FROM unnest($9::text[], $10::int[])
                                                   AS s(service, max_attempts)
                         WHERE s.service = '*'))), false)
               AS retry
      FROM matched m
      JOIN locked l ON l.id = m.recipient_id
     WHERE l.status <> 'sending'
),
-- One report per recipient from this pass: a final one before an interim one, then one
-- with a timestamp before one without, then the latest, then the last received.
best AS (
    SELECT DISTINCT ON (u.recipient_id) u.*
      FROM usable u
     WHERE NOT u.superseded
     ORDER BY u.recipient_id, (u.status <> 'queued') DESC, u.reported_at DESC NULLS LAST,
              u.id DESC
),
applied AS (
    UPDATE campaign.recipients r
       SET status         = CASE WHEN b.retry THEN 'pending' ELSE b.status END,
           -- A retry forgets the given-up attempt (its transid, sent_at and report), so
           -- the next attempt's report applies as a first one; the report stays stored.
           transid        = CASE WHEN NOT b.retry THEN coalesce(r.transid, b.transid) END,
           retried_transid = CASE WHEN b.retry THEN coalesce(r.transid, b.transid)
                                  ELSE r.retried_transid END,
           report_retries = r.report_retries + b.retry::int,
           next_attempt_at = CASE WHEN b.retry
                                  THEN now() + make_interval(secs => $8::float8)
                                  ELSE r.next_attempt_at END,
           sent_at        = CASE WHEN NOT b.retry THEN coalesce(r.sent_at, now()) END,
           dr_code        = CASE WHEN NOT b.retry THEN b.code END,
           dr_meaning     = CASE WHEN NOT b.retry THEN b.meaning END,
           dr_status      = CASE WHEN NOT b.retry THEN b.delivery_status END,
           dr_description = CASE WHEN NOT b.retry THEN b.description END,
           dr_at          = CASE WHEN NOT b.retry THEN b.reported_at END,
           dr_report_id   = CASE WHEN NOT b.retry THEN b.id END,
           -- A final report is the truth about the message: a guess such as
           -- report_timeout, or an in-doubt failure, no longer applies. A retry records
           -- the failure it retries.
           error_code     = CASE WHEN b.retry THEN b.code
                                 WHEN b.status = 'queued' THEN r.error_code END,
           error_message  = CASE WHEN b.retry THEN 'report ' || b.code || ' (' ||
                                      coalesce(b.description, '') || '): sent once more'
                                 WHEN b.status = 'queued' THEN r.error_message END,
           updated_at     = now()
      -- `best` as a set the planner takes for 100 rows, whatever the statistics say:
      -- each recipient is one primary-key probe. Joined to `best` directly, the plan
      -- followed the estimates: too many, and it hash-joined a scan of every recipient;
      -- too few (statistics taken before a backlog of waiting reports), and each of 5,000
      -- probes walked a 5,000-id array (= ANY): 32 s for one pass, the reconciler's
      -- "stall" under load. The round trip through jsonb costs milliseconds.
      FROM jsonb_to_recordset((SELECT jsonb_agg(x) FROM best x))
           AS b(id bigint, recipient_id bigint, retry boolean, status text, transid text,
                code text, meaning text, delivery_status text, description text,
                reported_at timestamptz)
     WHERE r.id = b.recipient_id
       AND CASE
           WHEN b.status <> 'queued' THEN
                r.dr_code IS NULL
                OR EXISTS (SELECT 1 FROM codes c WHERE c.code = r.dr_code AND c.status = 'queued')
                OR b.reported_at > r.dr_at
                OR (r.dr_at IS NULL AND (b.reported_at IS NOT NULL
                                         OR b.id > coalesce(r.dr_report_id, 0)))
           ELSE
                r.status IN ('pending', 'queued', 'unknown')
                AND (r.dr_code IS NULL
                     OR b.reported_at > r.dr_at
                     OR (r.dr_at IS NULL AND (b.reported_at IS NOT NULL
                                              OR b.id > coalesce(r.dr_report_id, 0))))
           END
    -- The new status and, for a final report, its delay (accepted -> the report's own
    -- timestamp), for the process's metrics.
    RETURNING r.id, r.status, r.dr_code, r.msisdn_e164,
              extract(epoch FROM r.dr_at - r.sent_at)::float8 AS delay_s
),
-- Numbers that do not exist (the failure codes in $11) are not sent to again
-- for $12 days. One row per number; only a report-learnt suppression is replaced.
learnt AS (
    INSERT INTO campaign.suppressions (msisdn, reason, expires_at)
    SELECT DISTINCT ON (a.msisdn_e164) a.msisdn_e164, 'dr:' || a.dr_code,
           CASE WHEN $12::int > 0 THEN now() + make_interval(days => $12::int) END
      FROM applied a
     WHERE a.status = 'failed' AND a.dr_code = ANY($11::text[])
       AND a.msisdn_e164 ~ '^\+[1-9][0-9]{6,14}$'
     ORDER BY a.msisdn_e164
        ON CONFLICT (msisdn) DO UPDATE
       SET reason = excluded.reason, expires_at = excluded.expires_at, created_at = now()
     WHERE campaign.suppressions.reason LIKE 'dr:%'
    RETURNING msisdn
),
marked AS (
    UPDATE campaign.delivery_reports d
       SET state = 'matched', recipient_id = u.recipient_id, matched_at = now()
      -- As above: one primary-key probe per report, whatever the estimates (unnest of
      -- arrays not known at plan time is taken for 10 rows).
      FROM unnest(ARRAY(SELECT id FROM usable ORDER BY id),
                  ARRAY(SELECT recipient_id FROM usable ORDER BY id)) AS u(id, recipient_id)
     WHERE d.id = u.id
    RETURNING d.id
)
SELECT (SELECT count(*) FROM picked)  AS examined,
       (SELECT max(id) FROM picked)   AS last_id,
       (SELECT count(*) FROM marked)  AS matched,
       (SELECT count(*) FROM applied) AS updated,
       (SELECT coalesce(jsonb_object_agg(f.status, f.n), '{}'::jsonb)
          FROM (SELECT status, count(*) AS n FROM applied
                 WHERE status NOT IN ('queued', 'pending') GROUP BY status) f) AS finals,
       (SELECT coalesce(array_agg(greatest(delay_s, 0)), '{}'::float8[])
          FROM applied WHERE status NOT IN ('queued', 'pending') AND delay_s IS NOT NULL)
           AS delays_s,
       (SELECT count(*) FROM applied WHERE status = 'pending') AS retried,
       (SELECT count(*) FROM learnt)  AS suppressed;

-- name: reconcile_orphan_reports
-- Give up on up to $2 reports that found no recipient within $1 seconds of arriving; each
-- is returned once, to be logged once. An operator can set state back to 'new' to retry.
-- $1 orphan_after_s $2 limit
UPDATE campaign.delivery_reports d
   SET state = 'orphaned'
 WHERE d.id IN (
       SELECT o.id
         FROM campaign.delivery_reports o
        WHERE o.state = 'new' AND o.received_at < now() - make_interval(secs => $1)
        ORDER BY o.id
        LIMIT $2
          FOR UPDATE SKIP LOCKED)
RETURNING d.id, d.transid, d.correlation_id, d.code;

-- name: reconcile_report_timeout
-- Up to $2 recipients accepted more than $1 seconds ago and still without a final report
-- become failed with error_code 'report_timeout'. A final report arriving later still
-- wins (see reconcile_match_reports). Returns counts per campaign.
-- $1 report_timeout_s $2 limit
WITH timed_out AS (
    UPDATE campaign.recipients r
       SET status = 'failed',
           error_code = 'report_timeout',
           error_message = 'no final delivery report within report_timeout_s',
           updated_at = now()
     WHERE r.id IN (
           SELECT q.id
             FROM campaign.recipients q
            WHERE q.status = 'queued'
              AND (q.sent_at < now() - make_interval(secs => $1)
                   OR (q.sent_at IS NULL AND q.created_at < now() - make_interval(secs => $1)))
            LIMIT $2
              FOR UPDATE SKIP LOCKED)
    RETURNING r.campaign_id
)
SELECT campaign_id, count(*) AS recipients
  FROM timed_out
 GROUP BY campaign_id
 ORDER BY campaign_id;

-- name: reconcile_lock_finished_campaigns
-- First half of completion, in the caller's transaction: lock the running campaigns that
-- look finished (no recipient pending, sending, queued or unknown). This statement's
-- snapshot may predate an insert that committed before the lock was taken, so nothing is
-- decided here: reconcile_complete_campaigns looks again. SKIP LOCKED passes by a
-- campaign an uncommitted insert holds (campaign.reopen_completed locks it FOR KEY SHARE)
-- and one another reconciler is completing. A campaign is only ever `running` once the
-- producer claimed from it, so an empty new campaign is not completed.
SELECT c.id
  FROM campaign.campaigns c
 WHERE c.status = 'running'
   AND NOT EXISTS (
       SELECT 1
         FROM campaign.recipients r
        WHERE r.campaign_id = c.id
          AND r.status IN ('pending', 'sending', 'queued', 'unknown'))
 ORDER BY c.id
   FOR UPDATE SKIP LOCKED;

-- name: reconcile_complete_campaigns
-- Second half, same transaction, after the lock: of the campaigns $1 locked above, those
-- still running with nothing open in this statement's fresh snapshot become completed.
-- Every insert into one of them either committed before this snapshot (seen here: not
-- completed) or waits for this transaction's lock and then reopens the campaign (see
-- campaign.reopen_completed in sql/migrations/0003_report_identity.sql), so a recipient
-- is never stranded in a completed campaign. Returns each completed campaign's counts per
-- status for the campaign_completed log line.
-- $1 campaign ids (bigint[]) from reconcile_lock_finished_campaigns
WITH completed AS (
    UPDATE campaign.campaigns c
       SET status = 'completed', completed_at = now()
     WHERE c.id = ANY($1::bigint[])
       AND c.status = 'running'
       AND NOT EXISTS (
           SELECT 1
             FROM campaign.recipients r
            WHERE r.campaign_id = c.id
              AND r.status IN ('pending', 'sending', 'queued', 'unknown'))
    RETURNING c.id
)
SELECT completed.id AS campaign_id,
       coalesce((SELECT jsonb_object_agg(s.status, s.n)
                   FROM (SELECT r.status, count(*) AS n
                           FROM campaign.recipients r
                          WHERE r.campaign_id = completed.id
                          GROUP BY r.status) s), '{}'::jsonb) AS counts
  FROM completed
 ORDER BY completed.id;

-- name: reconcile_activity
-- What this database's other busy sessions are doing, for the log line of a reconciler
-- step that timed out: their state, what they wait on, for how long, and the locks they
-- are waiting for.
SELECT a.pid, a.application_name, a.state, a.wait_event_type, a.wait_event,
       round(extract(epoch FROM now() - a.query_start)::numeric, 1)::float8 AS running_s,
       left(a.query, 120) AS query,
       (SELECT string_agg(l.locktype || ':' || l.mode, ',')
          FROM pg_locks l WHERE l.pid = a.pid AND NOT l.granted) AS waiting_for_locks
  FROM pg_stat_activity a
 WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() AND a.state <> 'idle'
 ORDER BY a.query_start
 LIMIT 20;

