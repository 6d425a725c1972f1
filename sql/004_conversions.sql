-- Conversions (issue 11): postbacks and the conversion pixel, their status history, the
-- rollups reports read, dated exchange rates, and outbound postbacks to traffic sources.

-- Per-campaign postback settings.
--   postback_token:   a secret the network sends as `token` (compared in constant time).
--   postback_secrets: up to two HMAC-SHA256 keys (two, so that a key can be rotated without
--                     refusing the network's postbacks signed with the old one meanwhile).
--   postback_on:      which conversions call postback_url: every accepted or updated one
--                     ('all'), or only those that are approved ('approved').
ALTER TABLE campaigns
    ADD COLUMN postback_token text,
    ADD COLUMN postback_secrets text[] NOT NULL DEFAULT '{}',
    ADD COLUMN postback_on text NOT NULL DEFAULT 'all' CHECK (postback_on IN ('all', 'approved'));

-- The ad platforms' own click ids, as they arrived on the link: kept so that conversions can
-- be sent back to those platforms (offline conversion uploads).
ALTER TABLE clicks
    ADD COLUMN gclid   text NOT NULL DEFAULT '',
    ADD COLUMN gbraid  text NOT NULL DEFAULT '',
    ADD COLUMN wbraid  text NOT NULL DEFAULT '',
    ADD COLUMN fbclid  text NOT NULL DEFAULT '',
    ADD COLUMN ttclid  text NOT NULL DEFAULT '',
    ADD COLUMN msclkid text NOT NULL DEFAULT '';

-- Multi-touch attribution looks a customer's clicks up across devices.
CREATE INDEX clicks_customer ON clicks (customer_id, ts) WHERE customer_id <> '';

-- One row per conversion: (click_id, event, txid). Not partitioned: a unique key on a
-- partitioned table must hold the partition key, and a conversion's identity has no time in
-- it. The id is derived from that identity (tracker/conversion/ids.py), so the primary key
-- *is* the identity's unique key: the authority on "counted once", whatever Redis says.
--
-- The row holds the conversion's latest state (the highest `version`); every state it went
-- through is in conversion_history. Dimensions are copied from the click so that a report
-- can be recounted from these rows alone.
CREATE TABLE conversions (
    id           uuid PRIMARY KEY,
    click_id     uuid NOT NULL,
    click_ts     timestamptz NOT NULL,
    campaign_id  bigint NOT NULL,
    event        text NOT NULL,
    txid         text NOT NULL DEFAULT '',
    version      integer NOT NULL CHECK (version > 0),
    status       text NOT NULL CHECK (status IN ('pending', 'approved', 'declined', 'reversed')),
    -- The network's own word for the status (Keitaro's `sale`, a mapped `confirmed`).
    raw_status   text NOT NULL DEFAULT '',
    -- What the network sent, in its own currency...
    amount       numeric(18, 6) NOT NULL,
    currency     char(3) NOT NULL,
    -- ...and in the campaign's currency, at the rate of the conversion's day (fixed then).
    revenue      numeric(21, 9) NOT NULL,
    -- What the traffic costs for this conversion (cpa, revshare), set when it is approved.
    cost         numeric(21, 9) NOT NULL DEFAULT 0,
    order_value  numeric(18, 6),
    customer_id  text NOT NULL DEFAULT '',
    visitor_id   text NOT NULL DEFAULT '',
    pub          text NOT NULL DEFAULT '',
    sub1         text NOT NULL DEFAULT '',
    sub2         text NOT NULL DEFAULT '',
    sub3         text NOT NULL DEFAULT '',
    sub4         text NOT NULL DEFAULT '',
    sub5         text NOT NULL DEFAULT '',
    country      text NOT NULL DEFAULT '',
    device       text NOT NULL DEFAULT '',
    -- postback, pixel
    source       text NOT NULL DEFAULT 'postback',
    -- When it was first recorded (a report's "conversion time") and last changed.
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    written_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX conversions_click ON conversions (click_id);
CREATE INDEX conversions_campaign ON conversions (campaign_id, created_at);

-- Every state a conversion went through, one row per version.
CREATE TABLE conversion_history (
    conversion_id uuid NOT NULL,
    version       integer NOT NULL,
    ts            timestamptz NOT NULL,
    old_status    text,
    new_status    text NOT NULL,
    raw_status    text NOT NULL DEFAULT '',
    amount        numeric(18, 6) NOT NULL,
    currency      char(3) NOT NULL,
    revenue       numeric(21, 9) NOT NULL,
    -- The sender's network (a /24 or /48), not its address.
    source_net    cidr,
    source        text NOT NULL DEFAULT 'postback',
    PRIMARY KEY (conversion_id, version)
);

-- Conversion figures in 15-minute buckets, twice: by conversion time (basis 'conversion')
-- and by the time of the click it is attributed to (basis 'click'). A change of status adds
-- the difference between the conversion's new and old contribution, so each row always
-- equals a recount of the conversions' current states.
CREATE TABLE conversion_rollup_15m (
    basis               text NOT NULL CHECK (basis IN ('conversion', 'click')),
    bucket              timestamptz NOT NULL,
    campaign_id         bigint NOT NULL,
    pub                 text NOT NULL DEFAULT '',
    sub1                text NOT NULL DEFAULT '',
    sub2                text NOT NULL DEFAULT '',
    sub3                text NOT NULL DEFAULT '',
    sub4                text NOT NULL DEFAULT '',
    sub5                text NOT NULL DEFAULT '',
    country             text NOT NULL DEFAULT '',
    device              text NOT NULL DEFAULT '',
    event               text NOT NULL,
    dims                uuid GENERATED ALWAYS AS (md5(
                            pub || chr(31) || sub1 || chr(31) || sub2 || chr(31) || sub3
                            || chr(31) || sub4 || chr(31) || sub5 || chr(31) || country
                            || chr(31) || device || chr(31) || event
                        )::uuid) STORED,
    conversions         bigint NOT NULL DEFAULT 0,
    revenue             numeric NOT NULL DEFAULT 0,
    pending_conversions bigint NOT NULL DEFAULT 0,
    pending_revenue     numeric NOT NULL DEFAULT 0,
    cost                numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (basis, bucket, campaign_id, dims)
);

CREATE INDEX conversion_rollup_15m_campaign ON conversion_rollup_15m (campaign_id, bucket);

-- Operator-set exchange rates: on `day`, 1 `base` = `rate` `quote`. A conversion on day D
-- uses the latest rate dated D or before.
CREATE TABLE fx_rates (
    day        date NOT NULL,
    base       char(3) NOT NULL,
    quote      char(3) NOT NULL,
    rate       numeric(24, 12) NOT NULL CHECK (rate > 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (base, quote, day),
    CHECK (base <> quote)
);

-- Outbound postbacks: an outbox filled by the batch writer in the same transaction that
-- records the conversion's change, so a delivery exists exactly when the change does.
-- Deliverers claim due rows with FOR UPDATE SKIP LOCKED and push next_try_at past the
-- try's timeout (a lease): a deliverer killed mid-try leaves the row due again afterwards.
CREATE TABLE postback_deliveries (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    conversion_id uuid NOT NULL,
    version       integer NOT NULL,
    campaign_id   bigint NOT NULL,
    url           text NOT NULL,
    state         text NOT NULL DEFAULT 'pending'
                  CHECK (state IN ('pending', 'delivered', 'failed')),
    tries         integer NOT NULL DEFAULT 0,
    next_try_at   timestamptz NOT NULL DEFAULT now(),
    created_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    last_error    text,
    UNIQUE (conversion_id, version)
);

CREATE INDEX postback_deliveries_due ON postback_deliveries (next_try_at) WHERE state = 'pending';

CREATE TABLE postback_tries (
    delivery_id  bigint NOT NULL REFERENCES postback_deliveries (id) ON DELETE CASCADE,
    n            integer NOT NULL,
    ts           timestamptz NOT NULL DEFAULT now(),
    http_status  integer,
    latency_ms   numeric(12, 3),
    error        text,
    PRIMARY KEY (delivery_id, n)
);
