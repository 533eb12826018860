//! One table's validation plan: its key, its column hashes, its chunks, and the SQL that
//! computes each chunk's aggregates, a bucket's row hashes and the rows themselves.

use super::hashing::{combine, ColumnHash};
use crate::pg::{sql, TableName};

/// A primary-key column, as the chunk bounds compare it.
#[derive(Debug, Clone)]
pub struct KeyColumn {
    pub name: String,
    pub type_sql: String,
    /// The column's collation, `None` for a type without one (integers, uuid …).
    pub collation: Option<String>,
}

impl KeyColumn {
    /// Orders a collatable key by bytes. Both servers must cut chunks and buckets at the same
    /// place, and a collation such as `en_US` may sort differently between their versions
    /// (glibc, ICU); byte order is the same everywhere.
    fn collate(&self) -> &'static str {
        if self.collation.is_some() {
            " COLLATE \"C\""
        } else {
            ""
        }
    }

    /// Whether the key's index serves comparisons in byte order. An index on a column of
    /// another collation cannot: a range in byte order over it is a full scan.
    pub fn index_orders_bytes(&self) -> bool {
        self.collation.as_deref().is_none_or(|c| c == "C")
    }

    /// The column, to order by.
    fn ordered(&self) -> String {
        format!("{}{}", sql::ident(&self.name), self.collate())
    }

    /// A value (text) as a literal of the column's type, for an equality: no collation, so
    /// that the index serves it (equality does not depend on a deterministic collation).
    fn literal(&self, value: &str) -> String {
        format!("{}::{}", sql::literal(value), self.type_sql)
    }

    /// A value (text) as a literal of the column's type, for an order comparison.
    fn bound(&self, value: &str) -> String {
        format!("{}{}", self.literal(value), self.collate())
    }
}

/// A chunk: keys in `[lo, hi)`, unbounded where `None`. Bounds are key values as text.
#[derive(Debug, Clone, Default)]
pub struct Chunk {
    pub lo: Option<Vec<String>>,
    pub hi: Option<Vec<String>>,
    /// With a one-column key: the bounds of the chunk's buckets inside it, in key order.
    /// Bucket `i` holds keys in `[inner[i-1], inner[i])`, so opening one is an index range
    /// scan of a few thousand rows. Empty: buckets are `key hash mod buckets`, and opening
    /// one reads the chunk again.
    pub inner: Vec<String>,
    /// A part of a table scanned in physical order: pages `[from, to)` (`to` open at the
    /// end) instead of a key range. Such chunks give partial bucket aggregates, summed over
    /// the table before they are compared (see [`TablePlan::scan`]).
    pub pages: Option<(i64, Option<i64>)>,
    /// Buckets by arithmetic, for an integer key spread evenly: the bucket of key `k` is
    /// `k / step - base` (integer division, towards zero), so bucket `b` holds the keys `k`
    /// with `k / step = b + base`. Cheaper per row than a binary search over `inner`
    /// (measured on PostgreSQL 17: 8% less time per chunk than `width_bucket` over 1,000
    /// bounds), and opening a bucket is still one index range scan.
    pub step: Option<Step>,
}

/// A key bound: the value, and whether it is inclusive.
type Bound = (i64, bool);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub step: i64,
    pub base: i64,
}

