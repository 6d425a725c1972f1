-- The batch writer's rollup fold, done by PostgreSQL from the rows each statement inserted
-- (issue 12).
--
-- The hot path now buffers each click and impression as the very line the writer COPYs
-- (tracker/storage/lines.py), so the writer sends a round's lines as they came, without
-- reading them. Summing them into rollup_15m moved here: a statement trigger reads the
-- rows the statement really inserted (its transition table) and upserts their sums. Rows an
-- INSERT ... ON CONFLICT DO NOTHING skipped are not in it, so a replayed batch folds nothing
-- twice: exactly once, as before.
--
-- Only the writer's transactions fold (it sets tracker.fold to 'on' for the transaction, see
-- tracker/storage/events.py): rows moved from a DEFAULT partition into a new daily one, a
-- test's or a benchmark's own rows, are not counted again.
--
-- The fold reaches the campaign rollups (sql/007) itself: 007's statement triggers on
-- rollup_15m build their statements with EXECUTE, planned anew on every call, which cost
-- PostgreSQL about 4 ms a batch whatever its size (8 us a click at 500 clicks a batch, as
-- much as storing the click). So the fold sums the inserted rows once, upserts the 15-minute
-- rows and then the campaign's quarter hours, hours and days from those sums, in static
-- statements (plpgsql keeps their plans for the session); 007's traffic triggers stand aside
-- while the writer folds, and carry every other change of rollup_15m (a tool's, a test's)
-- over as before.
--
-- Rollup rows are locked in one order by every writer: 15-minute rows, then campaign
-- quarters, hours, days, each in key order; clicks' fold before impressions'.

CREATE OR REPLACE FUNCTION tracker_fold_traffic_hourly() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('tracker.fold', true) = 'on' THEN
        RETURN NULL;  -- the writer's fold carries its own sums over (below)
    END IF;
    EXECUTE format($sql$
        WITH q AS (
            SELECT bucket, campaign_id, sum(sign * impressions)::bigint AS impressions,
                   sum(sign * bot_impressions)::bigint AS bot_impressions,
                   sum(sign * clicks)::bigint AS clicks,
                   sum(sign * unique_clicks)::bigint AS unique_clicks,
                   sum(sign * bot_clicks)::bigint AS bot_clicks, sum(sign * cost) AS cost
            FROM (%s) d GROUP BY 1, 2
        )
        SELECT tracker_add_campaign_traffic(array_agg(bucket), array_agg(campaign_id),
                   array_agg(impressions), array_agg(bot_impressions), array_agg(clicks),
                   array_agg(unique_clicks), array_agg(bot_clicks), array_agg(cost))
        FROM q
    $sql$, tracker_changed_rows(TG_OP));
    RETURN NULL;
END
$$;

-- Sums by quarter hour and campaign, added to the campaign rollups of every grain.
CREATE FUNCTION tracker_add_campaign_traffic(buckets timestamptz[], campaigns bigint[],
        impressions bigint[], bot_impressions bigint[], clicks bigint[],
        unique_clicks bigint[], bot_clicks bigint[], costs numeric[]) RETURNS bigint
