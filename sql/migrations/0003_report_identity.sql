-- What identifies a delivery report.

-- A report is one destination's (transid or correlation id) report of one code at one
-- time. The platform may leave out the transid (the parser accepts a correlation id
-- alone) and the timestamp: without the correlation id in the key, four recipients'
-- 7500s with neither were "duplicates" of each other, three were dropped, and the
-- platform was still told 200. Widening a unique key cannot fail on rows already stored.
-- A migration is one transaction, so no CONCURRENTLY: the build blocks inserts (the
-- receiver answers 503 past store_timeout_s and the platform retries), the old index is
-- dropped only at the end so reads wait just for that. On a large table, prune first.
CREATE UNIQUE INDEX delivery_reports_report_key ON campaign.delivery_reports
    (transid, correlation_id, code, reported_at) NULLS NOT DISTINCT;
DROP INDEX campaign.delivery_reports_dedup_key;
ALTER INDEX campaign.delivery_reports_report_key RENAME TO delivery_reports_dedup_key;
