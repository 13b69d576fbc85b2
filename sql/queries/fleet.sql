-- Fleet membership and the fleet-wide AIMD factor (campaign/fleet.py). The cost is one
-- statement per worker per heartbeat, whatever the message rate: nothing here runs per
-- batch.

-- name: fleet_register
-- Join the fleet: insert this worker's row, or take over a row with this id whose worker
-- is dead (a restart after a crash). No row comes back when a live worker already uses
-- the id: two processes with one id would each take a full share, and the first to stop
-- would release the other's batches. Live as the fleet counts it (campaign.worker_live):
-- a quiet worker with its LISTEN connection open keeps its id.
-- $1 worker id, $2 services (text[]), $3 configured rate_per_s of each (float8[]),
-- $4 seconds after which a silent worker counts as dead
INSERT INTO campaign.workers AS w (worker_id, services, rates_per_s)
VALUES ($1, $2::text[], $3::float8[])
ON CONFLICT (worker_id) DO UPDATE
   SET services = EXCLUDED.services,
       rates_per_s = EXCLUDED.rates_per_s,
       started_at = now(),
       heartbeat_at = now(),
       listen_pid = NULL,
       listen_started_at = NULL,
       quiet_until = NULL
 WHERE NOT campaign.worker_live(w, $4)
RETURNING w.started_at;

-- name: fleet_heartbeat
-- Once per heartbeat: prove this worker alive, propose each service's local AIMD factor
-- where it moved since the last heartbeat (NULL: no opinion), and read back per service
-- the fleet's factor, how many live workers send for it (this one included) and the
-- smallest rate_per_s they are configured with. A lower factor wins at once (a 7020
-- anywhere slows everyone); a higher one moves the shared factor up by at most one step
-- per increase interval elapsed since it last moved, so the fleet climbs back as slowly
-- as one worker would, whichever worker proposes it.
-- `registered` is false when this worker's row is gone (pruned while the worker hung):
-- the caller registers again.
-- A quiet heartbeat ($10 set: the worker holds and claims nothing) keeps the worker live
-- for $10 seconds while its LISTEN connection ($9) is open (campaign.worker_live); a
-- sending one ($10 NULL) is live for $7 seconds, as before.
-- $1 worker id, $2 services (text[]), $3 configured rates (float8[]), $4 proposed factors
-- (float8[], NULL for none), $5 increase intervals in seconds (float8[]), $6 increase steps (float8[]),
-- $7 seconds after which a silent worker counts as dead, $8 heartbeat interval (others
-- registered longer ago than that are `established_others`: they may be sending at a
-- larger share until their next heartbeat), $9 server pid of the LISTEN connection (NULL:
-- not listening), $10 seconds a quiet worker stays live without a heartbeat (NULL: sending)
WITH me AS (
    UPDATE campaign.workers
       SET heartbeat_at = now(),
           listen_pid = $9::int,
           listen_started_at = (SELECT a.backend_start
                                  FROM pg_stat_activity a
                                 WHERE a.pid = $9::int),
           quiet_until = now() + make_interval(secs => $10::float8)
     WHERE worker_id = $1
    RETURNING worker_id
), proposed AS (
    SELECT *
      FROM unnest($2::text[], $3::float8[], $4::float8[], $5::float8[], $6::float8[])
           AS p(service, rate_per_s, factor, interval_s, step)
), created AS (
    INSERT INTO campaign.service_rates (service, factor)
    SELECT p.service, coalesce(p.factor, 1.0) FROM proposed p
    ON CONFLICT (service) DO NOTHING
    RETURNING service, factor
), changed AS (
    -- Only rows that move are locked and written: a steady fleet writes nothing here.
    UPDATE campaign.service_rates sr
       SET factor = CASE
               WHEN p.factor < sr.factor THEN p.factor
               ELSE least(p.factor, 1.0, sr.factor + p.step * floor(
                   extract(epoch FROM now() - sr.updated_at) / p.interval_s))
           END,
           updated_at = now()
      FROM proposed p
     WHERE sr.service = p.service
       AND p.factor IS NOT NULL
       AND (p.factor < sr.factor
            OR (p.factor > sr.factor
                AND sr.updated_at <= now() - make_interval(secs => p.interval_s)))
    RETURNING sr.service, sr.factor
)
SELECT p.service,
       coalesce(ch.factor, cr.factor, cur.factor, 1.0)::float8 AS factor,
       (1 + live.others)::int AS live_workers,
       live.established::int AS established_others,
       least(p.rate_per_s, live.min_rate_per_s)::float8 AS min_rate_per_s,
       EXISTS (SELECT 1 FROM me) AS registered
  FROM proposed p
  LEFT JOIN changed ch ON ch.service = p.service
  LEFT JOIN created cr ON cr.service = p.service
  LEFT JOIN campaign.service_rates cur ON cur.service = p.service
 CROSS JOIN LATERAL (
       SELECT count(*) AS others,
              count(*) FILTER (WHERE w.started_at < now() - make_interval(secs => $8))
                  AS established,
              min(x.rate_per_s) AS min_rate_per_s
         FROM campaign.workers w
        CROSS JOIN LATERAL unnest(w.services, w.rates_per_s) AS x(service, rate_per_s)
        WHERE w.worker_id <> $1
          AND x.service = p.service
          AND campaign.worker_live(w, $7)
 ) live
 ORDER BY p.service;

-- name: fleet_deregister
-- Leave the fleet on a clean stop, so the others take this worker's share at their next
-- heartbeat instead of after it would have counted as dead.
-- $1 worker id
DELETE FROM campaign.workers WHERE worker_id = $1;
