-- Crash recovery resends a recipient left in doubt once its grace has passed without a
-- report; a report that has arrived but waits for the reconciler's next pass must stop
-- that resend (recovery_resolve_unknown). Such a report is found by correlation id, the
-- only identity an in-doubt recipient has: this index answers that for the waiting
-- reports alone. An entry goes dead when its report is matched or orphaned, as in
-- delivery_reports_new_idx, and vacuum removes it.
-- A migration is one transaction, so no CONCURRENTLY: the build reads the table once
-- and blocks report inserts meanwhile (the receiver answers 503 past store_timeout_s and
-- the platform retries). On a large table, prune first.
CREATE INDEX delivery_reports_new_correlation_idx ON campaign.delivery_reports (correlation_id)
    WHERE state = 'new';
