//! The `ingest` stage: streams Parquet / JSONL / CSV input through column mapping, row filters,
//! null dropping and deduplication, then splits the kept rows into train / eval (/ test).
//!
//! # Artifact (the contract downstream stages rely on)
//! In `ctx.out_dir`:
//! * `train.parquet`, `eval.parquet`, and `test.parquet` when the config declares a test split —
//!   all with the same columns: the selected columns after renaming, in selection order, with the
//!   input's Arrow types (snappy-compressed Parquet, row groups of at most 64k rows).
//! * No split the config asks rows for is written empty: the stage fails instead, naming itself and
//!   the split (an empty file would only fail a later stage, pointing into the cache).
//! * `stats.json`: rows read, rows kept, rows per split (and per stratum), nulls per column of the
//!   input and of each split, string-length percentiles (characters) of the kept rows, and the
//!   rows dropped by each filter, by `drop_nulls` and by `dedup`.
//!
//! # How memory stays flat
//! Two passes over the input, one record batch at a time. Pass 1 evaluates the filters and
//! records one bit per input row (kept or not); dedup key hashes go to hash-partitioned scratch
//! files (resolved one partition at a time, first occurrence wins), giving the kept-row count of
//! each stratum. Exact per-stratum split quotas follow; pass 2 re-reads the input, assigns each kept
//! row its split by sequential sampling from the remaining quotas (seeded), and streams rows into
//! an external shuffle (random buckets spilled as Arrow IPC streams through 64 KiB buffers,
//! permuted one at a time) or straight into the writers. Memory: one batch, one bucket (≤ ~32 MB
//! estimated), the writers' row groups, 1 bit per input row, one counter per stratum — measured
//! flat by `peftpipe bench data` (92 MiB peak at 1M rows, 96 MiB at 4M). Scratch files live in
//! `out_dir/.scratch*` and are removed before returning.
//!
//! The stage never prints: progress goes through `ctx.progress`.

use std::collections::BTreeMap;

use arrow::array::{Array, RecordBatch, StringArray};
use indexmap::IndexMap;
use serde::Serialize;

use crate::config::ingest::SplitSizes;
use crate::config::{IngestConfig, InputFile};
use crate::data::artifact::{write_json, ParquetSink};
use crate::data::filter::{csv_text_filter_problems, key_hashes, stratum_values, RowFilters};
use crate::data::source::{self, SourceSpec};
use crate::data::spill::{take_rows, DedupSpill, RowBitmap, Shuffler};
use crate::data::split::{split_quotas, SplitAssigner, SPLITS, SPLIT_NAMES};
use crate::data::stats::{ColumnStats, LengthSummary};

use super::{derive_seed, Progress, Stage, StageContext, StageError, StageOutcome};

/// Most distinct values a stratify column may have.
const MAX_STRATA: usize = 100_000;
/// Target (estimated in-memory) size of one shuffle bucket.
const SHUFFLE_BUCKET_BYTES: f64 = 32.0 * 1024.0 * 1024.0;
/// Stratum name used when the split is not stratified.
const ALL_ROWS: &str = "*";

/// Fail when a split the config asks rows for would be written empty: downstream stages (train,
/// evaluate, few-shot draws) would fail later on an empty file inside the cache, far from the
/// cause. A split declared with size 0 may stay empty.
fn check_no_empty_split(
    stage: &str,
    files: &[InputFile],
    sizes: &SplitSizes,
    split_rows: &[u64],
    rows_read: u64,
    rows_kept: u64,
) -> Result<(), StageError> {
    for (index, &rows) in split_rows.iter().enumerate() {
        let (wanted, why) = match sizes {
            SplitSizes::Fractions(fractions) => (
                fractions[index] > 0.0,
                format!(
                    "the split's fraction {} of them rounds to none",
                    fractions[index]
                ),
            ),
            SplitSizes::Counts(counts) => match index {
                0 => (
                    true,
                    format!(
                        "the other splits' counts ({}) take them all",
                        counts
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(" + ")
                    ),
                ),
                _ => (
                    counts[index - 1] > 0,
                    format!("its count {} gets none of them", counts[index - 1]),
                ),
            },
        };
        if wanted && rows == 0 {
            let name = SPLIT_NAMES[index];
            let cause = if rows_read == 0 {
                // Nothing was read at all: the input is at fault, so name it.
                format!("{} no rows", describe_inputs(files))
            } else if rows_kept == 0 {
                format!(
                    "no row of the {rows_read} read is left after filters, drop_nulls and dedup"
                )
            } else {
                format!("{rows_kept} rows are kept and {why}")
            };
            return Err(StageError::user(format!(
                "ingest stage `{stage}` would write an empty `{name}` split: {cause}; add rows, loosen the filters or change split sizes"
            )));
        }
    }
    Ok(())
}

