-- Visitor ids are opaque (ULIDs the service makes, or a cookie's value): compared byte by
-- byte ("C"), not by the database's locale. Every click inserts into clicks_visitor, and with
-- a libc locale each comparison there is a strcoll() call: measured on a C.UTF-8 database,
-- that index cost the batch writer 5.4 of its 12.3 ms of COPY per 1,000 clicks, against
-- 0.2 ms bytewise. Only the index is rebuilt (text's bytes do not change), under ACCESS
-- EXCLUSIVE: on a large table the writers wait for it, and the stream holds their events.
-- Lookups by visitor (attribution touches) compare with `=`, which the new index serves.
ALTER TABLE clicks ALTER COLUMN visitor_id TYPE text COLLATE "C";
