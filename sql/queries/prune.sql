-- `campaign prune` (campaign/prune.py): retention in bounded chunks. Each statement deletes
-- at most $2 rows, oldest first, in its own short transaction, and skips rows another
-- process holds (SKIP LOCKED), so pruning never waits on, or blocks, a worker.

-- name: prune_finished_campaigns
-- Completed or cancelled campaigns that finished more than $1 days ago, nothing of theirs
-- still in flight or in doubt; keyset-paged after id $3.
-- $1 days, $2 limit, $3 last campaign id returned (0 to start)
SELECT c.id
  FROM campaign.campaigns c
 WHERE c.status IN ('completed', 'cancelled')
   AND coalesce(c.completed_at, c.updated_at) < now() - make_interval(days => $1)
   AND c.id > $3
   AND NOT EXISTS (
       SELECT 1
         FROM campaign.recipients r
        WHERE r.campaign_id = c.id AND r.status IN ('sending', 'unknown'))
 ORDER BY c.id
 LIMIT $2;

-- name: prune_campaign_recipients
-- Delete up to $4 final recipients of campaign $1 (one prune_finished_campaigns returned),
-- while it is still completed or cancelled and finished more than $2 days ago: every chunk
-- checks again, because the listing is old news by the time its rows are deleted. The
-- check share-locks the campaign row, so a concurrent reopen (recipients_reopen sets it
-- running) is ordered with the chunk: committed first, the locking read sees the campaign
-- running and nothing is deleted; started later, it waits for this chunk's commit and the
-- next chunk stops. A row claimed meanwhile is no longer final (or is locked): kept.
-- $1 campaign id, $2 days, $3 final statuses (statuses.FINAL), $4 limit
WITH finished AS (
    SELECT c.id
      FROM campaign.campaigns c
     WHERE c.id = $1
       AND c.status IN ('completed', 'cancelled')
       AND coalesce(c.completed_at, c.updated_at) < now() - make_interval(days => $2)
       FOR SHARE
)
DELETE FROM campaign.recipients r
 WHERE r.id IN (
       SELECT x.id
         FROM campaign.recipients x
         JOIN finished f ON f.id = x.campaign_id
        WHERE x.status = ANY($3::text[])
        LIMIT $4
          FOR UPDATE OF x SKIP LOCKED);

-- name: prune_campaign_batches
-- Delete up to $3 finished batches of campaign $1, through batches_campaign_idx, with the
-- same check and lock on the campaign as prune_campaign_recipients (a reopened campaign's
-- new batches are claimed and leased: never deleted).
-- $1 campaign id, $2 days, $3 limit
WITH finished AS (
    SELECT c.id
      FROM campaign.campaigns c
     WHERE c.id = $1
       AND c.status IN ('completed', 'cancelled')
       AND coalesce(c.completed_at, c.updated_at) < now() - make_interval(days => $2)
       FOR SHARE
)
DELETE FROM campaign.batches b
 WHERE b.id IN (
       SELECT x.id
         FROM campaign.batches x
         JOIN finished f ON f.id = x.campaign_id
        WHERE x.status NOT IN ('claimed', 'posting')
        LIMIT $3
          FOR UPDATE OF x SKIP LOCKED);

-- name: prune_campaign
-- Delete campaign $1 once its recipients and batches are gone, if it is still finished
-- more than $2 days ago; the checks make sure the cascade has nothing left to do (a large
-- cascade would be one long transaction). Deleting locks the row: a reopen committed
-- meanwhile is seen (the row is checked again) and keeps the campaign.
-- $1 campaign id, $2 days
DELETE FROM campaign.campaigns c
 WHERE c.id = $1
   AND c.status IN ('completed', 'cancelled')
   AND coalesce(c.completed_at, c.updated_at) < now() - make_interval(days => $2)
   AND NOT EXISTS (SELECT 1 FROM campaign.recipients r WHERE r.campaign_id = c.id)
   AND NOT EXISTS (SELECT 1 FROM campaign.batches b WHERE b.campaign_id = c.id);

-- name: prune_delivery_reports
-- Delete up to $2 reports matched or orphaned more than $1 days ago ('new' ones are work).
-- $1 days, $2 limit
DELETE FROM campaign.delivery_reports d
 WHERE d.id IN (
       SELECT x.id
         FROM campaign.delivery_reports x
        WHERE x.state IN ('matched', 'orphaned')
          AND x.received_at < now() - make_interval(days => $1)
        ORDER BY x.id
        LIMIT $2
          FOR UPDATE SKIP LOCKED);

-- name: prune_batches
-- Delete up to $2 finished batches older than $1 days (open ones hold a lease: kept).
-- $1 days, $2 limit
DELETE FROM campaign.batches b
 WHERE b.id IN (
       SELECT x.id
         FROM campaign.batches x
        WHERE x.status NOT IN ('claimed', 'posting')
          AND coalesce(x.finished_at, x.created_at) < now() - make_interval(days => $1)
        ORDER BY x.id
        LIMIT $2
          FOR UPDATE SKIP LOCKED);

-- name: prune_incoming_messages
-- Delete up to $2 incoming messages older than $1 days (opt-outs live in suppressions).
-- $1 days, $2 limit
DELETE FROM campaign.incoming_messages m
 WHERE m.id IN (
       SELECT x.id
         FROM campaign.incoming_messages x
        WHERE x.received_at < now() - make_interval(days => $1)
        ORDER BY x.id
        LIMIT $2
          FOR UPDATE SKIP LOCKED);

-- name: prune_webhook_rejects
-- Delete up to $2 unparsable webhook bodies older than $1 days.
-- $1 days, $2 limit
DELETE FROM campaign.webhook_rejects w
 WHERE w.id IN (
       SELECT x.id
         FROM campaign.webhook_rejects x
        WHERE x.received_at < now() - make_interval(days => $1)
        ORDER BY x.id
        LIMIT $2
          FOR UPDATE SKIP LOCKED);

-- name: prune_events
-- Delete up to $3 events older than $1 days, oldest first (ids grow with created_at, so
-- the primary key's first pages are the old rows). While a forwarder is configured ($2),
-- an event it has not delivered yet is kept, whatever its age.
-- $1 days, $2 keep events past the forwarder's position (boolean), $3 limit
DELETE FROM campaign.events e
 WHERE e.id IN (
       SELECT x.id
         FROM campaign.events x
        WHERE x.created_at < now() - make_interval(days => $1)
          AND (NOT $2::boolean
               OR x.id <= (SELECT f.position FROM campaign.event_forwarder f))
        ORDER BY x.id
        LIMIT $3
          FOR UPDATE SKIP LOCKED);

-- name: prune_dead_workers
-- Forget workers whose last heartbeat is more than $1 seconds old (long dead; a live
-- worker whose row is gone registers again at its next heartbeat).
-- $1 seconds
DELETE FROM campaign.workers w
 WHERE w.heartbeat_at < now() - make_interval(secs => $1);
