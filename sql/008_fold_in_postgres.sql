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
-- Rollup rows are locked in key order (ORDER BY), clicks before impressions, by every
-- writer: writers in several workers never deadlock on them.

CREATE FUNCTION tracker_fold_clicks() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('tracker.fold', true) IS DISTINCT FROM 'on' THEN
        RETURN NULL;
    END IF;
    INSERT INTO rollup_15m AS r (bucket, campaign_id, pub, sub1, sub2, sub3, sub4, sub5,
                                 country, device, clicks, unique_clicks, bot_clicks, cost)
    SELECT date_bin('15 minutes', ts, TIMESTAMPTZ '2000-01-01 00:00:00+00'), campaign_id,
           pub, sub1, sub2, sub3, sub4, sub5, country, device,
           count(*) FILTER (WHERE NOT is_bot),
           count(*) FILTER (WHERE is_unique AND NOT is_bot),
           count(*) FILTER (WHERE is_bot),
           coalesce(sum(cost) FILTER (WHERE NOT is_bot), 0)
    FROM new_rows
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
    ORDER BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
    ON CONFLICT (bucket, campaign_id, dims) DO UPDATE SET
        clicks = r.clicks + excluded.clicks,
        unique_clicks = r.unique_clicks + excluded.unique_clicks,
        bot_clicks = r.bot_clicks + excluded.bot_clicks,
        cost = r.cost + excluded.cost;
    RETURN NULL;
END
$$;

CREATE FUNCTION tracker_fold_impressions() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('tracker.fold', true) IS DISTINCT FROM 'on' THEN
        RETURN NULL;
    END IF;
    INSERT INTO rollup_15m AS r (bucket, campaign_id, pub, sub1, sub2, sub3, sub4, sub5,
                                 country, device, impressions, bot_impressions, cost)
    SELECT date_bin('15 minutes', ts, TIMESTAMPTZ '2000-01-01 00:00:00+00'), campaign_id,
           pub, sub1, sub2, sub3, sub4, sub5, country, device,
           count(*) FILTER (WHERE NOT is_bot),
           count(*) FILTER (WHERE is_bot),
           coalesce(sum(cost) FILTER (WHERE NOT is_bot), 0)
    FROM new_rows
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
    ORDER BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
    ON CONFLICT (bucket, campaign_id, dims) DO UPDATE SET
        impressions = r.impressions + excluded.impressions,
        bot_impressions = r.bot_impressions + excluded.bot_impressions,
        cost = r.cost + excluded.cost;
    RETURN NULL;
END
$$;

CREATE TRIGGER fold_clicks AFTER INSERT ON clicks
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tracker_fold_clicks();
CREATE TRIGGER fold_impressions AFTER INSERT ON impressions
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tracker_fold_impressions();
