-- Event costs with 9 decimals: a CPM impression costs cost_value / 1000, and cost_value has
-- up to 6 decimals (tracker/money.py), so an impression's cost has up to 9. With 6, such
-- impressions were refused by the writer; now every cost a campaign can have is stored
-- exactly, and N events add up to N times their unit cost.
ALTER TABLE clicks ALTER COLUMN cost TYPE numeric(21, 9);
ALTER TABLE impressions ALTER COLUMN cost TYPE numeric(21, 9);
-- Sums of many events: no fixed number of integer digits to overflow, scale follows the rows.
ALTER TABLE rollup_15m ALTER COLUMN cost TYPE numeric;
