-- `campaign import`: recipients from a CSV file (the rows themselves go in with COPY).

-- name: importer_campaign_status
-- Whether the campaign exists and can take recipients.
-- $1 campaign id
SELECT status FROM campaign.campaigns WHERE id = $1;
