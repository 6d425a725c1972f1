-- Partition upkeep and retention from many instances at once (issue 12).
--
-- 003's functions waited for the partitions lock (pg_advisory_xact_lock). Behind PgBouncer in
-- transaction mode a transaction waiting on a lock holds one of the pool's few server
-- connections all the while, N instances at once could hold N of them; and a holder moving
-- many DEFAULT rows for longer than lock_timeout (5 s) made the others fail. Now each takes
-- the lock with pg_try_advisory_xact_lock and answers -1 at once when another instance holds
-- it: the service tries that step again a moment later, holding nothing meanwhile
-- (tracker/upkeep.py). Still one lock for every creation, drop and prune, taken in the
-- step's own transaction: no CREATE or DROP of one parent ever races another.
--
-- tracker_create_partition: NULL when the partition existed, -1 when busy, else the rows it
-- took over from DEFAULT. tracker_drop_partitions / tracker_prune_default: -1 when busy,
-- else how many partitions / rows.

CREATE OR REPLACE FUNCTION tracker_create_partition(parent text, day date) RETURNS bigint
LANGUAGE plpgsql SET lock_timeout = '5s' AS $$
DECLARE
    part text := format('%s_%s', parent, to_char(day, 'YYYYMMDD'));
    fallback text := parent || '_default';
    lo timestamptz := day::timestamp AT TIME ZONE 'UTC';
    hi timestamptz := (day + 1)::timestamp AT TIME ZONE 'UTC';
    waiting boolean;
    moved bigint := 0;
BEGIN
    IF parent NOT IN ('clicks', 'impressions') THEN
        RAISE EXCEPTION 'not a partitioned event table: %', parent;
    END IF;
    IF NOT pg_try_advisory_xact_lock(hashtext('tracker_partitions')) THEN
        RETURN -1;
    END IF;
    IF to_regclass(part) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    -- The lock CREATE would take anyway, taken before looking at DEFAULT: no writer can put
    -- a row of this day there between the move and the CREATE.
    EXECUTE format('LOCK TABLE %I IN ACCESS EXCLUSIVE MODE', parent);
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I WHERE ts >= $1 AND ts < $2)', fallback)
        INTO waiting USING lo, hi;
    IF waiting THEN
        EXECUTE format('CREATE TEMP TABLE tracker_moving (LIKE %I) ON COMMIT DROP', parent);
        EXECUTE format(
            'WITH taken AS (DELETE FROM %I WHERE ts >= $1 AND ts < $2 RETURNING *) '
            'INSERT INTO tracker_moving SELECT * FROM taken', fallback) USING lo, hi;
        GET DIAGNOSTICS moved = ROW_COUNT;
    END IF;
    EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                   part, parent, lo, hi);
    IF waiting THEN
        EXECUTE format('INSERT INTO %I SELECT * FROM tracker_moving', parent);
        DROP TABLE tracker_moving;
    END IF;
    RETURN moved;
END
$$;

CREATE OR REPLACE FUNCTION tracker_drop_partitions(keep_days int) RETURNS int
LANGUAGE plpgsql SET lock_timeout = '5s' AS $$
DECLARE
    r record;
    dropped int := 0;
    cutoff text := to_char((now() AT TIME ZONE 'UTC')::date - keep_days, 'YYYYMMDD');
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('tracker_partitions')) THEN
        RETURN -1;
    END IF;
    FOR r IN
        SELECT c.relname FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_class p ON p.oid = i.inhparent
        WHERE p.relname IN ('clicks', 'impressions')
          AND c.relname ~ '_[0-9]{8}$'
          AND right(c.relname, 8) < cutoff
    LOOP
        EXECUTE format('DROP TABLE %I', r.relname);
        dropped := dropped + 1;
    END LOOP;
    RETURN dropped;
END
$$;

CREATE OR REPLACE FUNCTION tracker_prune_default(keep_days int) RETURNS bigint
LANGUAGE plpgsql SET lock_timeout = '5s' AS $$
DECLARE
    cutoff timestamptz := ((now() AT TIME ZONE 'UTC')::date - keep_days)::timestamp AT TIME ZONE 'UTC';
    n bigint;
    total bigint := 0;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('tracker_partitions')) THEN
        RETURN -1;
    END IF;
    DELETE FROM clicks_default WHERE ts < cutoff;
    GET DIAGNOSTICS n = ROW_COUNT;
    total := total + n;
    DELETE FROM impressions_default WHERE ts < cutoff;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN total + n;
END
$$;
