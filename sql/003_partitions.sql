-- Partition upkeep one partition at a time (issue 10).
--
-- 001's tracker_ensure_partitions() made every table and day in one transaction, so a single
-- event in a DEFAULT partition for a day (PostgreSQL refuses to create a partition whose
-- range rows of DEFAULT already occupy) failed all of them, every hour and at every start.
-- Now the service calls tracker_create_partition() once per table and day, each in its own
-- transaction, and moves a day's DEFAULT rows into the new partition as it creates it.
-- Creation, retention drops and DEFAULT pruning all take the same advisory lock, so workers
-- on several hosts never race on one CREATE or DROP.

DROP FUNCTION tracker_ensure_partitions(int, int);

-- The daily partition of `parent` ('clicks' or 'impressions') for the UTC day `day`.
-- Returns NULL when it already existed, else how many rows it took over from DEFAULT.
-- The rows move as they are (DELETE from DEFAULT, INSERT through the parent): rollups were
-- folded when the rows were first written and are not touched.
--
-- lock_timeout: creating a partition needs an ACCESS EXCLUSIVE lock on the parent; waiting
-- for it behind a long query would queue every writer behind us. Better to give up and try
-- again at the next upkeep (the days ahead exist long before they are needed).
CREATE FUNCTION tracker_create_partition(parent text, day date) RETURNS bigint
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
    PERFORM pg_advisory_xact_lock(hashtext('tracker_partitions'));
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

-- Drops whole daily partitions older than `keep_days` (rollups stay: reports outlive raw
-- rows). Now under the creation lock, so a drop never meets a CREATE of the same parent.
CREATE OR REPLACE FUNCTION tracker_drop_partitions(keep_days int) RETURNS int
LANGUAGE plpgsql SET lock_timeout = '5s' AS $$
DECLARE
    r record;
    dropped int := 0;
    cutoff text := to_char((now() AT TIME ZONE 'UTC')::date - keep_days, 'YYYYMMDD');
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('tracker_partitions'));
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

-- Retention for what no daily partition holds: rows of DEFAULT older than `keep_days` (the
-- same cutoff as the drops: before the UTC day `keep_days` ago). Returns the rows deleted.
CREATE FUNCTION tracker_prune_default(keep_days int) RETURNS bigint
LANGUAGE plpgsql SET lock_timeout = '5s' AS $$
DECLARE
    cutoff timestamptz := ((now() AT TIME ZONE 'UTC')::date - keep_days)::timestamp AT TIME ZONE 'UTC';
    n bigint;
    total bigint := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('tracker_partitions'));
    DELETE FROM clicks_default WHERE ts < cutoff;
    GET DIAGNOSTICS n = ROW_COUNT;
    total := total + n;
    DELETE FROM impressions_default WHERE ts < cutoff;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN total + n;
END
$$;
