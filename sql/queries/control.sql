-- Campaign control from the CLI. Each returns the previous status, or no row when the
-- campaign does not exist or is in a status the change does not apply to.

-- name: control_pause
-- Pause a sendable campaign; requests in flight finish, batches claimed but not yet posted
-- are given back (sender_mark_posting), no new ones are claimed.
-- $1 campaign id
UPDATE campaign.campaigns c
   SET status = 'paused'
  FROM (SELECT id, status FROM campaign.campaigns WHERE id = $1 FOR UPDATE) prev
 WHERE c.id = prev.id AND prev.status IN ('draft', 'ready', 'running')
RETURNING prev.status AS previous_status;

-- name: control_resume
-- Make a paused or draft campaign ready; the producer picks it up within a second.
-- $1 campaign id
UPDATE campaign.campaigns c
   SET status = 'ready'
  FROM (SELECT id, status FROM campaign.campaigns WHERE id = $1 FOR UPDATE) prev
 WHERE c.id = prev.id AND prev.status IN ('draft', 'paused')
RETURNING prev.status AS previous_status;

-- name: control_cancel
-- Cancel a campaign that is not finished; the producer marks its unsent recipients.
-- $1 campaign id
UPDATE campaign.campaigns c
   SET status = 'cancelled'
  FROM (SELECT id, status FROM campaign.campaigns WHERE id = $1 FOR UPDATE) prev
 WHERE c.id = prev.id AND prev.status IN ('draft', 'ready', 'running', 'paused')
RETURNING prev.status AS previous_status;

-- name: control_campaign_status
-- A campaign's status, to say why a pause / resume / cancel changed nothing.
-- $1 campaign id
SELECT status FROM campaign.campaigns WHERE id = $1;
