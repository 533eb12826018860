//! Which tables are compared and how each is cut into chunks: keys described, chunk bounds
//! sampled or stepped, and the scan rate probed.

use super::*;

/// Chooses tables, hashes and chunks.
pub(super) async fn plan_tables(
    plan: &Plan,
    pair: &Pair,
    opts: &Options,
) -> Result<Vec<TablePlan>> {
    let all = catalog::tables(&pair.source).await?;
    let selection = catalog::select(plan, all);
    let tables: Vec<&catalog::TableInfo> = selection
        .leaves()
        .filter(|t| {
            opts.tables.is_empty()
                || opts
                    .tables
                    .iter()
                    .any(|p| p.matches(&t.name.schema, &t.name.name))
        })
        .collect();
    if tables.is_empty() {
        return Err(ValidateError::NoTables.into());
    }
    let mut described = Vec::new();
    for t in &tables {
        described.push(describe_columns(&pair.source, &t.name).await?);
    }
    let oids: Vec<u32> = described
        .iter()
        .flat_map(|cols| cols.iter().map(|c| c.oid))
        .collect();
    let types = hashing::resolve_types(&pair.source, oids.iter().copied()).await?;
    let to_test = hashing::types_to_test(&types, &oids);
    let passed = hashing::self_test(&pair.source, &pair.target, &to_test).await?;
    let mut plans = Vec::new();
    for (info, cols) in tables.iter().zip(described) {
        let columns: Vec<ColumnHash> = cols
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let column = hashing::Column {
                    name: &c.name,
                    type_sql: &c.type_sql,
                    oid: c.oid,
                    not_null: c.not_null,
                    position: i as i64 + 1,
                };
                hashing::column_hash(&column, &types, &passed, opts.strict)
            })
            .collect();
        let mut keyed: Vec<&DescribedColumn> = cols.iter().filter(|c| c.key_position > 0).collect();
        keyed.sort_by_key(|c| c.key_position);
        let key: Vec<KeyColumn> = keyed
            .iter()
            .map(|c| KeyColumn {
                name: c.name.clone(),
                type_sql: c.type_sql.clone(),
                collation: c.collation.clone(),
            })
            .collect();
        let cuttable = cuttable(&key);
        let mut table = TablePlan {
            name: info.name.clone(),
            columns,
            key,
            estimated_rows: info.estimated_rows.max(0),
            chunks: vec![Chunk::default()],
            buckets: (info.estimated_rows / opts.bucket_rows).max(1),
            scan: None,
        };
        if cuttable {
            cut_chunks(&pair.source, &mut table, opts).await?;
        }
        plans.push(table);
    }
    Ok(plans)
}

pub(super) struct DescribedColumn {
    pub(super) name: String,
    pub(super) type_sql: String,
    pub(super) oid: u32,
    /// 1-based position in the primary key, 0 when not in it.
    pub(super) key_position: i32,
    /// `None` for a type without collation.
    pub(super) collation: Option<String>,
    pub(super) not_null: bool,
}

/// Whether a table with this key is cut into chunks. Keys are ordered in bytes (see
/// [`KeyColumn`]); a one-column key is chunked by pages and bucketed by key ranges, which
/// the key's index is not needed for. A composite key's chunks are key ranges: where its
/// leading column is collated otherwise its index cannot serve them and every chunk would be
/// a full scan, so such a table stays one chunk, bucketed by key hash.
pub(super) fn cuttable(key: &[KeyColumn]) -> bool {
    match key {
        [] => false,
        [_] => true,
        [first, ..] => first.index_orders_bytes(),
    }
}

pub(super) async fn describe_columns(
    source: &Server,
    table: &TableName,
) -> Result<Vec<DescribedColumn>> {
    let rows = source
        .query(
            "describe columns",
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.atttypid,
                    coalesce((SELECT k.n FROM unnest(pk.indkey) WITH ORDINALITY AS k(att, n) WHERE k.att = a.attnum), 0)::int4,
                    co.collname::text, a.attnotnull
               FROM pg_attribute a
               LEFT JOIN pg_index pk ON pk.indrelid = a.attrelid AND pk.indisprimary
               LEFT JOIN pg_collation co ON co.oid = a.attcollation
              WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
            &[&table.sql()],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| DescribedColumn {
            name: r.get(0),
            type_sql: r.get(1),
            oid: r.get(2),
            key_position: r.get(3),
            collation: r.get(4),
            not_null: r.get(5),
        })
        .collect())
}

