-- The event outbox (campaign.events, written by triggers: sql/migrations/0004_events.sql)
-- and the forwarder that POSTs it to the application's URL (campaign/forwarder.py).

-- name: forwarder_write_event_settings
-- Which events the triggers write, from [events] enabled / kinds; every worker writes it
-- at start, so the last one started wins (a fleet runs one config).
-- $1 enabled $2 kinds (text[]) $3 worker id
INSERT INTO campaign.event_settings (singleton, enabled, kinds, written_by, updated_at)
VALUES (true, $1, $2::text[], $3, now())
    ON CONFLICT (singleton) DO UPDATE
   SET enabled = excluded.enabled, kinds = excluded.kinds,
       written_by = excluded.written_by, updated_at = excluded.updated_at;

-- name: forwarder_take_lease
-- Hold the forwarder's lease for $2 seconds more: taken when free, expired, or already
-- ours. No row back: another worker forwards. Returns the stored position.
-- $1 worker id $2 lease seconds
UPDATE campaign.event_forwarder f
   SET holder = $1, lease_until = now() + make_interval(secs => $2)
 WHERE f.holder IS NULL OR f.holder = $1 OR f.lease_until < now()
RETURNING f.position;

-- name: forwarder_release_lease
-- A clean stop hands the lease over at once instead of after it runs out.
-- $1 worker id
UPDATE campaign.event_forwarder SET holder = NULL, lease_until = NULL WHERE holder = $1;

-- name: forwarder_last_id
-- The highest event id handed out so far (committed or not). Step one of the horizon:
-- read it BEFORE forwarder_snapshot_xmax, in a statement of its own.
SELECT CASE WHEN s.is_called THEN s.last_value ELSE 0 END AS last_id
  FROM campaign.events_id_seq s;

-- name: forwarder_snapshot_xmax
-- Step two: every transaction that took an id up to forwarder_last_id's had its
-- transaction id before this statement's snapshot (a trigger writes events only after
-- its statement changed rows, which assigns the id), so all of them are below xmax.
SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xmax;

-- name: forwarder_snapshot_xmin
-- Step three, on a later round: once the oldest running transaction is at or past the
-- xmax seen in step two, every transaction that could still commit an id up to that
-- last_id has ended, so ids up to it are settled: none will appear below them any more.
SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin;

-- name: forwarder_fetch
-- The next events after position $1 and up to the settled id $2, at most $3, in id order,
-- as the JSON array to POST (built here: one text value, no per-row decoding).
-- $1 position $2 settled id $3 limit
SELECT coalesce(json_agg(json_build_object(
           'id', e.id, 'kind', e.kind, 'campaign_id', e.campaign_id,
           'recipient_id', e.recipient_id, 'msisdn', e.msisdn, 'status', e.status,
           'code', e.code, 'data', e.data, 'created_at', e.created_at) ORDER BY e.id)::text,
           '[]') AS body,
       count(*) AS events,
       max(e.id) AS last_id
  FROM (SELECT * FROM campaign.events x
         WHERE x.id > $1 AND x.id <= $2
         ORDER BY x.id
         LIMIT $3) e;

-- name: forwarder_advance
-- After a 2xx: store the new position, only while we still hold the lease (a worker that
-- lost it while its POST hung must not move a position someone else now owns).
-- $1 worker id $2 new position
UPDATE campaign.event_forwarder
   SET position = greatest(position, $2), forwarded_at = now()
 WHERE holder = $1
RETURNING position;

-- name: forwarder_backlog
-- Events written and not yet forwarded (for the metric and `campaign status`).
SELECT coalesce((SELECT max(id) FROM campaign.events), 0)
       - (SELECT position FROM campaign.event_forwarder) AS backlog;