/// The input files as the pipeline names them, for "… hold(s) no rows" (the first few of many).
fn describe_inputs(files: &[InputFile]) -> String {
    const SHOWN: usize = 3;
    let names: Vec<&str> = files
        .iter()
        .take(SHOWN)
        .map(|file| file.key.as_str())
        .collect();
    match files.len() {
        0 => "the input holds".to_string(),
        1 => format!("{} holds", names.join("")),
        count if count <= SHOWN => format!("the inputs {} hold", names.join(", ")),
        count => format!(
            "the {count} inputs ({}, and {} more) hold",
            names.join(", "),
            count - SHOWN
        ),
    }
}

pub struct IngestStage {
    config: IngestConfig,
}

impl IngestStage {
    pub fn new(config: IngestConfig) -> Self {
        IngestStage { config }
    }
}

/// `stats.json`.
#[derive(Debug, Serialize)]
pub struct IngestStats {
    /// Input file keys (paths as written).
    pub files: Vec<String>,
    pub rows_read: u64,
    /// Nulls per (mapped) column among the rows read.
    pub input_nulls: BTreeMap<String, u64>,
    pub dropped: DroppedRows,
    pub rows_kept: u64,
    pub splits: IndexMap<String, SplitStats>,
    /// Character-length percentiles of each string column over the kept rows.
    pub text_lengths: BTreeMap<String, LengthSummary>,
    /// Column the split was stratified by, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stratify_by: Option<String>,
}

/// Rows dropped, by cause.
#[derive(Debug, Serialize)]
pub struct DroppedRows {
    /// Per filter, in order (a row counts against the first filter that drops it).
    pub filters: Vec<FilterDrop>,
    pub drop_nulls: u64,
    pub dedup: u64,
}

#[derive(Debug, Serialize)]
pub struct FilterDrop {
    pub filter: String,
    pub rows: u64,
}

#[derive(Debug, Serialize)]
pub struct SplitStats {
    pub rows: u64,
    pub nulls: BTreeMap<String, u64>,
    /// Rows per stratum value (when stratified); a value that is the text `null` is one.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub strata: BTreeMap<String, u64>,
    /// Rows of the stratum of nulls (when stratified and the column has nulls).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub null_stratum: Option<u64>,
}

/// A stratum of the split: a value of the stratify column, or the rows where it is null (a
/// stratum of their own, apart from a value that is the text `null`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stratum {
    Value(String),
    Null,
}

impl Stratum {
    /// The order of strata (which decides the quotas' rounding): by text, the nulls where the
    /// text `null` sorts and after it, so splits of data without that text are as they were
    /// when nulls were named `null`.
    fn sort_key(&self) -> (&str, bool) {
        match self {
            Stratum::Value(value) => (value, false),
            Stratum::Null => ("null", true),
        }
    }
}

impl Ord for Stratum {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.sort_key().cmp(&other.sort_key())
    }
}

impl PartialOrd for Stratum {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::fmt::Display for Stratum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stratum::Value(value) => write!(f, "stratum `{value}`"),
            Stratum::Null => write!(f, "the stratum of nulls"),
        }
    }
}

/// Stratum → a small id, found from a row's value without allocating.
#[derive(Default)]
struct StratumIds {
    values: IndexMap<String, u32>,
    null: Option<u32>,
    /// By id.
    strata: Vec<Stratum>,
}

impl StratumIds {
    /// The id of a value (`None`: null), if seen.
    fn get(&self, value: Option<&str>) -> Option<u32> {
        match value {
            Some(value) => self.values.get(value).copied(),
            None => self.null,
        }
    }

