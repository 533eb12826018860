//! One chunk compared on both servers: the snapshot on the source, the wait for the target
//! to apply it, the bucket aggregates, and the rows that differ, by key or as a multiset.

use super::*;

pub(super) async fn current_lsn(server: &Server) -> Result<String> {
    Ok(server
        .query_one(
            "read the WAL position",
            "SELECT pg_current_wal_lsn()::text",
            &[],
        )
        .await?
        .get(0))
}

pub(super) async fn confirmed_lsn(source: &Server, slot: &str) -> Result<Option<String>> {
    Ok(source
        .query(
            "read the slot",
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .first()
        .and_then(|r| r.get(0)))
}

/// Waits until the target confirmed the source's `lsn` on the subscription's slot. Without
/// replication there is nothing to wait for; a slot that disappears meanwhile ends the run at
/// once (it used to wait out `catchup_timeout`).
pub(super) async fn wait_applied(shared: &Shared, source: &Server, lsn: &str) -> Result<()> {
    let Some(slot) = &shared.slot else {
        return Ok(());
    };
    let timeout = shared.opts.catchup_timeout;
    let waited =
        crate::replication::wait_confirmed(source, slot, lsn, timeout, Duration::from_millis(20))
            .await?;
    match waited {
        crate::replication::Confirmed::Reached { .. } => Ok(()),
        crate::replication::Confirmed::SlotMissing => {
            Err(ValidateError::SlotMissing(slot.to_string()).into())
        }
        crate::replication::Confirmed::TimedOut => Err(ValidateError::NotConfirmed {
            lsn: lsn.to_string(),
            timeout,
            slot: slot.to_string(),
        }
        .into()),
    }
}

/// A moment between re-checks while replication runs, for a transaction in flight to land.
pub(super) async fn settle(shared: &Shared) {
    if shared.slot.is_some() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `sql` on the source in a fresh snapshot; returns the WAL position the snapshot is
/// complete up to, and the rows.
pub(super) async fn in_snapshot(
    source: &Server,
    sql: &str,
) -> Result<(String, Vec<tokio_postgres::Row>)> {
    source
        .execute(
            "begin a snapshot",
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        )
        .await?;
    // The first statement takes the snapshot; every commit it sees lies before this position.
    let result = async {
        let lsn = current_lsn(source).await?;
        let rows = source.query("checksum the source", sql, &[]).await?;
        Ok::<_, Error>((lsn, rows))
    }
    .await;
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    source.execute("end the snapshot", end).await?;
    result
}

/// Runs `sql` on both servers at once, the source in a snapshot. When the two disagree
/// and replication runs, the target is read again once it has confirmed what the snapshot
/// saw: a disagreement that remains is not lag.
pub(super) async fn on_both<T: PartialEq>(
    pair: &Pair,
    shared: &Shared,
    sql: &str,
    parse: impl Fn(&[tokio_postgres::Row]) -> T,
) -> Result<(T, T)> {
    let (source, target) = tokio::join!(
        in_snapshot(&pair.source, sql),
        pair.target.query("read the target", sql, &[])
    );
    let (lsn, source) = source?;
    let source = parse(&source);
    let mut target = parse(&target?);
    if source != target && shared.slot.is_some() {
        wait_applied(shared, &pair.source, &lsn).await?;
        target = parse(&pair.target.query("read the target again", sql, &[]).await?);
    }
    Ok((source, target))
}

/// What one chunk found.
pub(super) struct ChunkFound {
    pub(super) rows_source: u64,
    pub(super) rows_target: u64,
    pub(super) in_flight: u64,
    pub(super) differences: Vec<Found>,
}

pub(super) struct Found {
    pub(super) kind: Kind,
    /// Rows this stands for (a duplicated row in a table without a key counts each copy).
    pub(super) count: u64,
    pub(super) detail: Difference,
}

/// Bucket aggregates as the checksum queries return them. (The sum of int8 values is always
/// an integer; were it not, the bucket would carry a marker sum and XOR.)
pub(super) fn aggregates(rows: &[tokio_postgres::Row]) -> Aggregates {
    rows.iter()
        .map(|r| {
            let count: i64 = r.get(1);
            let sum: String = r.get(2);
            let folded = fold_bucket(count, &sum, r.get(3)).unwrap_or((count, i64::MIN, i64::MIN));
            (r.get::<_, i32>(0), folded)
        })
        .collect()
}

pub(super) fn rows_in(aggs: &Aggregates) -> u64 {
    aggs.values().map(|a| a.0 as u64).sum()
}

pub(super) fn differing_buckets(a: &Aggregates, b: &Aggregates) -> Vec<i32> {
    let mut buckets: Vec<i32> = a
        .iter()
        .filter(|(k, v)| b.get(k) != Some(v))
        .map(|(k, _)| *k)
        .chain(b.keys().filter(|k| !a.contains_key(k)).copied())
        .collect();
    buckets.sort_unstable();
    buckets.dedup();
    buckets
}

pub(super) async fn check_chunk(
    pair: &Pair,
    shared: &Shared,
    table: &TablePlan,
    chunk: &Chunk,
) -> Result<ChunkFound> {
    let sql = table.aggregates_sql(chunk);
    // Both sides at once: on a quiet or caught-up chunk they agree and nothing waits.
    let (source, target) = tokio::join!(
        in_snapshot(&pair.source, &sql),
        pair.target.query("checksum the target", &sql, &[])
    );
    // A bucket that differs only because the target had not applied what the snapshot saw
    // yet agrees when it is opened: that waits for the target first.
    let (_, source) = source?;
    let source = aggregates(&source);
    let target = aggregates(&target?);
    let mut found = ChunkFound {
        rows_source: rows_in(&source),
        rows_target: rows_in(&target),
        in_flight: 0,
        differences: Vec::new(),
    };
    let buckets = differing_buckets(&source, &target);
    if buckets.is_empty() {
        return Ok(found);
    }
    if table.key.is_empty() {
        compare_multiset(pair, shared, table, chunk, &buckets, &mut found).await?;
    } else {
        compare_keyed(pair, shared, table, chunk, &buckets, &mut found).await?;
    }
    Ok(found)
}

/// A page range of a table in scan mode: partial aggregates on both servers, added to the
/// table's sums. The chunk that completes the table compares the sums and opens the buckets
/// that differ, by key range, in a snapshot, as [`check_chunk`] does: rows that moved while
/// the pages were read (counted twice or not at all) only make a bucket look different until
/// it is opened.
pub(super) async fn scan_chunk(
    pair: &Pair,
    shared: &Shared,
    t: usize,
    whole: &Chunk,
    chunk: &Chunk,
) -> Result<ChunkFound> {
    let table = &shared.plans[t];
    let sql = table.aggregates_sql(chunk);
    let (source, target) = tokio::join!(
        pair.source.query("checksum the source", &sql, &[]),
        pair.target.query("checksum the target", &sql, &[])
    );
    let (source, target) = (
        source.map(|rows| aggregates(&rows)),
        target.map(|rows| aggregates(&rows)),
    );
    let mut found = ChunkFound {
        rows_source: 0,
        rows_target: 0,
        in_flight: 0,
        differences: Vec::new(),
    };
    let complete = {
        let mut partials = lock(&shared.partials);
        let sums = partials.entry(t).or_default();
        sums.chunks_done += 1;
        match (&source, &target) {
            (Ok(s), Ok(d)) => {
                merge(&mut sums.source, s);
                merge(&mut sums.target, d);
                found.rows_source = rows_in(s);
                found.rows_target = rows_in(d);
            }
            _ => sums.failed = true,
        }
        (sums.chunks_done == table.chunks.len() && !sums.failed).then(|| {
            (
                std::mem::take(&mut sums.source),
                std::mem::take(&mut sums.target),
            )
        })
    };
    source?;
    target?;
    if let Some((source, target)) = complete {
        let buckets = differing_buckets(&source, &target);
        if !buckets.is_empty() {
            compare_keyed(pair, shared, table, whole, &buckets, &mut found).await?;
        }
    }
    Ok(found)
}

/// Adds bucket aggregates: counts and sums (mod 2^64) add, XORs XOR.
pub(super) fn merge(into: &mut Aggregates, from: &Aggregates) {
    for (bucket, (count, sum, xor)) in from {
        let total = into.entry(*bucket).or_insert((0, 0, 0));
        total.0 += count;
        total.1 = total.1.wrapping_add(*sum);
        total.2 ^= xor;
    }
}

pub(super) type KeyHashes = BTreeMap<Vec<String>, i64>;

pub(super) fn key_hashes(rows: &[tokio_postgres::Row]) -> KeyHashes {
    rows.iter()
        .map(|r| (r.get::<_, Vec<String>>(0), r.get::<_, i64>(1)))
        .collect()
}

/// The rows of differing buckets, compared by key; then re-checked.
pub(super) async fn compare_keyed(
    pair: &Pair,
    shared: &Shared,
    table: &TablePlan,
    chunk: &Chunk,
    buckets: &[i32],
    found: &mut ChunkFound,
) -> Result<()> {
    // The differing buckets' cells, then the rows of the differing cells.
    let sql = table.cell_aggregates_sql(chunk, buckets);
    let (source, target) = on_both(pair, shared, &sql, aggregates).await?;
    let cells = differing_buckets(&source, &target);
    if cells.is_empty() {
        return Ok(());
    }
    let sql = table.cell_rows_sql(chunk, &cells);
    let (source, target) = on_both(pair, shared, &sql, key_hashes).await?;
    // key → (source hash, target hash, the source changed while re-checking)
    let mut candidates: BTreeMap<Vec<String>, (Option<i64>, Option<i64>, bool)> = source
        .iter()
        .filter(|(k, h)| target.get(*k) != Some(h))
        .map(|(k, h)| (k.clone(), (Some(*h), target.get(k).copied(), false)))
        .chain(
            target
                .iter()
                .filter(|(k, _)| !source.contains_key(*k))
                .map(|(k, h)| (k.clone(), (None, Some(*h), false))),
        )
        .collect();
    for _ in 0..shared.opts.rechecks {
        if candidates.is_empty() {
            break;
        }
        settle(shared).await;
        let keys: Vec<Vec<String>> = candidates.keys().cloned().collect();
        let sql = table.keyed_rows_sql(&keys);
        let (source, target) = on_both(pair, shared, &sql, key_hashes).await?;
        candidates.retain(|key, (was_source, was_target, moved)| {
            let (now_source, now_target) = (source.get(key).copied(), target.get(key).copied());
            if now_source == now_target {
                found.in_flight += 1;
                return false;
            }
            *moved |= now_source != *was_source;
            *was_source = now_source;
            *was_target = now_target;
            true
        });
    }
    let mut persistent = Vec::new();
    for (key, (source, target, moved)) in candidates {
        if moved {
            found.in_flight += 1;
            continue;
        }
        let kind = match (source, target) {
            (Some(_), None) => Kind::Missing,
            (None, Some(_)) => Kind::Extra,
            _ => Kind::Changed,
        };
        persistent.push((key, kind));
    }
    found.differences = detail_keyed(pair, table, persistent).await?;
    Ok(())
}

/// Fetches the differing rows in full on both sides and names the columns that differ.
pub(super) async fn detail_keyed(
    pair: &Pair,
    table: &TablePlan,
    persistent: Vec<(Vec<String>, Kind)>,
) -> Result<Vec<Found>> {
    if persistent.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<Vec<String>> = persistent.iter().map(|(k, _)| k.clone()).collect();
    let sql = table.full_rows_sql(&keys);
    let (source, target) = tokio::join!(
        pair.source.query("read differing rows", &sql, &[]),
        pair.target.query("read differing rows", &sql, &[])
    );
    type Full = HashMap<Vec<String>, (Vec<i64>, Vec<Option<String>>)>;
    let index = |rows: Vec<tokio_postgres::Row>| -> Full {
        rows.into_iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect()
    };
    let (source, target) = (index(source?), index(target?));
    let row_object = |values: &[Option<String>]| -> Map<String, Value> {
        table
            .columns
            .iter()
            .zip(values)
            .map(|(c, v)| (c.name.clone(), v.clone().map_or(Value::Null, Value::String)))
            .collect()
    };
    Ok(persistent
        .into_iter()
        .map(|(key, kind)| {
            let s = source.get(&key);
            let t = target.get(&key);
            let columns = match (s, t) {
                (Some((sh, _)), Some((th, _))) => table
                    .columns
                    .iter()
                    .zip(sh.iter().zip(th))
                    .filter(|(_, (a, b))| a != b)
                    .map(|(c, _)| c.name.clone())
                    .collect(),
                _ => Vec::new(),
            };
            Found {
                kind,
                count: 1,
                detail: Difference {
                    table: table.name.to_string(),
                    key: key_object(&table.key, &key),
                    kind,
                    columns,
                    source: s.map(|(_, v)| row_object(v)),
                    target: t.map(|(_, v)| row_object(v)),
                },
            }
        })
        .collect())
}

pub(super) type HashCounts = BTreeMap<i64, i64>;

/// Without a key: the row hashes of differing buckets as multisets (duplicates count).
pub(super) async fn compare_multiset(
    pair: &Pair,
    shared: &Shared,
    table: &TablePlan,
    chunk: &Chunk,
    buckets: &[i32],
    found: &mut ChunkFound,
) -> Result<()> {
    let sql = table.bucket_hashes_sql(chunk, buckets);
    let counts = |rows: &[tokio_postgres::Row]| -> HashCounts {
        rows.iter()
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
            .collect()
    };
    // hash → source count - target count, over the differing buckets.
    let delta = |s: &HashCounts, t: &HashCounts| -> HashCounts {
        let mut d: HashCounts = s.clone();
        for (h, n) in t {
            *d.entry(*h).or_default() -= n;
        }
        d.retain(|_, n| *n != 0);
        d
    };
    let (source, target) = on_both(pair, shared, &sql, counts).await?;
    let mut diff = delta(&source, &target);
    for _ in 0..shared.opts.rechecks {
        if diff.is_empty() {
            break;
        }
        settle(shared).await;
        let (source, target) = on_both(pair, shared, &sql, counts).await?;
        let now = delta(&source, &target);
        // Only a difference that stays exactly the same is one; the rest moved meanwhile.
        let (same, moved): (HashCounts, HashCounts) =
            diff.into_iter().partition(|(h, n)| now.get(h) == Some(n));
        found.in_flight += moved.values().map(|n| n.unsigned_abs()).sum::<u64>();
        diff = same;
    }
    let hashes: Vec<i64> = diff.keys().copied().collect();
    if hashes.is_empty() {
        return Ok(());
    }
    let rows_sql = table.rows_by_hash_sql(chunk, &hashes);
    let (source, target) = tokio::join!(
        pair.source.query("read differing rows", &rows_sql, &[]),
        pair.target.query("read differing rows", &rows_sql, &[])
    );
    let mut values: HashMap<i64, Vec<Option<String>>> = HashMap::new();
    for r in source?.into_iter().chain(target?) {
        values.entry(r.get(0)).or_insert_with(|| r.get(1));
    }
    for (h, n) in diff {
        let row: Map<String, Value> = table
            .columns
            .iter()
            .zip(values.get(&h).cloned().unwrap_or_default())
            .map(|(c, v)| (c.name.clone(), v.map_or(Value::Null, Value::String)))
            .collect();
        let kind = if n > 0 { Kind::Missing } else { Kind::Extra };
        found.differences.push(Found {
            kind,
            count: n.unsigned_abs(),
            detail: Difference {
                table: table.name.to_string(),
                key: row.clone(),
                kind,
                columns: Vec::new(),
                source: (n > 0).then(|| row.clone()),
                target: (n < 0).then_some(row),
            },
        });
    }
    Ok(())
}