/// Cuts a table with a byte-ordered key into chunks of about `chunk_seconds` of hashing
/// each (from a timed probe of the first rows), and, with a one-column key, each chunk into
/// key-range buckets of about `bucket_rows` rows. All bounds come from one block sample of
/// keys: no OFFSET, no full scan.
pub(super) async fn cut_chunks(
    source: &Server,
    table: &mut TablePlan,
    opts: &Options,
) -> Result<()> {
    const PROBE_ROWS: i64 = 20_000;
    let rows = table.estimated_rows;
    if rows < 2 * opts.bucket_rows {
        return Ok(());
    }
    let pages: i32 = source
        .query_one(
            "count pages",
            "SELECT greatest(relpages, 1) FROM pg_class WHERE oid = $1::text::regclass",
            &[&table.name.sql()],
        )
        .await?
        .get(0);
    let wanted_chunks = if rows < 2 * PROBE_ROWS {
        1
    } else {
        let rate = probe_rate(source, table, PROBE_ROWS, pages).await?;
        let chunk_rows = (rate * opts.chunk_seconds).clamp(5_000.0, 20_000_000.0) as i64;
        // A multiple of the jobs, so that no job idles through the last round.
        let jobs = opts.jobs.max(1) as i64;
        let chunks = ((rows + chunk_rows - 1) / chunk_rows).max(1);
        if chunks == 1 {
            1
        } else {
            (chunks as u64).div_ceil(jobs as u64) as i64 * jobs
        }
    };
    let ranged = table.key.len() == 1;
    let wanted_bounds = if ranged {
        (rows / opts.bucket_rows).max(wanted_chunks)
    } else {
        wanted_chunks
    };
    if wanted_bounds <= 1 {
        return Ok(());
    }
    if ranged && wanted_chunks > 1 {
        if let Some(step) = even_step(source, table, wanted_bounds, pages).await? {
            scan_by_pages(table, Buckets::Step(step), wanted_chunks, i64::from(pages));
            return Ok(());
        }
    }
    // About two sampled pages per bound: enough for buckets of roughly even size, and the
    // sample stays a small part of the run.
    let sample = sample_keys(source, table, (wanted_bounds * 2) as f64, pages).await?;
    let n = (wanted_bounds as usize).min(sample.len());
    let mut bounds: Vec<Vec<String>> = (1..n)
        .map(|i| sample[i * sample.len() / n].clone())
        .collect();
    bounds.dedup();
    if bounds.is_empty() {
        return Ok(());
    }
    if ranged && wanted_chunks > 1 {
        scan_by_pages(
            table,
            Buckets::Bounds(bounds),
            wanted_chunks,
            i64::from(pages),
        );
        return Ok(());
    }
    let per_chunk = bounds.len().div_ceil(wanted_chunks as usize).max(1);
    let mut chunks = Vec::new();
    let mut lo: Option<Vec<String>> = None;
    let mut rest = bounds.into_iter().peekable();
    while rest.peek().is_some() {
        let mut inner: Vec<Vec<String>> = rest.by_ref().take(per_chunk).collect();
        // The last bound of a group ends the chunk, unless it is the last bound of all.
        let hi = if rest.peek().is_some() {
            inner.pop()
        } else {
            None
        };
        chunks.push(Chunk {
            lo: lo.clone(),
            hi: hi.clone(),
            inner: if ranged {
                inner.into_iter().map(|mut b| b.remove(0)).collect()
            } else {
                Vec::new()
            },
            pages: None,
            step: None,
        });
        lo = hi;
    }
    if lo.is_some() {
        chunks.push(Chunk {
            lo,
            hi: None,
            inner: Vec::new(),
            pages: None,
            step: None,
        });
    }
    table.buckets = (rows / chunks.len() as i64 / opts.bucket_rows).max(1);
    tracing::debug!(table = %table.name, chunks = chunks.len(), "chunks cut");
    table.chunks = chunks;
    Ok(())
}

