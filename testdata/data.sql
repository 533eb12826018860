-- Rows for testdata/schema.sql; {{rows}} is the number of customers (orders: 2 per customer).
INSERT INTO customers (name, email, mood, born, created_at, prefs, raw_prefs, tags, avatar, external_id, address)
SELECT 'Kunde ' || i || CASE WHEN i % 5 = 0 THEN ' Ærøskøbing 東京' ELSE '' END,
       CASE WHEN i % 4 = 0 THEN NULL WHEN i % 4 = 1 THEN '' ELSE 'c' || i || '@example.com' END,
       (ARRAY['sad', 'ok', 'happy', 'zufrieden ünïcödé'])[1 + i % 4]::mood,
       date '1950-01-01' + (i % 20000),
       timestamptz '2020-01-01 00:00:00+00' + i * interval '17 minutes 3.123456 seconds',
       jsonb_build_object('b', i % 3, 'a', i, 'nested', jsonb_build_object('x', i::numeric / 7)),
       json_build_object('z', i, 'a', 'text ' || i),
       ARRAY['t' || (i % 10), NULL, 'ünï'],
       decode(md5(i::text), 'hex'),
       md5('uuid' || i)::uuid,
       ROW('Street ' || i, CASE WHEN i % 2 = 0 THEN 'Berlin' ELSE 'Zürich' END)::address
  FROM generate_series(1, {{rows}}) AS i;

INSERT INTO orders (customer_id, amount, ratio, score, quantity, ship_within, note)
SELECT 1 + (i % {{rows}}),
       round((i * 3.17)::numeric % 10000, 2),
       CASE WHEN i % 3 = 0 THEN 1.0 WHEN i % 3 = 1 THEN 1.00 ELSE i::numeric / 3 END,
       CASE i % 9 WHEN 0 THEN 'NaN'::float8 WHEN 1 THEN '-0'::float8 WHEN 2 THEN 'Infinity'::float8
                  WHEN 3 THEN '-Infinity'::float8 WHEN 4 THEN 1e-300 ELSE i * 1.1 END,
       1 + i % 50,
       CASE WHEN i % 2 = 0 THEN interval '1 day' ELSE interval '24 hours' END,
       repeat('note ', i % 20)
  FROM generate_series(1, 2 * {{rows}}) AS i;

INSERT INTO order_items (order_id, line, sku, qty)
SELECT o, l, 'SKU-' || (o * 7 + l) % 1000 || CASE WHEN l = 2 THEN 'é' ELSE '' END, l
  FROM generate_series(1, {{rows}}) AS o, generate_series(1, 3) AS l;

INSERT INTO events (at, kind, payload)
SELECT timestamptz '2025-06-01 00:00:00+00' + (i % 1000) * interval '1 second',
       CASE WHEN i % 2 = 0 THEN 'click' ELSE 'view' END,
       jsonb_build_object('i', i % 1000)
  FROM generate_series(1, {{rows}}) AS i;  -- duplicates on purpose

INSERT INTO measurements (id, taken, value)
SELECT i, date '2025-01-01' + (i % 700), sqrt(i)
  FROM generate_series(1, {{rows}}) AS i;

ANALYZE;
