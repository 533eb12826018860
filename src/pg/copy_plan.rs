//! How the copy will run, decided as data: which tables, in which format, split into which
//! page ranges. `switchyard plan` shows it; `sync` runs it.

use serde::Serialize;

use crate::pg::catalog::Selection;
use crate::pg::{PgError, Server, TableName};

/// Page size the split assumes when the server does not say (PostgreSQL's default).
const DEFAULT_BLOCK_SIZE: i64 = 8192;
/// The smallest chunk worth its own COPY: below this a table goes whole (a COPY costs a few
/// round trips and a scan start; at 64 MiB that is well under 1% of its time).
const MIN_CHUNK_BYTES: i64 = 64 << 20;
/// The largest chunk: a retry after a dropped connection repeats at most this much.
const MAX_CHUNK_BYTES: i64 = 1 << 30;
/// Chunks per worker that the split aims for, so that the last ones to finish are small and
/// no worker idles long while another finishes a big table.
const CHUNKS_PER_WORKER: i64 = 4;

/// How a table's rows travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Every column's type is built in: its binary form is the same on both servers.
    Binary,
    /// A column's type is user-defined (an enum, a composite, a domain, an array of one):
    /// binary COPY carries its OID, which differs between the servers.
    Text,
}

impl Format {
    fn option(self) -> &'static str {
        match self {
            Format::Binary => " (FORMAT binary)",
            Format::Text => "",
        }
    }
}

/// One table to copy.
#[derive(Debug, Clone, Serialize)]
pub struct TableCopy {
    #[serde(serialize_with = "as_text")]
    pub name: TableName,
    /// The columns COPY moves (generated ones are computed on the target), quoted.
    #[serde(skip)]
    pub columns: Vec<String>,
    pub format: Format,
    /// Size of its heap on the source.
    pub bytes: i64,
    pub pages: i64,
    pub estimated_rows: i64,
    pub chunks: u32,
}

fn as_text<S: serde::Serializer>(name: &TableName, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(name)
}

/// One COPY: a table whole, or a page range of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Index into [`CopyPlan::tables`].
    pub table: usize,
    pub number: u32,
    pub first_page: i64,
    /// `None`: to the end of the table, whatever it holds by then (the last range is open, so
    /// rows on pages past the size read at planning time are still copied).
    pub end_page: Option<i64>,
    pub estimated_bytes: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CopyPlan {
    pub workers: u32,
    pub chunk_bytes: i64,
    pub tables: Vec<TableCopy>,
    #[serde(skip)]
    pub chunks: Vec<Chunk>,
}

impl CopyPlan {
    pub fn bytes(&self) -> i64 {
        self.tables.iter().map(|t| t.bytes).sum()
    }

    /// `COPY ... TO STDOUT` for `chunk` on the source.
    pub fn copy_out(&self, chunk: &Chunk) -> String {
        let table = &self.tables[chunk.table];
        let columns = table.columns.join(", ");
        let range = match (chunk.first_page, chunk.end_page) {
            (0, None) => String::new(),
            (first, None) => format!(" WHERE ctid >= '({first},0)'::tid"),
            (first, Some(end)) => {
                format!(" WHERE ctid >= '({first},0)'::tid AND ctid < '({end},0)'::tid")
            }
        };
        format!(
            "COPY (SELECT {columns} FROM ONLY {}{range}) TO STDOUT{}",
            table.name.sql(),
            table.format.option()
        )
    }

    /// `COPY ... FROM STDIN` for `chunk` on the target.
    pub fn copy_in(&self, chunk: &Chunk) -> String {
        let table = &self.tables[chunk.table];
        format!(
            "COPY {} ({}) FROM STDIN{}",
            table.name.sql(),
            table.columns.join(", "),
            table.format.option()
        )
    }
}

/// The chunk size for `total` bytes over `workers`: about [`CHUNKS_PER_WORKER`] chunks per
/// worker, within [`MIN_CHUNK_BYTES`] and [`MAX_CHUNK_BYTES`].
pub fn chunk_bytes(total: i64, workers: u32) -> i64 {
    (total / (i64::from(workers.max(1)) * CHUNKS_PER_WORKER))
        .clamp(MIN_CHUNK_BYTES, MAX_CHUNK_BYTES)
}

/// Splits every table into page ranges of about `chunk_bytes`, the largest first (the
/// longest jobs start first, so the copy ends evenly).
pub fn split(tables: &mut [TableCopy], chunk_bytes: i64, block_size: i64) -> Vec<Chunk> {
    let chunk_pages = (chunk_bytes / block_size.max(1)).max(1);
    let mut chunks = Vec::new();
    for (index, table) in tables.iter_mut().enumerate() {
        let count = ((table.pages + chunk_pages - 1) / chunk_pages).max(1);
        table.chunks = count as u32;
        for number in 0..count {
            let first_page = number * chunk_pages;
            let last = number + 1 == count;
            chunks.push(Chunk {
                table: index,
                number: number as u32,
                first_page,
                end_page: (!last).then_some(first_page + chunk_pages),
                estimated_bytes: if last {
                    (table.bytes - first_page * block_size).max(0)
                } else {
                    chunk_pages * block_size
                },
            });
        }
    }
    chunks.sort_by_key(|c| (std::cmp::Reverse(c.estimated_bytes), c.table, c.number));
    chunks
}