/// The first key of about `wanted` of the table's `pages` (see [`TablePlan::sample_keys_sql`]).
pub(super) async fn sample_keys(
    source: &Server,
    table: &TablePlan,
    wanted: f64,
    pages: i32,
) -> Result<Vec<Vec<String>>> {
    let percent = (100.0 * wanted / f64::from(pages)).clamp(0.001, 100.0);
    let rows = source
        .query(
            "sample keys",
            &table.sample_keys_sql((percent * 1000.0).ceil() / 1000.0),
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// How the rows of a table in scan mode are put in buckets.
pub(super) enum Buckets {
    /// Key ranges between these sampled bounds.
    Bounds(Vec<Vec<String>>),
    /// Key ranges of equal width (see [`Chunk::step`]).
    Step(Step),
}

/// For an integer key spread evenly over its range: a [`Step`] for about `buckets` buckets,
/// judged from a small sample (256 pages) and the key's minimum and maximum (read from its
/// index), so that such a table needs no large sample of bounds.
pub(super) async fn even_step(
    source: &Server,
    table: &TablePlan,
    buckets: i64,
    pages: i32,
) -> Result<Option<Step>> {
    let integer_key = matches!(
        table.key[0].type_sql.as_str(),
        "smallint" | "integer" | "bigint"
    );
    if !integer_key {
        return Ok(None);
    }
    let sample: Option<Vec<i64>> = sample_keys(source, table, 256.0, pages)
        .await?
        .iter()
        .map(|key| key.first().and_then(|k| k.parse().ok()))
        .collect();
    let range = source
        .query_one("read the key range", &table.key_range_sql(), &[])
        .await?;
    let parse = |i: usize| {
        range
            .get::<_, Option<String>>(i)
            .and_then(|v| v.parse::<i64>().ok())
    };
    Ok(match (sample, parse(0), parse(1)) {
        (Some(sample), Some(min), Some(max)) => Step::fit(&sample, min, max, buckets),
        _ => None,
    })
}

/// Scan mode (see [`TablePlan::scan`]): `chunks` page ranges over the source's `pages` (the
/// last one open, as the target may have more), all bucketed alike.
pub(super) fn scan_by_pages(table: &mut TablePlan, buckets: Buckets, chunks: i64, pages: i64) {
    let (inner, step) = match buckets {
        Buckets::Bounds(bounds) => (bounds.into_iter().map(|mut b| b.remove(0)).collect(), None),
        Buckets::Step(step) => (Vec::new(), Some(step)),
    };
    let whole = Chunk {
        lo: None,
        hi: None,
        inner,
        pages: None,
        step,
    };
    let per = (pages + chunks - 1) / chunks;
    table.chunks = (0..chunks)
        .map(|i| Chunk {
            pages: Some((i * per, (i + 1 < chunks).then(|| (i + 1) * per))),
            ..whole.clone()
        })
        .collect();
    tracing::debug!(table = %table.name, chunks, step = ?table.chunks.first().and_then(|c| c.step), "scan by pages");
    table.scan = Some(whole);
}

/// Rows per second the source hashes this table at, timed on about `rows` rows of its
/// `pages`: its first keys where the key's index serves byte order, else its first pages
/// (the first keys in byte order of a key indexed in another collation would cost a full
/// scan and sort, and reading them another).
pub(super) async fn probe_rate(
    source: &Server,
    table: &TablePlan,
    rows: i64,
    pages: i32,
) -> Result<f64> {
    let probe = if table.key.first().is_some_and(KeyColumn::index_orders_bytes) {
        let bound: Vec<String> = source
            .query_one("find a probe chunk", &table.probe_bound_sql(rows), &[])
            .await?
            .get(0);
        Chunk {
            hi: Some(bound),
            ..Chunk::default()
        }
    } else {
        let per_page = (table.estimated_rows / i64::from(pages)).max(1);
        Chunk {
            pages: Some((0, Some((rows / per_page).max(1)))),
            ..Chunk::default()
        }
    };
    let began = Instant::now();
    let hashed = source
        .query("time a probe chunk", &table.aggregates_sql(&probe), &[])
        .await?;
    let elapsed = began.elapsed().as_secs_f64().max(1e-4);
    Ok(rows_in(&aggregates(&hashed)).max(1) as f64 / elapsed)
}