    /// A new id for a value not seen yet.
    fn insert(&mut self, value: Option<&str>) -> u32 {
        let id = self.strata.len() as u32;
        match value {
            Some(value) => {
                self.values.insert(value.to_string(), id);
                self.strata.push(Stratum::Value(value.to_string()));
            }
            None => {
                self.null = Some(id);
                self.strata.push(Stratum::Null);
            }
        }
        id
    }

    fn len(&self) -> usize {
        self.strata.len()
    }
}

/// A row's stratify value (`None`: null), or [`ALL_ROWS`] when the split is not stratified.
fn row_stratum(strata: Option<&StringArray>, row: usize) -> Option<&str> {
    match strata {
        Some(values) if values.is_null(row) => None,
        Some(values) => Some(values.value(row)),
        None => Some(ALL_ROWS),
    }
}

enum SplitWriter {
    Direct(Box<ParquetSink>),
    Shuffled(Box<(Shuffler, ParquetSink)>),
}

impl Stage for IngestStage {
    fn run(&self, ctx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
        let config = &self.config;
        let files = config.files(ctx.project_dir).map_err(StageError::User)?;
        let spec = SourceSpec {
            files: files.clone(),
            format: config.format,
            columns: config.columns.clone(),
            rename: config.rename.clone(),
            types: config.types.clone(),
            limit: config.limit,
        };
        let schema = source::mapped_schema(&spec)?;
        if source::is_csv(&spec) {
            if let Some((index, message)) =
                csv_text_filter_problems(&config.filters, &config.rename, &config.types)
                    .into_iter()
                    .next()
            {
                return Err(StageError::user(format!("filters[{index}]: {message}")));
            }
        }
        let filters = RowFilters::compile(&config.filters, config.drop_nulls, &schema)?;
        let column_index = |name: &str, what: &str| {
            schema.index_of(name).map_err(|_| {
                StageError::user(format!("{what} column `{name}` is not an output column"))
            })
        };
        let dedup_columns: Vec<usize> = config
            .dedup
            .iter()
            .map(|name| column_index(name, "dedup"))
            .collect::<Result<_, _>>()?;
        let stratify = match &config.split.stratify_by {
            Some(name) => Some(column_index(name, "stratify_by")?),
            None => None,
        };
        let known_rows = source::known_row_count(&spec);
        let scratch = tempfile::Builder::new()
            .prefix(".scratch")
            .tempdir_in(ctx.out_dir)
            .map_err(|e| StageError::user(format!("cannot create a scratch directory: {e}")))?;

        // Pass 1: filters, dedup keys, strata.
        let mut keep = RowBitmap::default();
        let mut dedup = if dedup_columns.is_empty() {
            None
        } else {
            Some(DedupSpill::new(scratch.path())?)
        };
        let mut strata_ids = StratumIds::default();
        let mut strata_counts: Vec<u64> = Vec::new();
        let mut dropped_by_filter = vec![0u64; config.filters.len()];
        let mut dropped_by_nulls = 0u64;
        let mut input_stats = ColumnStats::default();
        let mut kept_bytes = 0f64;
        let (rows_read, _) = source::scan(&spec, |batch, origin| {
            ctx.check_cancel()?;
            let outcome = filters
                .apply(&batch)
                .map_err(|e| StageError::user(format!("{origin}: {e}")))?;
            for (total, dropped) in dropped_by_filter.iter_mut().zip(&outcome.dropped_by_filter) {
                *total += dropped;
            }
            dropped_by_nulls += outcome.dropped_by_nulls;
            input_stats.add(&batch, false);
            let kept_here = outcome.keep.true_count();
            if batch.num_rows() > 0 {
                kept_bytes += batch.get_array_memory_size() as f64 * kept_here as f64
                    / batch.num_rows() as f64;
            }
            let hashes = match &dedup {
                Some(_) => Some(
                    key_hashes(&batch, &dedup_columns)
                        .map_err(|e| StageError::user(format!("{origin}: {e}")))?,
                ),
                None => None,
            };
            let strata = match stratify {
                Some(index) => Some(
                    stratum_values(&batch, index)
                        .map_err(|e| StageError::user(format!("{origin}: {e}")))?,
                ),
                None => None,
            };
            for row in 0..batch.num_rows() {
                let kept = outcome.keep.value(row);
                keep.push(kept);
                if !kept {
                    continue;
                }
                let value = row_stratum(strata.as_ref(), row);
                let id = match strata_ids.get(value) {
                    Some(id) => id,
                    None => {
                        if strata_ids.len() >= MAX_STRATA {
                            return Err(StageError::user(format!(
                                "split.stratify_by: column `{}` has more than {MAX_STRATA} distinct values; stratify by a label column",
                                config.split.stratify_by.as_deref().unwrap_or_default()
                            )));
                        }
                        strata_counts.push(0);
                        strata_ids.insert(value)
                    }
                };
                match (&mut dedup, &hashes) {
                    (Some(spill), Some(hashes)) => {
                        spill.push(hashes[row], origin.first_row + row as u64, id)?
                    }
                    _ => strata_counts[id as usize] += 1,
                }
            }
            ctx.progress.progress(Progress {
                position: origin.first_row + batch.num_rows() as u64,
                length: known_rows,
                unit: "rows",
                message: "pass 1/2: filter and dedup".into(),
            });
            Ok(())
        })?;
        let duplicates = match dedup {
            Some(spill) => {
                let mut counts = vec![0u64; strata_counts.len()];
                let duplicates = spill.resolve(&mut keep, &mut counts)?;
                counts.resize(strata_counts.len(), 0);
                strata_counts = counts;
                duplicates
            }
            None => 0,
        };
        let strata: BTreeMap<Stratum, u64> = strata_ids
            .strata
            .iter()
            .zip(&strata_counts)
            .map(|(stratum, &count)| (stratum.clone(), count))
            .collect();
        let rows_kept: u64 = strata.values().sum();
        let quotas = split_quotas(&strata, &config.split.sizes()).map_err(StageError::User)?;
        let mut split_rows = [0u64; SPLITS];
        for quota in quotas.values() {
            for (total, rows) in split_rows.iter_mut().zip(quota) {
                *total += rows;
            }
        }
        let split_count = if config.split.has_test() { 3 } else { 2 };
        check_no_empty_split(
            ctx.name,
            &files,
            &config.split.sizes(),
            &split_rows[..split_count],
            rows_read,
            rows_kept,
        )?;

        // Pass 2: assign splits and write.
        let stage_seed = ctx.stage_seed();
        let mut writers: Vec<SplitWriter> = Vec::with_capacity(split_count);
        for (split, name) in SPLIT_NAMES.iter().enumerate().take(split_count) {
            let sink = ParquetSink::create(
                &ctx.out_dir.join(format!("{name}.parquet")),
                schema.clone(),
                true,
            )?;
            writers.push(if config.shuffle {
                let estimate = if rows_kept == 0 {
                    0.0
                } else {
                    kept_bytes * split_rows[split] as f64 / rows_kept as f64
                };
                let buckets = (estimate / SHUFFLE_BUCKET_BYTES).ceil().clamp(1.0, 4096.0) as usize;
                let shuffler = Shuffler::new(
                    scratch.path(),
                    name,
                    schema.clone(),
                    buckets,
                    derive_seed(stage_seed, &format!("shuffle-{name}")),
                )?;
                SplitWriter::Shuffled(Box::new((shuffler, sink)))
            } else {
                SplitWriter::Direct(Box::new(sink))
            });
        }
        // By id, so a row finds its stratum's quotas without allocating.
        let quotas_by_id: BTreeMap<u32, [u64; SPLITS]> = strata_ids
            .strata
            .iter()
            .enumerate()
            .filter_map(|(id, stratum)| Some((id as u32, *quotas.get(stratum)?)))
            .collect();
        let mut assigner = SplitAssigner::new(quotas_by_id, derive_seed(stage_seed, "split"));
        let mut split_stats: Vec<ColumnStats> = vec![ColumnStats::default(); split_count];
        let mut kept_stats = ColumnStats::default();
        let pass_two_spec = SourceSpec {
            limit: Some(rows_read),
            ..spec.clone()
        };
        source::scan(&pass_two_spec, |batch, origin| {
            ctx.check_cancel()?;
            let strata = match stratify {
                Some(index) => Some(
                    stratum_values(&batch, index)
                        .map_err(|e| StageError::user(format!("{origin}: {e}")))?,
                ),
                None => None,
            };
            let mut rows: Vec<Vec<u32>> = vec![Vec::new(); split_count];
            for row in 0..batch.num_rows() {
                if !keep.get(origin.first_row + row as u64) {
                    continue;
                }
                let value = row_stratum(strata.as_ref(), row);
                let named = |message: &str| {
                    let stratum = match value {
                        Some(value) => Stratum::Value(value.to_string()),
                        None => Stratum::Null,
                    };
                    StageError::user(format!("{origin}: {stratum}: {message}"))
                };
                let id = strata_ids.get(value).ok_or_else(|| {
                    named("not seen in the first pass; did the input change while it was read?")
                })?;
                let split = assigner.assign(&id).map_err(|e| named(&e))?;
                rows[split].push(row as u32);
            }
            for (split, rows) in rows.into_iter().enumerate() {
                if rows.is_empty() {
                    continue;
                }
                let part: RecordBatch = take_rows(&batch, rows)?;
                split_stats[split].add(&part, false);
                kept_stats.add(&part, true);
                match &mut writers[split] {
                    SplitWriter::Direct(sink) => sink.write(&part)?,
                    SplitWriter::Shuffled(pair) => pair.0.push(part)?,
                }
            }
            ctx.progress.progress(Progress {
                position: origin.first_row + batch.num_rows() as u64,
                length: Some(rows_read),
                unit: "rows",
                message: "pass 2/2: split and write".into(),
            });
            Ok(())
        })?;
        for writer in writers {
            ctx.check_cancel()?;
            match writer {
                SplitWriter::Direct(sink) => {
                    sink.finish()?;
                }
                SplitWriter::Shuffled(pair) => {
                    let (shuffler, mut sink) = *pair;
                    shuffler.finish(&mut sink)?;
                    sink.finish()?;
                }
            }
        }
        drop(scratch);

        let mut splits = IndexMap::new();
        for (split, stats) in split_stats.iter().enumerate() {
            let mut per_stratum: BTreeMap<String, u64> = BTreeMap::new();
            let mut null_stratum = None;
            if stratify.is_some() {
                for (stratum, quota) in &quotas {
                    match stratum {
                        Stratum::Value(value) => {
                            per_stratum.insert(value.clone(), quota[split]);
                        }
                        Stratum::Null => null_stratum = Some(quota[split]),
                    }
                }
            }
            splits.insert(
                SPLIT_NAMES[split].to_string(),
                SplitStats {
                    rows: stats.rows,
                    nulls: schema
                        .fields()
                        .iter()
                        .map(|f| {
                            (
                                f.name().clone(),
                                stats.nulls.get(f.name()).copied().unwrap_or(0),
                            )
                        })
                        .collect(),
                    strata: per_stratum,
                    null_stratum,
                },
            );
        }
        let stats = IngestStats {
            files: files.iter().map(|f| f.key.clone()).collect(),
            rows_read,
            input_nulls: input_stats.nulls.clone(),
            dropped: DroppedRows {
                filters: filters
                    .descriptions()
                    .into_iter()
                    .zip(&dropped_by_filter)
                    .map(|(filter, &rows)| FilterDrop { filter, rows })
                    .collect(),
                drop_nulls: dropped_by_nulls,
                dedup: duplicates,
            },
            rows_kept,
            splits,
            text_lengths: kept_stats.length_summaries(),
            stratify_by: config.split.stratify_by.clone(),
        };
        write_json(&ctx.out_dir.join("stats.json"), &stats)?;
        ctx.progress.note(format!(
            "read {rows_read} rows, kept {rows_kept} ({} filtered, {dropped_by_nulls} with nulls, {duplicates} duplicates)",
            dropped_by_filter.iter().sum::<u64>()
        ));

        let mut summary = BTreeMap::new();
        summary.insert("rows_read".into(), rows_read.into());
        summary.insert("rows_kept".into(), rows_kept.into());
        for (split, name) in SPLIT_NAMES.iter().enumerate().take(split_count) {
            summary.insert(format!("{name}_rows"), split_rows[split].into());
        }
        summary.insert("duplicates".into(), duplicates.into());
        Ok(StageOutcome { summary })
    }
}
