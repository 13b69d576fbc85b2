-- An idle worker heartbeats every few seconds instead of every second (issue 17: an idle
-- worker cost the database 11-16 commits a second). It stays live for the fleet through
-- its LISTEN connection: while that server process exists, its worker exists, and a
-- SIGKILLed or crashed worker's connection closes at once, so its share comes back at the
-- others' next heartbeat. A worker that hangs with its connection open is dropped at
-- quiet_until (quiet) or once its heartbeat is dead_after_s old (sending), as before.

ALTER TABLE campaign.workers
    -- The server process of the worker's LISTEN connection and when it started (a pid
    -- alone may be reused by a later connection). NULL: not listening.
    ADD COLUMN listen_pid integer,
    ADD COLUMN listen_started_at timestamptz,
    -- Set by a quiet heartbeat (nothing held, nothing claimed): until then the worker
    -- counts as live while its LISTEN connection is open, however old its heartbeat. NULL
    -- while it sends: then only a heartbeat younger than dead_after_s counts.
    ADD COLUMN quiet_until timestamptz;

-- The one definition of a live worker, for the fleet's shares, the registration of a
-- worker id and `campaign status`. A worker that listens is live while its LISTEN
-- connection's server process exists and either its heartbeat is younger than
-- dead_after_s or it is quiet (quiet_until not passed): a killed worker is dead at once,
-- whether it was sending or quiet. One that does not listen (yet) counts by its heartbeat
-- alone. Another role's sessions show their pid but not their backend_start: then the
-- pid alone is matched.
CREATE FUNCTION campaign.worker_live(w campaign.workers, dead_after_s float8)
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN w.listen_pid IS NULL THEN w.heartbeat_at > now() - make_interval(secs => dead_after_s)
        ELSE (w.heartbeat_at > now() - make_interval(secs => dead_after_s)
              OR w.quiet_until > now())
             AND EXISTS (SELECT 1
                           FROM pg_stat_activity a
                          WHERE a.pid = w.listen_pid
                            AND (a.backend_start IS NULL
                                 OR a.backend_start = w.listen_started_at))
    END
$$;

-- Wake the workers only when a campaign's status really changed (or a campaign was
-- inserted). The statement trigger of 0001 fired for every UPDATE naming the column,
-- rows or none: each canary and brake sweep of every worker (and each claim) notified
-- every worker of the fleet, which then polled again at once, idle or not.
CREATE FUNCTION campaign.notify_work_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF EXISTS (SELECT 1 FROM new_rows) THEN
            PERFORM pg_notify('campaign_work', TG_TABLE_NAME);
        END IF;
    ELSIF EXISTS (SELECT 1
                    FROM new_rows n
                    JOIN old_rows o ON o.id = n.id
                   WHERE n.status IS DISTINCT FROM o.status) THEN
        PERFORM pg_notify('campaign_work', TG_TABLE_NAME);
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER campaigns_notify ON campaign.campaigns;
-- Transition tables allow one event per trigger and no column list: two triggers.
CREATE TRIGGER campaigns_notify_insert AFTER INSERT ON campaign.campaigns
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION campaign.notify_work_changed();
CREATE TRIGGER campaigns_notify_update AFTER UPDATE ON campaign.campaigns
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION campaign.notify_work_changed();
