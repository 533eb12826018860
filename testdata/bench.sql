-- A wide-enough table for the validation benchmark: {{rows}} rows of the column types
-- applications use most. Deterministic: loading it on both servers gives the same rows.
CREATE TABLE bench_rows (
    id          bigint PRIMARY KEY,
    customer_id integer NOT NULL,
    status      text NOT NULL,
    amount      numeric(12, 2),
    created_at  timestamptz NOT NULL,
    note        text
);
INSERT INTO bench_rows
SELECT i,
       1 + i % 100000,
       (ARRAY['new', 'paid', 'shipped', 'returned'])[1 + i % 4],
       (i % 1000000) / 100.0,
       timestamptz '2024-01-01 00:00:00+00' + i * interval '1.5 seconds',
       CASE WHEN i % 3 = 0 THEN NULL ELSE 'note for order ' || i END
  FROM generate_series(1, {{rows}}) AS i;
ANALYZE bench_rows;
