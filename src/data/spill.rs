//! Bounded-memory helpers for the ingest stage, spilling to scratch files when the data is large:
//!
//! * [`RowBitmap`]: one bit per input row (which rows survive filters and dedup).
//! * [`DedupSpill`]: exact deduplication by 128-bit blake3 key hashes, partitioned by hash into
//!   bucket files and resolved one bucket at a time (first occurrence in input order wins).
//! * [`Shuffler`]: an external shuffle — rows go to uniformly random buckets (in memory when a
//!   single bucket suffices, otherwise Arrow IPC stream scratch files written batch by batch
//!   through a small fixed buffer, so many open buckets cost a few KiB each, not a buffered row
//!   group each), then each bucket is permuted in memory and appended to the output. Random
//!   bucket assignment followed by a uniform permutation within each bucket yields a uniform
//!   permutation of all rows.
//!
//! Scratch files live in a directory the caller owns and deletes. Nothing here prints.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{RecordBatch, UInt32Array};
use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::artifact::ParquetSink;
use super::source::BATCH_ROWS;
use crate::stages::StageError;

/// One bit per input row.
#[derive(Debug, Default, Clone)]
pub struct RowBitmap {
    words: Vec<u64>,
    length: u64,
}

impl RowBitmap {
    pub fn push(&mut self, value: bool) {
        let bit = self.length % 64;
        if bit == 0 {
            self.words.push(0);
        }
        if value {
            if let Some(word) = self.words.last_mut() {
                *word |= 1 << bit;
            }
        }
        self.length += 1;
    }

    pub fn get(&self, row: u64) -> bool {
        row < self.length && self.words[(row / 64) as usize] & (1 << (row % 64)) != 0
    }

    pub fn clear(&mut self, row: u64) {
        if row < self.length {
            self.words[(row / 64) as usize] &= !(1 << (row % 64));
        }
    }

    pub fn len(&self) -> u64 {
        self.length
    }

    pub fn is_empty(&self) -> bool {
        self.length == 0
    }
}

/// Hash buckets for deduplication.
const DEDUP_BUCKETS: usize = 64;
/// Bytes of one dedup record: key hash (16), row index (8), stratum id (4).
const DEDUP_RECORD: usize = 28;

/// Exact deduplication through hash-partitioned scratch files.
pub struct DedupSpill {
    paths: Vec<PathBuf>,
    writers: Vec<BufWriter<File>>,
}

impl DedupSpill {
    pub fn new(dir: &Path) -> Result<Self, StageError> {
        let mut paths = Vec::with_capacity(DEDUP_BUCKETS);
        let mut writers = Vec::with_capacity(DEDUP_BUCKETS);
        for bucket in 0..DEDUP_BUCKETS {
            let path = dir.join(format!("dedup-{bucket:02}.bin"));
            let file = File::create(&path).map_err(|e| {
                StageError::user(format!(
                    "cannot create scratch file {}: {e}",
                    path.display()
                ))
            })?;
            writers.push(BufWriter::with_capacity(64 * 1024, file));
            paths.push(path);
        }
        Ok(DedupSpill { paths, writers })
    }

    /// Record a kept row's key hash (rows must come in increasing order).
    pub fn push(&mut self, hash: u128, row: u64, stratum: u32) -> Result<(), StageError> {
        let bucket = (hash >> 122) as usize % DEDUP_BUCKETS;
        let mut record = [0u8; DEDUP_RECORD];
        record[..16].copy_from_slice(&hash.to_le_bytes());
        record[16..24].copy_from_slice(&row.to_le_bytes());
        record[24..].copy_from_slice(&stratum.to_le_bytes());
        self.writers[bucket]
            .write_all(&record)
            .map_err(|e| StageError::user(format!("writing a dedup scratch file: {e}")))
    }