LANGUAGE sql AS $$
    WITH q AS (
        SELECT * FROM unnest(buckets, campaigns, impressions, bot_impressions, clicks,
                             unique_clicks, bot_clicks, costs)
            AS q (bucket, campaign_id, impressions, bot_impressions, clicks, unique_clicks,
                  bot_clicks, cost)
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
    , days AS (
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
        RETURNING 1
    )
    -- Each grain in turn (a scalar subquery runs before what follows it): locks taken in
    -- one order by every writer.
    SELECT (SELECT count(*) FROM quarters) + (SELECT count(*) FROM hours)
           + (SELECT count(*) FROM days)
$$;

-- The writer's fold: the inserted rows summed once by
-- quarter hour and dimensions (d); the 15-minute rows upserted from d, and only then (the
-- scalar subquery over `fine` runs before the campaigns' sums are handed on) the campaign
-- grains from d summed by campaign.
CREATE FUNCTION tracker_fold_clicks() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    folded bigint;
BEGIN
    IF current_setting('tracker.fold', true) IS DISTINCT FROM 'on' THEN
        RETURN NULL;
    END IF;
    WITH d AS (
        SELECT date_bin('15 minutes', ts, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket,
               campaign_id, pub, sub1, sub2, sub3, sub4, sub5, country, device,
               count(*) FILTER (WHERE NOT is_bot) AS clicks,
               count(*) FILTER (WHERE is_unique AND NOT is_bot) AS unique_clicks,
               count(*) FILTER (WHERE is_bot) AS bot_clicks,
               coalesce(sum(cost) FILTER (WHERE NOT is_bot), 0) AS cost
        FROM new_rows
        GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
    ), fine AS (
        INSERT INTO rollup_15m AS r (bucket, campaign_id, pub, sub1, sub2, sub3, sub4, sub5,
                                     country, device, clicks, unique_clicks, bot_clicks, cost)
        SELECT * FROM d ORDER BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
        ON CONFLICT (bucket, campaign_id, dims) DO UPDATE SET
            clicks = r.clicks + excluded.clicks,
            unique_clicks = r.unique_clicks + excluded.unique_clicks,
            bot_clicks = r.bot_clicks + excluded.bot_clicks,
            cost = r.cost + excluded.cost
        RETURNING 1
    )
    SELECT tracker_add_campaign_traffic(
               array_agg(bucket), array_agg(campaign_id), array_agg(0::bigint),
               array_agg(0::bigint), array_agg(clicks), array_agg(unique_clicks),
               array_agg(bot_clicks), array_agg(cost))
    INTO folded
    FROM (SELECT bucket, campaign_id, sum(clicks)::bigint AS clicks,
                 sum(unique_clicks)::bigint AS unique_clicks,
                 sum(bot_clicks)::bigint AS bot_clicks, sum(cost) AS cost
          FROM d GROUP BY 1, 2) AS q
    WHERE (SELECT count(*) FROM fine) >= 0;
    RETURN NULL;
END
$$;

CREATE FUNCTION tracker_fold_impressions() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    folded bigint;
BEGIN
    IF current_setting('tracker.fold', true) IS DISTINCT FROM 'on' THEN
        RETURN NULL;
    END IF;
    WITH d AS (
        SELECT date_bin('15 minutes', ts, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket,
               campaign_id, pub, sub1, sub2, sub3, sub4, sub5, country, device,
               count(*) FILTER (WHERE NOT is_bot) AS impressions,
               count(*) FILTER (WHERE is_bot) AS bot_impressions,
               coalesce(sum(cost) FILTER (WHERE NOT is_bot), 0) AS cost
        FROM new_rows
        GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
    ), fine AS (
        INSERT INTO rollup_15m AS r (bucket, campaign_id, pub, sub1, sub2, sub3, sub4, sub5,
                                     country, device, impressions, bot_impressions, cost)
        SELECT * FROM d ORDER BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
        ON CONFLICT (bucket, campaign_id, dims) DO UPDATE SET
            impressions = r.impressions + excluded.impressions,
            bot_impressions = r.bot_impressions + excluded.bot_impressions,
            cost = r.cost + excluded.cost
        RETURNING 1
    )
    SELECT tracker_add_campaign_traffic(
               array_agg(bucket), array_agg(campaign_id), array_agg(impressions),
               array_agg(bot_impressions), array_agg(0::bigint), array_agg(0::bigint),
               array_agg(0::bigint), array_agg(cost))
    INTO folded
    FROM (SELECT bucket, campaign_id, sum(impressions)::bigint AS impressions,
                 sum(bot_impressions)::bigint AS bot_impressions, sum(cost) AS cost
          FROM d GROUP BY 1, 2) AS q
    WHERE (SELECT count(*) FROM fine) >= 0;
    RETURN NULL;
END
$$;

CREATE TRIGGER fold_clicks AFTER INSERT ON clicks
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tracker_fold_clicks();
CREATE TRIGGER fold_impressions AFTER INSERT ON impressions
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tracker_fold_impressions();