/// Each column COPY moves, and whether its type is built in (an OID below
/// FirstNormalObjectId, 16384).
const COLUMNS: &str = "SELECT quote_ident(attname), atttypid < 16384
   FROM pg_attribute WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped
    AND attgenerated = '' ORDER BY attnum";
const SIZE: &str =
    "SELECT pg_relation_size($1::text::regclass), current_setting('block_size')::int8";

/// Reads the selected tables' columns and sizes on the source and plans the copy.
pub async fn make(
    source: &Server,
    selection: &Selection,
    workers: u32,
    chunk_bytes_set: Option<u64>,
) -> Result<CopyPlan, PgError> {
    let mut tables = Vec::new();
    let mut block_size = DEFAULT_BLOCK_SIZE;
    for table in selection.leaves() {
        let name = table.name.sql();
        let rows = source
            .query("read a table's columns", COLUMNS, &[&name])
            .await?;
        let columns: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        let built_in = rows.iter().all(|r| r.get::<_, bool>(1));
        let size = source
            .query_one("read a table's size", SIZE, &[&name])
            .await?;
        let bytes: i64 = size.get(0);
        block_size = size.get(1);
        tables.push(TableCopy {
            name: table.name.clone(),
            columns,
            format: if built_in {
                Format::Binary
            } else {
                Format::Text
            },
            bytes,
            pages: bytes / block_size.max(1),
            estimated_rows: table.estimated_rows.max(0),
            chunks: 1,
        });
    }
    let total = tables.iter().map(|t| t.bytes).sum();
    let chunk_bytes = match chunk_bytes_set {
        Some(set) => (set as i64).max(block_size),
        None => chunk_bytes(total, workers),
    };
    let chunks = split(&mut tables, chunk_bytes, block_size);
    Ok(CopyPlan {
        workers,
        chunk_bytes,
        tables,
        chunks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(name: &str, bytes: i64) -> TableCopy {
        TableCopy {
            name: TableName::new("public".to_string(), name.to_string()),
            columns: vec!["\"id\"".into(), "\"body\"".into()],
            format: Format::Binary,
            bytes,
            pages: bytes / 8192,
            estimated_rows: 0,
            chunks: 1,
        }
    }

    #[test]
    fn chunks_are_a_quarter_of_a_workers_share_within_bounds() {
        assert_eq!(chunk_bytes(0, 4), MIN_CHUNK_BYTES);
        assert_eq!(chunk_bytes(16 << 30, 4), 1 << 30);
        assert_eq!(chunk_bytes(100 << 30, 4), MAX_CHUNK_BYTES);
        assert_eq!(chunk_bytes(4 << 30, 4), 256 << 20);
        assert_eq!(chunk_bytes(4 << 30, 0), 1 << 30);
    }

    #[test]
    fn a_big_table_is_split_into_ranges_whose_last_is_open() {
        let mut tables = vec![table("small", 8192 * 3), table("big", 8192 * 10)];
        let chunks = split(&mut tables, 8192 * 4, 8192);
        assert_eq!((tables[0].chunks, tables[1].chunks), (1, 3));
        let big: Vec<(i64, Option<i64>)> = {
            let mut c: Vec<&Chunk> = chunks.iter().filter(|c| c.table == 1).collect();
            c.sort_by_key(|c| c.number);
            c.iter().map(|c| (c.first_page, c.end_page)).collect()
        };
        assert_eq!(big, vec![(0, Some(4)), (4, Some(8)), (8, None)]);
        // Largest first: the two full ranges, then the small table's 3 pages, then the
        // big table's 2-page tail.
        let order: Vec<(usize, u32)> = chunks.iter().map(|c| (c.table, c.number)).collect();
        assert_eq!(order, vec![(1, 0), (1, 1), (0, 0), (1, 2)]);
        // An empty table is one chunk that reads it whole.
        let mut empty = vec![table("empty", 0)];
        let chunks = split(&mut empty, 8192 * 4, 8192);
        assert_eq!(chunks.len(), 1);
        assert_eq!((chunks[0].first_page, chunks[0].end_page), (0, None));
    }

    #[test]
    fn copy_statements_name_the_range_and_the_format() {
        let mut tables = vec![table("big", 8192 * 10)];
        let chunks = split(&mut tables, 8192 * 4, 8192);
        let plan = CopyPlan {
            workers: 2,
            chunk_bytes: 8192 * 4,
            tables,
            chunks,
        };
        let by_number = |n| plan.chunks.iter().find(|c| c.number == n).unwrap();
        assert_eq!(
            plan.copy_out(by_number(0)),
            "COPY (SELECT \"id\", \"body\" FROM ONLY \"public\".\"big\" WHERE ctid >= '(0,0)'::tid AND ctid < '(4,0)'::tid) TO STDOUT (FORMAT binary)"
        );
        assert_eq!(
            plan.copy_out(by_number(2)),
            "COPY (SELECT \"id\", \"body\" FROM ONLY \"public\".\"big\" WHERE ctid >= '(8,0)'::tid) TO STDOUT (FORMAT binary)"
        );
        assert_eq!(
            plan.copy_in(by_number(1)),
            "COPY \"public\".\"big\" (\"id\", \"body\") FROM STDIN (FORMAT binary)"
        );
        let mut text = plan.clone();
        text.tables[0].format = Format::Text;
        assert!(!text.copy_in(by_number(1)).contains("binary"));
    }
}