    /// Clear the rows that repeat an earlier key in `keep`; count the surviving rows per
    /// stratum id into `strata`. Returns the number of duplicates.
    pub fn resolve(self, keep: &mut RowBitmap, strata: &mut Vec<u64>) -> Result<u64, StageError> {
        let DedupSpill { paths, writers } = self;
        for writer in writers {
            writer
                .into_inner()
                .map_err(|e| StageError::user(format!("writing a dedup scratch file: {e}")))?;
        }
        let mut duplicates = 0;
        for path in &paths {
            let file = File::open(path)
                .map_err(|e| StageError::user(format!("reading {}: {e}", path.display())))?;
            let size = file.metadata().map(|m| m.len()).unwrap_or(0) as usize;
            let mut seen = std::collections::HashSet::with_capacity(size / DEDUP_RECORD);
            let mut reader = BufReader::with_capacity(64 * 1024, file);
            let mut record = [0u8; DEDUP_RECORD];
            loop {
                match reader.read_exact(&mut record) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                    Err(e) => {
                        return Err(StageError::user(format!("reading {}: {e}", path.display())))
                    }
                }
                let mut hash = [0u8; 16];
                hash.copy_from_slice(&record[..16]);
                let mut row = [0u8; 8];
                row.copy_from_slice(&record[16..24]);
                let mut stratum = [0u8; 4];
                stratum.copy_from_slice(&record[24..]);
                if seen.insert(u128::from_le_bytes(hash)) {
                    let stratum = u32::from_le_bytes(stratum) as usize;
                    if strata.len() <= stratum {
                        strata.resize(stratum + 1, 0);
                    }
                    strata[stratum] += 1;
                } else {
                    keep.clear(u64::from_le_bytes(row));
                    duplicates += 1;
                }
            }
            std::fs::remove_file(path).ok();
        }
        Ok(duplicates)
    }
}

/// Write buffer of one scratch bucket file.
const BUCKET_BUFFER_BYTES: usize = 64 * 1024;

enum Bucket {
    Memory(Vec<RecordBatch>),
    File(Box<StreamWriter<BufWriter<File>>>, PathBuf),
}

fn scratch_error(path: &Path, error: impl std::fmt::Display) -> StageError {
    StageError::user(format!("scratch file {}: {error}", path.display()))
}

/// External shuffle of one split.
pub struct Shuffler {
    buckets: Vec<Bucket>,
    rng: ChaCha8Rng,
}

impl Shuffler {
    /// `bucket_count` buckets (1 keeps everything in memory); scratch files named after `label`.
    pub fn new(
        dir: &Path,
        label: &str,
        schema: SchemaRef,
        bucket_count: usize,
        seed: u64,
    ) -> Result<Self, StageError> {
        let mut buckets = Vec::with_capacity(bucket_count.max(1));
        if bucket_count <= 1 {
            buckets.push(Bucket::Memory(Vec::new()));
        } else {
            for index in 0..bucket_count {
                let path = dir.join(format!("shuffle-{label}-{index:04}.arrows"));
                let file = File::create(&path).map_err(|e| scratch_error(&path, e))?;
                let writer = StreamWriter::try_new(
                    BufWriter::with_capacity(BUCKET_BUFFER_BYTES, file),
                    &schema,
                )
                .map_err(|e| scratch_error(&path, e))?;
                buckets.push(Bucket::File(Box::new(writer), path));
            }
        }
        Ok(Shuffler {
            buckets,
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }

    /// Route the rows of `batch` to random buckets.
    pub fn push(&mut self, batch: RecordBatch) -> Result<(), StageError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let count = self.buckets.len();
        if count == 1 {
            if let Bucket::Memory(batches) = &mut self.buckets[0] {
                batches.push(batch);
            }
            return Ok(());
        }
        let mut routes: Vec<Vec<u32>> = vec![Vec::new(); count];
        for row in 0..batch.num_rows() {
            routes[self.rng.random_range(0..count)].push(row as u32);
        }
        for (bucket, rows) in self.buckets.iter_mut().zip(routes) {
            if rows.is_empty() {
                continue;
            }
            let part = take_rows(&batch, rows)?;
            match bucket {
                Bucket::Memory(batches) => batches.push(part),
                Bucket::File(writer, path) => {
                    writer.write(&part).map_err(|e| scratch_error(path, e))?
                }
            }
        }
        Ok(())
    }

    /// Permute each bucket and append it to `sink`.
    pub fn finish(self, sink: &mut ParquetSink) -> Result<(), StageError> {
        let Shuffler { buckets, mut rng } = self;
        for bucket in buckets {
            let batches = match bucket {
                Bucket::Memory(batches) => batches,
                Bucket::File(mut writer, path) => {
                    writer.finish().map_err(|e| scratch_error(&path, e))?;
                    writer
                        .into_inner()
                        .map_err(|e| scratch_error(&path, e))?
                        .into_inner()
                        .map_err(|e| scratch_error(&path, e.error()))?;
                    let file = File::open(&path).map_err(|e| scratch_error(&path, e))?;
                    let reader = StreamReader::try_new(BufReader::new(file), None)
                        .map_err(|e| scratch_error(&path, e))?;
                    let batches = reader
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| scratch_error(&path, e))?;
                    std::fs::remove_file(&path).ok();
                    batches
                }
            };
            if batches.is_empty() {
                continue;
            }
            // Row i of the bucket (in arrival order) is (batch, row within it); gathering
            // straight from the batches avoids copying the bucket into one array first.
            let mut locations: Vec<(u32, u32)> = Vec::new();
            for (index, batch) in batches.iter().enumerate() {
                locations.extend((0..batch.num_rows() as u32).map(|row| (index as u32, row)));
            }
            let mut order: Vec<u32> = (0..locations.len() as u32).collect();
            order.shuffle(&mut rng);
            let sources: Vec<&RecordBatch> = batches.iter().collect();
            let mut picks: Vec<(usize, usize)> = Vec::with_capacity(BATCH_ROWS);
            for chunk in order.chunks(BATCH_ROWS) {
                picks.clear();
                picks.extend(chunk.iter().map(|&i| {
                    let (batch, row) = locations[i as usize];
                    (batch as usize, row as usize)
                }));
                let part = arrow::compute::interleave_record_batch(&sources, &picks)
                    .map_err(|e| StageError::Internal(e.to_string()))?;
                sink.write(&part)?;
            }
        }
        Ok(())
    }
}

