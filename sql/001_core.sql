-- The core event path: campaigns, raw click and impression events (time-partitioned),
-- and the 15-minute rollups that reports read.

CREATE TABLE campaigns (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Unique forever, deleted campaigns included: an old ad that still carries a deleted
    -- campaign's link must never start sending its traffic to somebody else's landing page.
    slug            text NOT NULL UNIQUE,
    name            text NOT NULL,
    destination_url text,
    rotation        jsonb NOT NULL DEFAULT '[]',
    fallback_url    text,
    cost_model      text NOT NULL DEFAULT 'none'
                    CHECK (cost_model IN ('cpc', 'cpm', 'cpa', 'revshare', 'none')),
    cost_value      numeric(20, 6) NOT NULL DEFAULT 0 CHECK (cost_value >= 0),
    currency        char(3) NOT NULL DEFAULT 'USD',
    payouts         jsonb NOT NULL DEFAULT '[]',
    postback_url    text,
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'paused')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    deleted_at      timestamptz
);

-- Raw events keep everything a report is built from. The primary key carries the
-- partition key (ts) because PostgreSQL demands it; ids are ULIDs whose time part *is* ts,
-- so a lookup by id names its partition and an id can never exist under two times.
CREATE TABLE clicks (
    id           uuid NOT NULL,
    ts           timestamptz NOT NULL,
    campaign_id  bigint NOT NULL,
    visitor_id   text NOT NULL,
    pub          text NOT NULL DEFAULT '',
    sub1         text NOT NULL DEFAULT '',
    sub2         text NOT NULL DEFAULT '',
    sub3         text NOT NULL DEFAULT '',
    sub4         text NOT NULL DEFAULT '',
    sub5         text NOT NULL DEFAULT '',
    ext_click_id text NOT NULL DEFAULT '',
    utm_source   text NOT NULL DEFAULT '',
    utm_medium   text NOT NULL DEFAULT '',
    utm_campaign text NOT NULL DEFAULT '',
    utm_term     text NOT NULL DEFAULT '',
    utm_content  text NOT NULL DEFAULT '',
    customer_id  text NOT NULL DEFAULT '',
    ip           inet,
    country      text NOT NULL DEFAULT '',
    device       text NOT NULL DEFAULT '',
    user_agent   text NOT NULL DEFAULT '',
    referer      text NOT NULL DEFAULT '',
    is_unique    boolean NOT NULL,
    is_bot       boolean NOT NULL,
    destination  text NOT NULL,
    cost         numeric(20, 6) NOT NULL DEFAULT 0,
    -- When the batch that stored the row began: written_at - ts is the event's way from
    -- its answer (ts) into PostgreSQL, the lag the service promises to keep under 2 s.
    written_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (id, ts)
) PARTITION BY RANGE (ts);

CREATE INDEX clicks_visitor ON clicks (visitor_id, ts);
CREATE INDEX clicks_campaign ON clicks (campaign_id, ts);

CREATE TABLE impressions (
    id          uuid NOT NULL,
    ts          timestamptz NOT NULL,
    campaign_id bigint NOT NULL,
    visitor_id  text NOT NULL,
    pub         text NOT NULL DEFAULT '',
    sub1        text NOT NULL DEFAULT '',
    sub2        text NOT NULL DEFAULT '',
    sub3        text NOT NULL DEFAULT '',
    sub4        text NOT NULL DEFAULT '',
    sub5        text NOT NULL DEFAULT '',
    ip          inet,
    country     text NOT NULL DEFAULT '',
    device      text NOT NULL DEFAULT '',
    user_agent  text NOT NULL DEFAULT '',
    is_bot      boolean NOT NULL,
    cost        numeric(20, 6) NOT NULL DEFAULT 0,
    written_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (id, ts)
) PARTITION BY RANGE (ts);

-- Events whose time falls outside every daily partition (a replay from long ago) land here
-- instead of failing their whole batch.
CREATE TABLE clicks_default PARTITION OF clicks DEFAULT;
CREATE TABLE impressions_default PARTITION OF impressions DEFAULT;

-- 15-minute buckets: every IANA zone's offset is a multiple of 15 minutes, so a local day
-- or hour is always a whole number of buckets (Asia/Kathmandu +05:45 included).
CREATE TABLE rollup_15m (
    bucket          timestamptz NOT NULL,
    campaign_id     bigint NOT NULL,
    pub             text NOT NULL DEFAULT '',
    sub1            text NOT NULL DEFAULT '',
    sub2            text NOT NULL DEFAULT '',
    sub3            text NOT NULL DEFAULT '',
    sub4            text NOT NULL DEFAULT '',
    sub5            text NOT NULL DEFAULT '',
    country         text NOT NULL DEFAULT '',
    device          text NOT NULL DEFAULT '',
    -- The key is a digest of the dimensions, not the dimensions themselves: six free-text
    -- sub ids can outgrow a btree entry, and an unindexable row would wedge the writer.
    dims            uuid GENERATED ALWAYS AS (md5(
                        pub || chr(31) || sub1 || chr(31) || sub2 || chr(31) || sub3 || chr(31)
                        || sub4 || chr(31) || sub5 || chr(31) || country || chr(31) || device
                    )::uuid) STORED,
    impressions     bigint NOT NULL DEFAULT 0,
    bot_impressions bigint NOT NULL DEFAULT 0,
    clicks          bigint NOT NULL DEFAULT 0,
    unique_clicks   bigint NOT NULL DEFAULT 0,
    bot_clicks      bigint NOT NULL DEFAULT 0,
    cost            numeric(20, 6) NOT NULL DEFAULT 0,
    PRIMARY KEY (bucket, campaign_id, dims)
);

CREATE INDEX rollup_15m_campaign ON rollup_15m (campaign_id, bucket);

-- Daily partitions from `days_back` days ago to `days_ahead` days ahead (UTC days).
-- Idempotent; the service calls it at start and every hour.
CREATE FUNCTION tracker_ensure_partitions(days_back int, days_ahead int) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    parent text;
    day date;
    part text;
BEGIN
    -- Every worker calls this; the lock keeps two of them from racing on one CREATE.
    PERFORM pg_advisory_xact_lock(hashtext('tracker_ensure_partitions'));
    FOREACH parent IN ARRAY ARRAY['clicks', 'impressions'] LOOP
        FOR i IN -days_back .. days_ahead LOOP
            day := (now() AT TIME ZONE 'UTC')::date + i;
            part := format('%s_%s', parent, to_char(day, 'YYYYMMDD'));
            IF to_regclass(part) IS NULL THEN
                EXECUTE format(
                    'CREATE TABLE IF NOT EXISTS %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                    part, parent,
                    (day::timestamp AT TIME ZONE 'UTC'), ((day + 1)::timestamp AT TIME ZONE 'UTC'));
            END IF;
        END LOOP;
    END LOOP;
END
$$;

-- Drops whole daily partitions older than `keep_days` (rollups stay: reports outlive raw rows).
CREATE FUNCTION tracker_drop_partitions(keep_days int) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    dropped int := 0;
    cutoff text := to_char((now() AT TIME ZONE 'UTC')::date - keep_days, 'YYYYMMDD');
BEGIN
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

-- Events that PostgreSQL refused one by one (a batch is split until the culprit is alone):
-- kept here with the reason, so that one bad event never wedges the writer nor is lost.
CREATE TABLE dead_letters (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_id  text NOT NULL,
    payload    text NOT NULL,
    error      text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