impl Step {
    /// Picks a step for about `buckets` buckets over keys from `min` to `max`, when a
    /// `sample` of the keys (one per sampled page) shows them spread evenly: cut into 16
    /// equal spans, every span holds between half and twice its share of the sample. `None`
    /// for skewed keys (a bucket could then hold many times its share of rows), a sample too
    /// small to tell, or keys so far apart that bucket numbers would not stay small.
    pub fn fit(sample: &[i64], min: i64, max: i64, buckets: i64) -> Option<Step> {
        const SPANS: usize = 16;
        if sample.len() < SPANS * 8 || buckets < 1 || max < min {
            return None;
        }
        let span = i128::from(max) - i128::from(min) + 1;
        let mut counts = [0usize; SPANS];
        for key in sample {
            let at = (i128::from(*key) - i128::from(min)) * SPANS as i128 / span;
            counts[at.clamp(0, SPANS as i128 - 1) as usize] += 1;
        }
        let share = sample.len() / SPANS;
        let even = counts.iter().all(|c| c * 2 >= share && *c <= share * 2);
        let step = i64::try_from((span / i128::from(buckets)).max(1)).ok()?;
        let base = min / step;
        // Bucket numbers times the cells per bucket stay far inside int4, with room for keys
        // beyond the current ones.
        let count = i128::from(max / step - base) + 1;
        (even && count * 4 < (1 << 24)).then_some(Step { step, base })
    }

