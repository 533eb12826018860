-- The types that break migrations, in one schema. Used by tests, the demo and benchmarks.
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'zufrieden ünïcödé');
CREATE DOMAIN positive_int AS integer CHECK (VALUE > 0);
CREATE TYPE address AS (street text, city text);

CREATE TABLE customers (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL,
    email       text,
    mood        mood,
    born        date,
    created_at  timestamptz NOT NULL DEFAULT now(),
    prefs       jsonb,
    raw_prefs   json,
    tags        text[],
    avatar      bytea,
    external_id uuid,
    address     address
);

CREATE TABLE orders (
    id             serial PRIMARY KEY,
    customer_id    bigint NOT NULL REFERENCES customers (id),
    amount         numeric(12, 2),
    ratio          numeric,
    score          float8,
    quantity       positive_int,
    ship_within    interval,
    note           text,
    amount_with_tax numeric GENERATED ALWAYS AS (amount * 1.2) STORED
);
CREATE INDEX orders_customer_idx ON orders (customer_id);

-- A composite primary key with a "C"-collated text column.
CREATE TABLE order_items (
    order_id integer NOT NULL,
    line     integer NOT NULL,
    sku      text COLLATE "C" NOT NULL,
    qty      integer NOT NULL,
    PRIMARY KEY (order_id, line)
);

-- No primary key: rows are found by their whole content.
CREATE TABLE events (
    at      timestamptz NOT NULL,
    kind    text,
    payload jsonb
);
ALTER TABLE events REPLICA IDENTITY FULL;

CREATE TABLE measurements (
    id    bigint NOT NULL,
    taken date NOT NULL,
    value float8,
    PRIMARY KEY (id, taken)
) PARTITION BY RANGE (taken);
CREATE TABLE measurements_2025 PARTITION OF measurements FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE measurements_2026 PARTITION OF measurements FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');

CREATE FUNCTION customer_label(c customers) RETURNS text LANGUAGE sql IMMUTABLE
    AS $$ SELECT c.name || ' <' || coalesce(c.email, '-') || '>' $$;
