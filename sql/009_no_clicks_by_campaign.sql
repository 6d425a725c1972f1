-- The raw clicks lose their index by campaign (issue 12).
--
-- clicks_campaign (campaign_id, ts) served no query of the service: reports read the
-- rollups, drill-downs the 15-minute rollups, lookups the primary key, attribution the
-- visitor and customer indexes. Yet every click paid for it: measured on the batch writer's
-- COPY of 20,000 clicks, 2 to 6 us of PostgreSQL's 10 to 15 us per row. A scan of one
-- campaign's raw clicks (an export) still reads only the days it asks for: the partitions
-- are daily.
DROP INDEX IF EXISTS clicks_campaign;