/// The rows of `batch` at `rows`, in that order.
pub fn take_rows(batch: &RecordBatch, rows: Vec<u32>) -> Result<RecordBatch, StageError> {
    let indices = UInt32Array::from(rows);
    let columns = batch
        .columns()
        .iter()
        .map(|column| arrow::compute::take(column.as_ref(), &indices, None))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StageError::Internal(e.to_string()))?;
    RecordBatch::try_new(Arc::clone(&batch.schema()), columns)
        .map_err(|e| StageError::Internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use arrow::array::{Array, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::super::source::read_artifact;
    use super::*;

    #[test]
    fn bitmap_pushes_gets_and_clears() {
        let mut bitmap = RowBitmap::default();
        for row in 0..130 {
            bitmap.push(row % 3 != 0);
        }
        assert_eq!(bitmap.len(), 130);
        assert!(!bitmap.get(0) && bitmap.get(1) && bitmap.get(128));
        bitmap.clear(128);
        assert!(!bitmap.get(128));
        assert!(!bitmap.get(500));
    }

    #[test]
    fn dedup_keeps_first_occurrence_and_counts_strata() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = DedupSpill::new(dir.path()).unwrap();
        let mut keep = RowBitmap::default();
        let keys = [5u128, 7, 5, u128::MAX, 7, 5];
        for (row, key) in keys.iter().enumerate() {
            keep.push(true);
            spill.push(*key, row as u64, (row % 2) as u32).unwrap();
        }
        let mut strata = Vec::new();
        assert_eq!(spill.resolve(&mut keep, &mut strata).unwrap(), 3);
        let kept: Vec<bool> = (0..6).map(|r| keep.get(r)).collect();
        assert_eq!(kept, vec![true, true, false, true, false, false]);
        assert_eq!(strata, vec![1, 2]);
    }

    #[test]
    fn shuffle_through_files_is_a_permutation() {
        let dir = tempfile::tempdir().unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let mut shuffler = Shuffler::new(dir.path(), "t", schema.clone(), 4, 3).unwrap();
        for start in (0..10_000i64).step_by(1000) {
            let values: Vec<i64> = (start..start + 1000).collect();
            let batch =
                RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(values))])
                    .unwrap();
            shuffler.push(batch).unwrap();
        }
        let out = dir.path().join("out.parquet");
        let mut sink = ParquetSink::create(&out, schema, true).unwrap();
        shuffler.finish(&mut sink).unwrap();
        sink.finish().unwrap();
        let mut values = Vec::new();
        read_artifact(&out, |batch| {
            let column = batch
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap();
            values.extend(column.values().iter().copied());
            assert_eq!(column.null_count(), 0);
            Ok(())
        })
        .unwrap();
        assert_ne!(values[..20], (0..20).collect::<Vec<i64>>()[..]);
        values.sort_unstable();
        assert_eq!(values, (0..10_000).collect::<Vec<i64>>());
    }
}
