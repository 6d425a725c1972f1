-- Rollups by campaign alone, by quarter hour, hour and day, for the reports that need no
-- other dimension (issue 12).
--
-- rollup_15m is keyed by every dimension (pub, sub1..sub5, country, device), and real
-- traffic spreads a campaign's clicks of a quarter hour over many distinct sub ids: with
-- 10 million clicks over 30 days and 200 campaigns it held 0.99 rows per click, so a 30-day
-- report by campaign or by day read ~10 million rows (seconds). From these tables the same
-- report reads campaigns x days (6 thousand rows for 30 days), plus the hours and quarter
-- hours where a local day does not follow UTC's (tracker/storage/reports.py).
--
-- They are kept by triggers on the 15-minute rollups, in the writer's transaction: every
-- change of a 15-minute row (insert, the writer's ON CONFLICT update, a delete, a truncate)
-- adds the same difference here, so these always equal a regrouping of the 15-minute rows
-- and the writer's exactly-once fold carries over as it is. Statement triggers with
-- transition tables: one grouped upsert per batch and grain, not one per row. Each set of
-- rows is locked in key order, after the statement's own 15-minute rows: every writer locks
-- 15-minute rows, then these grain by grain, so writers never deadlock on them.
--
-- Buckets are UTC quarter hours, hours and days (date_bin: the session's time zone plays no
-- part).

CREATE TABLE rollup_campaign_1h (
    bucket          timestamptz NOT NULL,
    campaign_id     bigint NOT NULL,
    impressions     bigint NOT NULL DEFAULT 0,
    bot_impressions bigint NOT NULL DEFAULT 0,
    clicks          bigint NOT NULL DEFAULT 0,
    unique_clicks   bigint NOT NULL DEFAULT 0,
    bot_clicks      bigint NOT NULL DEFAULT 0,
    cost            numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (bucket, campaign_id)
);
CREATE INDEX rollup_campaign_1h_campaign ON rollup_campaign_1h (campaign_id, bucket);

CREATE TABLE conversion_rollup_campaign_1h (
    basis               text NOT NULL CHECK (basis IN ('conversion', 'click')),
    bucket              timestamptz NOT NULL,
    campaign_id         bigint NOT NULL,
    conversions         bigint NOT NULL DEFAULT 0,
    revenue             numeric NOT NULL DEFAULT 0,
    pending_conversions bigint NOT NULL DEFAULT 0,
    pending_revenue     numeric NOT NULL DEFAULT 0,
    cost                numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (basis, bucket, campaign_id)
);
CREATE INDEX conversion_rollup_campaign_1h_campaign
    ON conversion_rollup_campaign_1h (campaign_id, bucket);

-- The same by UTC day (a 30-day report in UTC reads campaigns x 30 rows), and by quarter
-- hour (the pieces of hours that a local day of a +05:30 or +05:45 zone cuts in two).
CREATE TABLE rollup_campaign_1d (LIKE rollup_campaign_1h INCLUDING ALL);
CREATE TABLE conversion_rollup_campaign_1d (LIKE conversion_rollup_campaign_1h INCLUDING ALL);
CREATE TABLE rollup_campaign_15m (LIKE rollup_campaign_1h INCLUDING ALL);
CREATE TABLE conversion_rollup_campaign_15m (LIKE conversion_rollup_campaign_1h INCLUDING ALL);

-- What a statement changed in a 15-minute table, from its transition tables (new_rows: rows
-- as they are now, old_rows: as they were; an insert has only the first, a delete only the
-- second, an update both), as signed rows. A transition table belongs to the trigger of one
-- event, so each event's statement names only its own: built per call, hence EXECUTE.
CREATE FUNCTION tracker_changed_rows(op text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE op
        WHEN 'INSERT' THEN 'SELECT 1 AS sign, * FROM new_rows'
        WHEN 'DELETE' THEN 'SELECT -1 AS sign, * FROM old_rows'
        ELSE 'SELECT 1 AS sign, * FROM new_rows UNION ALL SELECT -1, * FROM old_rows'
    END
$$;

-- One statement per call: the transition tables are read once, summed by quarter hour and
-- campaign (q), and each grain is upserted from q. Every writer runs the same statement, so
-- the three tables are locked in one order, each table's rows in key order.
CREATE FUNCTION tracker_fold_traffic_hourly() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format($sql$
        WITH q AS (
            SELECT bucket, campaign_id, sum(sign * impressions) AS impressions,
                   sum(sign * bot_impressions) AS bot_impressions, sum(sign * clicks) AS clicks,
                   sum(sign * unique_clicks) AS unique_clicks,
                   sum(sign * bot_clicks) AS bot_clicks, sum(sign * cost) AS cost
            FROM (%s) d GROUP BY 1, 2
        ), quarters AS (
            INSERT INTO rollup_campaign_15m AS h (bucket, campaign_id, impressions, bot_impressions, clicks, unique_clicks, bot_clicks, cost)
            SELECT date_bin('15 minutes', bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00'), campaign_id,
                   sum(impressions), sum(bot_impressions), sum(clicks), sum(unique_clicks), sum(bot_clicks), sum(cost)
            FROM q GROUP BY 1, 2 ORDER BY 1, 2
            ON CONFLICT (bucket, campaign_id) DO UPDATE SET
                impressions = h.impressions + excluded.impressions,
                bot_impressions = h.bot_impressions + excluded.bot_impressions,
                clicks = h.clicks + excluded.clicks,
                unique_clicks = h.unique_clicks + excluded.unique_clicks,
                bot_clicks = h.bot_clicks + excluded.bot_clicks,
                cost = h.cost + excluded.cost
            RETURNING 1
        ), hours AS (
            INSERT INTO rollup_campaign_1h AS h (bucket, campaign_id, impressions, bot_impressions, clicks, unique_clicks, bot_clicks, cost)
            SELECT date_bin('1 hour', bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00'), campaign_id,
                   sum(impressions), sum(bot_impressions), sum(clicks), sum(unique_clicks), sum(bot_clicks), sum(cost)
            FROM q GROUP BY 1, 2 ORDER BY 1, 2
            ON CONFLICT (bucket, campaign_id) DO UPDATE SET
                impressions = h.impressions + excluded.impressions,
                bot_impressions = h.bot_impressions + excluded.bot_impressions,
                clicks = h.clicks + excluded.clicks,
                unique_clicks = h.unique_clicks + excluded.unique_clicks,
                bot_clicks = h.bot_clicks + excluded.bot_clicks,
                cost = h.cost + excluded.cost
            RETURNING 1
        )
        INSERT INTO rollup_campaign_1d AS h (bucket, campaign_id, impressions, bot_impressions, clicks, unique_clicks, bot_clicks, cost)
            SELECT date_bin('1 day', bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00'), campaign_id,
                   sum(impressions), sum(bot_impressions), sum(clicks), sum(unique_clicks), sum(bot_clicks), sum(cost)
            FROM q GROUP BY 1, 2 ORDER BY 1, 2
            ON CONFLICT (bucket, campaign_id) DO UPDATE SET
                impressions = h.impressions + excluded.impressions,
                bot_impressions = h.bot_impressions + excluded.bot_impressions,
                clicks = h.clicks + excluded.clicks,
                unique_clicks = h.unique_clicks + excluded.unique_clicks,
                bot_clicks = h.bot_clicks + excluded.bot_clicks,
                cost = h.cost + excluded.cost
        $sql$, tracker_changed_rows(TG_OP));
    RETURN NULL;
END
$$;

CREATE FUNCTION tracker_fold_conversions_hourly() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format($sql$
        WITH q AS (
            SELECT basis, bucket, campaign_id, sum(sign * conversions) AS conversions,
                   sum(sign * revenue) AS revenue,
                   sum(sign * pending_conversions) AS pending_conversions,
                   sum(sign * pending_revenue) AS pending_revenue, sum(sign * cost) AS cost
            FROM (%s) d GROUP BY 1, 2, 3
        ), quarters AS (
            INSERT INTO conversion_rollup_campaign_15m AS h (basis, bucket, campaign_id, conversions, revenue, pending_conversions, pending_revenue, cost)
            SELECT basis, date_bin('15 minutes', bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00'),
                   campaign_id, sum(conversions), sum(revenue), sum(pending_conversions), sum(pending_revenue), sum(cost)
            FROM q GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
            ON CONFLICT (basis, bucket, campaign_id) DO UPDATE SET
                conversions = h.conversions + excluded.conversions,
                revenue = h.revenue + excluded.revenue,
                pending_conversions = h.pending_conversions + excluded.pending_conversions,
                pending_revenue = h.pending_revenue + excluded.pending_revenue,
                cost = h.cost + excluded.cost
            RETURNING 1
        ), hours AS (
            INSERT INTO conversion_rollup_campaign_1h AS h (basis, bucket, campaign_id, conversions, revenue, pending_conversions, pending_revenue, cost)
            SELECT basis, date_bin('1 hour', bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00'),
                   campaign_id, sum(conversions), sum(revenue), sum(pending_conversions), sum(pending_revenue), sum(cost)
            FROM q GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
            ON CONFLICT (basis, bucket, campaign_id) DO UPDATE SET
                conversions = h.conversions + excluded.conversions,
                revenue = h.revenue + excluded.revenue,
                pending_conversions = h.pending_conversions + excluded.pending_conversions,
                pending_revenue = h.pending_revenue + excluded.pending_revenue,
                cost = h.cost + excluded.cost
            RETURNING 1
        )
        INSERT INTO conversion_rollup_campaign_1d AS h (basis, bucket, campaign_id, conversions, revenue, pending_conversions, pending_revenue, cost)
            SELECT basis, date_bin('1 day', bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00'),
                   campaign_id, sum(conversions), sum(revenue), sum(pending_conversions), sum(pending_revenue), sum(cost)
            FROM q GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
            ON CONFLICT (basis, bucket, campaign_id) DO UPDATE SET
                conversions = h.conversions + excluded.conversions,
                revenue = h.revenue + excluded.revenue,
                pending_conversions = h.pending_conversions + excluded.pending_conversions,
                pending_revenue = h.pending_revenue + excluded.pending_revenue,
                cost = h.cost + excluded.cost
        $sql$, tracker_changed_rows(TG_OP));
    RETURN NULL;
END
$$;

-- TRUNCATE has no transition table: the hourly table is emptied with it.
CREATE FUNCTION tracker_truncate_hourly() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('TRUNCATE %I, %I, %I', TG_ARGV[0] || '_15m', TG_ARGV[0] || '_1h',
                   TG_ARGV[0] || '_1d');
    RETURN NULL;
END
$$;

CREATE TRIGGER fold_hourly_insert AFTER INSERT ON rollup_15m
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tracker_fold_traffic_hourly();
CREATE TRIGGER fold_hourly_update AFTER UPDATE ON rollup_15m
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tracker_fold_traffic_hourly();
CREATE TRIGGER fold_hourly_delete AFTER DELETE ON rollup_15m
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tracker_fold_traffic_hourly();
CREATE TRIGGER fold_hourly_truncate AFTER TRUNCATE ON rollup_15m
    FOR EACH STATEMENT EXECUTE FUNCTION tracker_truncate_hourly('rollup_campaign');

CREATE TRIGGER fold_hourly_insert AFTER INSERT ON conversion_rollup_15m
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tracker_fold_conversions_hourly();
CREATE TRIGGER fold_hourly_update AFTER UPDATE ON conversion_rollup_15m
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tracker_fold_conversions_hourly();
CREATE TRIGGER fold_hourly_delete AFTER DELETE ON conversion_rollup_15m
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tracker_fold_conversions_hourly();
CREATE TRIGGER fold_hourly_truncate AFTER TRUNCATE ON conversion_rollup_15m
    FOR EACH STATEMENT EXECUTE FUNCTION tracker_truncate_hourly('conversion_rollup_campaign');

-- What was folded before these triggers existed (a no-op on a new database).
INSERT INTO rollup_campaign_1h (bucket, campaign_id, impressions, bot_impressions, clicks,
                                unique_clicks, bot_clicks, cost)
SELECT date_bin('1 hour', bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00'), campaign_id,
       sum(impressions), sum(bot_impressions), sum(clicks), sum(unique_clicks),
       sum(bot_clicks), sum(cost)
FROM rollup_15m GROUP BY 1, 2;
INSERT INTO conversion_rollup_campaign_1h (basis, bucket, campaign_id, conversions, revenue,
                                           pending_conversions, pending_revenue, cost)
SELECT basis, date_bin('1 hour', bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00'), campaign_id,
       sum(conversions), sum(revenue), sum(pending_conversions), sum(pending_revenue),
       sum(cost)
FROM conversion_rollup_15m GROUP BY 1, 2, 3;
INSERT INTO rollup_campaign_1d (bucket, campaign_id, impressions, bot_impressions, clicks,
                                unique_clicks, bot_clicks, cost)
SELECT date_bin('1 day', bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00'), campaign_id,
       sum(impressions), sum(bot_impressions), sum(clicks), sum(unique_clicks),
       sum(bot_clicks), sum(cost)
FROM rollup_campaign_1h GROUP BY 1, 2;
INSERT INTO conversion_rollup_campaign_1d (basis, bucket, campaign_id, conversions, revenue,
                                           pending_conversions, pending_revenue, cost)
SELECT basis, date_bin('1 day', bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00'), campaign_id,
       sum(conversions), sum(revenue), sum(pending_conversions), sum(pending_revenue),
       sum(cost)
FROM conversion_rollup_campaign_1h GROUP BY 1, 2, 3;
INSERT INTO rollup_campaign_15m (bucket, campaign_id, impressions, bot_impressions, clicks,
                                 unique_clicks, bot_clicks, cost)
SELECT bucket, campaign_id, sum(impressions), sum(bot_impressions), sum(clicks),
       sum(unique_clicks), sum(bot_clicks), sum(cost)
FROM rollup_15m GROUP BY 1, 2;
INSERT INTO conversion_rollup_campaign_15m (basis, bucket, campaign_id, conversions, revenue,
                                            pending_conversions, pending_revenue, cost)
SELECT basis, bucket, campaign_id, sum(conversions), sum(revenue), sum(pending_conversions),
       sum(pending_revenue), sum(cost)
FROM conversion_rollup_15m GROUP BY 1, 2, 3;