    /// The keys of bucket `b` as bounds (`lower`, inclusive?; `upper`, inclusive?), `None` for
    /// a side outside the key type's range. Division towards zero makes quotient 0 span
    /// `(-step, step)`, negative quotients `((q - 1) * step, q * step]`.
    fn range(&self, b: i32) -> (Option<Bound>, Option<Bound>) {
        let q = i128::from(b) + i128::from(self.base);
        let step = i128::from(self.step);
        let at = |v: i128| i64::try_from(v).ok();
        match q.cmp(&0) {
            std::cmp::Ordering::Greater => (
                at(q * step).map(|v| (v, true)),
                at((q + 1) * step).map(|v| (v, false)),
            ),
            std::cmp::Ordering::Equal => {
                (at(-step).map(|v| (v, false)), at(step).map(|v| (v, false)))
            }
            std::cmp::Ordering::Less => (
                at((q - 1) * step).map(|v| (v, false)),
                at(q * step).map(|v| (v, true)),
            ),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TablePlan {
    pub name: TableName,
    pub columns: Vec<ColumnHash>,
    /// Empty for a table without a primary key: compared as a multiset of row hashes.
    pub key: Vec<KeyColumn>,
    pub estimated_rows: i64,
    pub chunks: Vec<Chunk>,
    /// Sub-buckets per chunk: a bucket is `key hash mod buckets` (row hash without a key), so
    /// a row missing on one side moves no other row to another bucket.
    pub buckets: i64,
    /// Scan mode, for a large table with a one-column key: its chunks are page ranges, read
    /// by TID range scans (measured on 5 M rows: 0.20 µs a row, against 0.42 µs through the
    /// primary key index), each giving partial aggregates per key-range bucket of the whole
    /// table; this chunk (the whole key range, with every bucket bound) is what the summed
    /// aggregates are compared in, and what a differing bucket is opened in.
    pub scan: Option<Chunk>,
}

/// Cells per bucket (a power of two): see [`TablePlan::cell_aggregates_sql`].
pub const CELLS: i32 = 64;

fn numbers<T: ToString>(list: &[T]) -> String {
    list.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Per-bucket aggregates of a chunk: (count, sum of row hashes mod 2^64, XOR of row hashes).
pub type Aggregates = std::collections::BTreeMap<i32, (i64, i64, i64)>;

impl TablePlan {
    fn key_hash(&self) -> String {
        let positions: Vec<&str> = self
            .columns
            .iter()
            .filter(|c| self.key.iter().any(|k| k.name == c.name))
            .map(|c| c.expr.as_str())
            .collect();
        combine(positions)
    }

    fn rest_hash(&self) -> String {
        combine(
            self.columns
                .iter()
                .filter(|c| !self.key.iter().any(|k| k.name == c.name))
                .map(|c| c.expr.as_str()),
        )
    }

    /// The key as a row value, for comparisons: `("a", "b")` or `"a"`.
    fn key_tuple(&self) -> String {
        let names: Vec<String> = self.key.iter().map(|k| sql::ident(&k.name)).collect();
        if names.len() == 1 {
            names[0].clone()
        } else {
            format!("({})", names.join(", "))
        }
    }

    /// Key values (text) as a literal row value of the key's types, for an equality.
    fn key_literal(&self, values: &[String]) -> String {
        self.key_row(values, KeyColumn::literal)
    }

    /// Key values (text) as a literal row value of the key's types, for an order comparison
    /// (collatable columns in byte order; a row comparison takes each column's collation).
    fn key_bound(&self, values: &[String]) -> String {
        self.key_row(values, KeyColumn::bound)
    }

    fn key_row(&self, values: &[String], each: fn(&KeyColumn, &str) -> String) -> String {
        let parts: Vec<String> = self
            .key
            .iter()
            .zip(values)
            .map(|(k, v)| each(k, v))
            .collect();
        if parts.len() == 1 {
            parts[0].clone()
        } else {
            format!("ROW({})", parts.join(", "))
        }
    }

    pub fn range_predicate(&self, chunk: &Chunk) -> String {
        if let Some((from, to)) = chunk.pages {
            return match to {
                Some(to) => format!("ctid >= '({from},0)'::tid AND ctid < '({to},0)'::tid"),
                None => format!("ctid >= '({from},0)'::tid"),
            };
        }
        let mut parts = Vec::new();
        if let Some(lo) = &chunk.lo {
            parts.push(format!("{} >= {}", self.key_tuple(), self.key_bound(lo)));
        }
        if let Some(hi) = &chunk.hi {
            parts.push(format!("{} < {}", self.key_tuple(), self.key_bound(hi)));
        }
        if parts.is_empty() {
            "true".into()
        } else {
            parts.join(" AND ")
        }
    }

    /// Key columns as text, for the result sets that name rows.
    fn key_texts(&self) -> String {
        self.key
            .iter()
            .map(|k| format!("{}::text", sql::ident(&k.name)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Whether the chunk's buckets are key ranges (see [`Chunk::inner`]).
    fn ranged(&self, chunk: &Chunk) -> bool {
        self.key.len() == 1 && (!chunk.inner.is_empty() || chunk.step.is_some())
    }

    /// The bucket of a row: its key range, or its key hash (row hash without a key) mod the
    /// bucket count. Over the columns of [`TablePlan::hashed_rows`]' inner query.
    fn bucket_expr(&self, chunk: &Chunk) -> String {
        if let (Some(Step { step, base }), true) = (chunk.step, self.ranged(chunk)) {
            format!("({} / {step} - {base})", sql::ident(&self.key[0].name))
        } else if self.ranged(chunk) {
            // The bounds are sorted in byte order (see [`TablePlan::sample_keys_sql`]), and
            // the binary search compares in the collation of its arguments.
            let key = &self.key[0];
            let bounds: Vec<String> = chunk.inner.iter().map(|v| sql::literal(v)).collect();
            format!(
                "width_bucket({}, ARRAY[{}]::{}[])",
                key.ordered(),
                bounds.join(", "),
                key.type_sql
            )
        } else {
            let of = if self.key.is_empty() { "rh" } else { "kh" };
            format!("(({of} & 9223372036854775807) % {})", self.buckets.max(1))
        }
    }

    /// The key range of bucket `b` of a ranged chunk.
    /// Bounded on both sides by the chunk where the bucket is its first or last, so that
    /// the ranges alone select the rows (an index range scan each, OR-ed by a bitmap).
    fn bucket_range(&self, chunk: &Chunk, b: i32) -> String {
        let key = sql::ident(&self.key[0].name);
        // Each side as (operator, value), absent where the bucket is open.
        let (lower, upper) = match chunk.step {
            Some(step) => {
                let (lower, upper) = step.range(b);
                let side = |bound: Option<Bound>, inclusive: &'static str, strict: &'static str| {
                    bound.map(|(v, inc)| (if inc { inclusive } else { strict }, v.to_string()))
                };
                (side(lower, ">=", ">"), side(upper, "<=", "<"))
            }
            None => {
                let literal = |v: &String| self.key_bound(std::slice::from_ref(v));
                let b = b.max(0) as usize;
                let lower = match b {
                    0 => chunk.lo.as_ref().map(|lo| &lo[0]),
                    _ => chunk.inner.get(b - 1),
                };
                let upper = match chunk.inner.get(b) {
                    Some(bound) => Some(bound),
                    None => chunk.hi.as_ref().map(|hi| &hi[0]),
                };
                (
                    lower.map(|v| (">=", literal(v))),
                    upper.map(|v| ("<", literal(v))),
                )
            }
        };
        let parts: Vec<String> = lower
            .into_iter()
            .chain(upper)
            .map(|(op, value)| format!("{key} {op} {value}"))
            .collect();
        if parts.is_empty() {
            "true".into()
        } else {
            format!("({})", parts.join(" AND "))
        }
    }

    /// Rows of a chunk (or only those `narrow` selects in it) with their bucket (`b`), row hash (`h`) and,
    /// `with_keys`, the key columns as text. `OFFSET 0` keeps the planner from inlining the
    /// inner query, which would compute each hash several times; it skips nothing.
    fn hashed_rows(&self, chunk: &Chunk, with_keys: bool, narrow: Option<&str>) -> String {
        let with_keys = with_keys && !self.key.is_empty();
        let outer_keys = if with_keys {
            format!("{}, ", self.key_texts())
        } else {
            String::new()
        };
        let inner_keys = if with_keys || self.ranged(chunk) {
            format!("{}, ", self.key_names())
        } else {
            String::new()
        };
        format!(
            "SELECT {outer_keys}kh # rh AS h, {bucket}::int4 AS b, ((kh >> 40) & {cells})::int4 AS c
               FROM (SELECT {inner_keys}{kh} AS kh, {rh} AS rh FROM {table}
                      WHERE {range} OFFSET 0) hashes",
            bucket = self.bucket_expr(chunk),
            cells = CELLS - 1,
            kh = self.key_hash(),
            rh = self.rest_hash(),
            table = self.name.sql(),
            range = narrow.map_or_else(|| self.range_predicate(chunk), str::to_string),
        )
    }

    fn key_names(&self) -> String {
        self.key
            .iter()
            .map(|k| sql::ident(&k.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The key columns in byte order, for ORDER BY.
    fn key_order(&self, direction: &str) -> String {
        self.key
            .iter()
            .map(|k| format!("{}{direction}", k.ordered()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Per bucket: count, sum and XOR of row hashes. `sum(int8)` accumulates exactly in 128
    /// bits (measured: 15% faster than summing the two 32-bit halves as int4).
    ///
    /// With key-range buckets, the row hash and bucket are computed right over the table, so
    /// that the aggregate reads the scan directly (measured on PostgreSQL 17: 10% less time
    /// per chunk than through the subquery of [`TablePlan::hashed_rows`], whose scan node
    /// copies every row once more).
    pub fn aggregates_sql(&self, chunk: &Chunk) -> String {
        let rows = if self.ranged(chunk) {
            format!(
                "SELECT {kh} # {rh} AS h, {bucket}::int4 AS b FROM {table} WHERE {range} OFFSET 0",
                kh = self.key_hash(),
                rh = self.rest_hash(),
                bucket = self.bucket_expr(chunk),
                table = self.name.sql(),
                range = self.range_predicate(chunk),
            )
        } else {
            self.hashed_rows(chunk, false, None)
        };
        format!(
            "SELECT b, count(*)::int8, sum(h)::text, bit_xor(h)
               FROM ({rows}) r GROUP BY b"
        )
    }

    /// With a key: the rows of the given buckets, read by their key ranges when buckets are
    /// ranges, narrowed to the rows whose (bucket, cell) passes `cells`.
    fn rows_of_buckets(&self, chunk: &Chunk, buckets: &[i32], with_keys: bool) -> String {
        let narrow = self.ranged(chunk).then(|| {
            let ranges: Vec<String> = buckets
                .iter()
                .map(|b| self.bucket_range(chunk, *b))
                .collect();
            format!("({})", ranges.join(" OR "))
        });
        format!(
            "SELECT * FROM ({rows}) r WHERE b IN ({list})",
            rows = self.hashed_rows(chunk, with_keys, narrow.as_deref()),
            list = numbers(buckets),
        )
    }

    /// Per (bucket, cell) of the given buckets: the aggregates of [`TablePlan::aggregates_sql`].
    /// A bucket that differs is split into [`CELLS`] cells by key hash, so that only a few
    /// dozen rows per difference travel to the coordinator.
    pub fn cell_aggregates_sql(&self, chunk: &Chunk, buckets: &[i32]) -> String {
        format!(
            "SELECT b * {CELLS} + c, count(*)::int8, sum(h)::text, bit_xor(h)
               FROM ({rows}) r GROUP BY b, c",
            rows = self.rows_of_buckets(chunk, buckets, false)
        )
    }

    /// Key texts and row hash of the rows in the given cells (`bucket * CELLS + cell`).
    pub fn cell_rows_sql(&self, chunk: &Chunk, cells: &[i32]) -> String {
        let mut buckets: Vec<i32> = cells.iter().map(|c| c.div_euclid(CELLS)).collect();
        buckets.dedup();
        format!(
            "SELECT ARRAY[{keys}], h FROM ({rows}) q WHERE b * {CELLS} + c IN ({list})",
            keys = self
                .key
                .iter()
                .map(|k| format!("q.{}", sql::ident(&k.name)))
                .collect::<Vec<_>>()
                .join(", "),
            rows = self.rows_of_buckets(chunk, &buckets, true),
            list = numbers(cells),
        )
    }

    /// Without a key: the row hashes of the given buckets and how often each occurs.
    pub fn bucket_hashes_sql(&self, chunk: &Chunk, buckets: &[i32]) -> String {
        format!(
            "SELECT h, count(*)::int8 FROM ({rows}) r WHERE b IN ({list}) GROUP BY h",
            rows = self.hashed_rows(chunk, false, None),
            list = numbers(buckets),
        )
    }

    /// Key texts and row hash of the rows with the given keys (any chunk).
    pub fn keyed_rows_sql(&self, keys: &[Vec<String>]) -> String {
        format!(
            "SELECT ARRAY[{texts}], {kh} # {rh} FROM {table} WHERE {tuple} IN ({list})",
            texts = self.key_texts(),
            kh = self.key_hash(),
            rh = self.rest_hash(),
            table = self.name.sql(),
            tuple = self.key_tuple(),
            list = self.key_list(keys),
        )
    }

    fn key_list(&self, keys: &[Vec<String>]) -> String {
        keys.iter()
            .map(|k| self.key_literal(k))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Whole rows for the report: key texts, then each column's hash, then each column's
    /// text (NULL stays NULL).
    pub fn full_rows_sql(&self, keys: &[Vec<String>]) -> String {
        format!(
            "SELECT ARRAY[{texts}], ARRAY[{hashes}]::int8[], ARRAY[{values}]::text[] FROM {table} WHERE {tuple} IN ({list})",
            texts = self.key_texts(),
            hashes = self.column_hashes(),
            values = self.column_texts(),
            table = self.name.sql(),
            tuple = self.key_tuple(),
            list = self.key_list(keys),
        )
    }

    /// Whole rows of a table without a key, by row hash: the hash, each column's text.
    pub fn rows_by_hash_sql(&self, chunk: &Chunk, hashes: &[i64]) -> String {
        let list = numbers(hashes);
        format!(
            "SELECT h, v FROM (SELECT {rh} AS h, ARRAY[{values}]::text[] AS v FROM {table} WHERE {range} OFFSET 0) r WHERE h IN ({list})",
            rh = self.rest_hash(),
            values = self.column_texts(),
            table = self.name.sql(),
            range = self.range_predicate(chunk),
        )
    }

    fn column_hashes(&self) -> String {
        self.columns
            .iter()
            .map(|c| c.expr.clone())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn column_texts(&self) -> String {
        self.columns
            .iter()
            .map(|c| format!("{}::text", sql::ident(&c.name)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The first keys of the table in key order, for calibration: the upper bound of a
    /// probe chunk of `rows` rows (keyset, no OFFSET).
    pub fn probe_bound_sql(&self, rows: i64) -> String {
        format!(
            "SELECT ARRAY[{texts}] FROM (SELECT {names} FROM {table} ORDER BY {up} LIMIT {rows}) k ORDER BY {down} LIMIT 1",
            texts = self.key_texts(),
            names = self.key_names(),
            table = self.name.sql(),
            up = self.key_order(""),
            down = self.key_order(" DESC"),
        )
    }

    /// The smallest and largest key, as text (a one-column key: two index lookups).
    pub fn key_range_sql(&self) -> String {
        let key = sql::ident(&self.key[0].name);
        format!(
            "SELECT min({key})::text, max({key})::text FROM {table}",
            table = self.name.sql()
        )
    }

    /// The first key of each page of a block sample, in key order, from which bounds are
    /// picked. One per page, because the rows of a page often hold neighbouring keys: a
    /// quantile needs many pages, not many rows.
    pub fn sample_keys_sql(&self, percent: f64) -> String {
        format!(
            "SELECT ARRAY[{texts}] FROM (
                 SELECT {names} FROM {table} TABLESAMPLE SYSTEM ({percent})
                  WHERE (ctid::text::point)[1] = 1) f
              ORDER BY {order}",
            texts = self.key_texts(),
            table = self.name.sql(),
            names = self.key_names(),
            order = self.key_order(""),
        )
    }
}

/// Turns key values (text) into a JSON object column → value.
pub fn key_object(
    key: &[KeyColumn],
    values: &[String],
) -> serde_json::Map<String, serde_json::Value> {
    key.iter()
        .zip(values)
        .map(|(k, v)| (k.name.clone(), serde_json::Value::String(v.clone())))
        .collect()
}

/// A bucket's (count, sum of hashes mod 2^64, XOR). PostgreSQL sums int8 exactly (in 128
/// bits, returned as numeric); the sum comes as text and is cut to 64 bits here. `None` if it
/// is not an integer.
pub fn fold_bucket(count: i64, sum: &str, xor: i64) -> Option<(i64, i64, i64)> {
    let sum: i128 = sum.parse().ok()?;
    Some((count, sum as u64 as i64, xor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_fit_even_keys_only() {
        let even: Vec<i64> = (0..256).map(|i| 1_000 + i * 19_531).collect();
        let step = Step::fit(&even, 1, 5_000_000, 1_000).expect("even keys get a step");
        assert_eq!(step.step, 5_000);
        // Half the keys crowded into the first tenth of the range: skewed.
        let skewed: Vec<i64> = (0..128)
            .map(|i| i * 3_900)
            .chain((0..128).map(|i| 500_000 + i * 35_000))
            .collect();
        assert_eq!(Step::fit(&skewed, 0, 5_000_000, 1_000), None);
        assert_eq!(
            Step::fit(&[1, 2, 3], 1, 3, 1),
            None,
            "too small a sample to judge"
        );
        // Keys across the whole int8 range: a huge step, small bucket numbers, and ranges
        // that end where the type does.
        let far: Vec<i64> = (0..1000).map(|i| i * (i64::MAX / 1000)).collect();
        let step = Step::fit(&far, 0, i64::MAX, 1_000).expect("far keys get a step");
        assert_eq!(step.range(i32::MAX).1, None);
    }

    /// A bucket's range holds exactly the keys the SQL expression puts in it, negative keys
    /// and keys below the first bound included (SQL and Rust both divide towards zero).
    #[test]
    fn step_ranges_hold_exactly_their_bucket() {
        let step = Step { step: 10, base: 3 };
        for key in -45i64..=75 {
            let bucket = (key / step.step - step.base) as i32;
            for b in -10..=10 {
                let (lower, upper) = step.range(b);
                let above = lower.is_none_or(|(v, inc)| if inc { key >= v } else { key > v });
                let below = upper.is_none_or(|(v, inc)| if inc { key <= v } else { key < v });
                assert_eq!(above && below, b == bucket, "key {key}, bucket {b}");
            }
        }
    }

    #[test]
    fn hash_sums_wrap_to_64_bits() {
        let hashes: [i64; 4] = [i64::MIN, -1, 0x1234_5678_9abc_def0, i64::MAX];
        let exact: i128 = hashes.iter().map(|h| *h as i128).sum();
        let wrapped = hashes.iter().fold(0i64, |a, h| a.wrapping_add(*h));
        assert_eq!(fold_bucket(4, &exact.to_string(), 0), Some((4, wrapped, 0)));
        assert_eq!(fold_bucket(1, "1.5", 0), None);
    }

    fn plan_keyed_by(key: Vec<KeyColumn>) -> TablePlan {
        TablePlan {
            scan: None,
            name: TableName::new("public", "order_items"),
            columns: Vec::new(),
            key,
            estimated_rows: 0,
            chunks: Vec::new(),
            buckets: 1,
        }
    }

    fn key_column(name: &str, type_sql: &str, collation: Option<&str>) -> KeyColumn {
        KeyColumn {
            name: name.into(),
            type_sql: type_sql.into(),
            collation: collation.map(String::from),
        }
    }

    #[test]
    fn composite_keys_compare_as_rows() {
        let plan = plan_keyed_by(vec![
            key_column("order_id", "integer", None),
            key_column("sku", "text", Some("default")),
        ]);
        let chunk = Chunk {
            pages: None,
            step: None,
            lo: Some(vec!["1".into(), "a'b".into()]),
            hi: None,
            inner: Vec::new(),
        };
        assert_eq!(
            plan.range_predicate(&chunk),
            "(\"order_id\", \"sku\") >= ROW('1'::integer, 'a''b'::text COLLATE \"C\")"
        );
        // Looking rows up by key is an equality: no collation, so the index serves it.
        assert!(plan
            .keyed_rows_sql(&[vec!["1".into(), "x".into()]])
            .ends_with("IN (ROW('1'::integer, 'x'::text))"));
    }

    /// Every place a text key is ordered compares bytes, so that both servers cut at the same
    /// place; an integer key's SQL has no collation at all.
    #[test]
    fn text_keys_are_ordered_by_bytes() {
        let plan = plan_keyed_by(vec![key_column(
            "sku",
            "character varying(20)",
            Some("en_US"),
        )]);
        let chunk = Chunk {
            inner: vec!["b".into(), "m".into()],
            hi: Some(vec!["x".into()]),
            ..Chunk::default()
        };
        assert!(plan.aggregates_sql(&chunk).contains(
            "width_bucket(\"sku\" COLLATE \"C\", ARRAY['b', 'm']::character varying(20)[])"
        ));
        assert_eq!(
            plan.bucket_range(&chunk, 2),
            "(\"sku\" >= 'm'::character varying(20) COLLATE \"C\" \
             AND \"sku\" < 'x'::character varying(20) COLLATE \"C\")"
        );
        assert!(plan
            .sample_keys_sql(1.0)
            .ends_with("ORDER BY \"sku\" COLLATE \"C\""));
        assert!(plan.probe_bound_sql(10).contains(
            "ORDER BY \"sku\" COLLATE \"C\" LIMIT 10) k ORDER BY \"sku\" COLLATE \"C\" DESC"
        ));
        assert!(!plan.key[0].index_orders_bytes());
        assert!(key_column("sku", "text", Some("C")).index_orders_bytes());

        let plan = plan_keyed_by(vec![key_column("id", "bigint", None)]);
        assert!(plan.key[0].index_orders_bytes());
        assert!(!plan.sample_keys_sql(1.0).contains("COLLATE"));
        assert!(!plan.aggregates_sql(&chunk).contains("COLLATE"));
    }
}
