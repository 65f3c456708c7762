//! Writing Parquet artifacts incrementally: a [`ParquetSink`] over parquet's `ArrowWriter` that
//! bounds the buffered row group (by rows and bytes) so memory does not grow with the output, and
//! writes through a temporary name renamed into place on `finish`, so a crash never leaves a
//! complete-looking file. Encoding and compression run on a writer thread fed through a channel
//! of at most [`QUEUED_BATCHES`] batches, so the caller's work (decoding, filtering, rendering)
//! overlaps with them; memory stays one row group plus the queued batches. Also the JSON side
//! files (atomic).

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::stages::StageError;

/// Rows per row group written.
const ROW_GROUP_ROWS: usize = 64 * 1024;
/// Flush the row group once its buffered size passes this many bytes.
const ROW_GROUP_BYTES: usize = 48 * 1024 * 1024;
/// Batches waiting for the writer thread at most (the caller blocks beyond that).
pub const QUEUED_BATCHES: usize = 4;

type Writer = ArrowWriter<BufWriter<File>>;

/// An incremental Parquet writer for one artifact file.
pub struct ParquetSink {
    sender: Option<SyncSender<RecordBatch>>,
    worker: Option<JoinHandle<Result<Writer, StageError>>>,
    temporary: PathBuf,
    path: PathBuf,
    rows: u64,
}

/// The writer thread: encode and compress every batch it receives, flushing row groups that
/// pass [`ROW_GROUP_BYTES`]. Returns the writer (to close) or the first error.
fn write_batches(
    mut writer: Writer,
    path: PathBuf,
    batches: std::sync::mpsc::Receiver<RecordBatch>,
) -> Result<Writer, StageError> {
    let failed = |e: parquet::errors::ParquetError| {
        StageError::user(format!("writing {}: {e}", path.display()))
    };
    for batch in batches {
        writer.write(&batch).map_err(failed)?;
        if writer.in_progress_size() > ROW_GROUP_BYTES {
            writer.flush().map_err(failed)?;
        }
    }
    Ok(writer)
}

impl ParquetSink {
    /// Create `path` (written as `path.partial`, renamed on [`ParquetSink::finish`]).
    /// `compressed`: snappy for artifacts, none for scratch files.
    pub fn create(path: &Path, schema: SchemaRef, compressed: bool) -> Result<Self, StageError> {
        let mut name = path.as_os_str().to_owned();
        name.push(".partial");
        let temporary = PathBuf::from(name);
        let file = File::create(&temporary)
            .map_err(|e| StageError::user(format!("cannot create {}: {e}", temporary.display())))?;
        let properties = WriterProperties::builder()
            .set_compression(if compressed {
                Compression::SNAPPY
            } else {
                Compression::UNCOMPRESSED
            })
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .build();
        let writer = ArrowWriter::try_new(
            BufWriter::with_capacity(1 << 20, file),
            schema,
            Some(properties),
        )
        .map_err(|e| StageError::Internal(format!("{}: {e}", path.display())))?;
        let (sender, receiver) = sync_channel(QUEUED_BATCHES);
        let worker_path = path.to_path_buf();
        let worker = std::thread::Builder::new()
            .name("parquet-writer".into())
            .spawn(move || write_batches(writer, worker_path, receiver))
            .map_err(|e| StageError::Internal(format!("cannot start a writer thread: {e}")))?;
        Ok(ParquetSink {
            sender: Some(sender),
            worker: Some(worker),
            temporary,
            path: path.to_path_buf(),
            rows: 0,
        })
    }

    /// Wait for the writer thread; its writer, or the error that stopped it.
    fn join(&mut self) -> Result<Writer, StageError> {
        self.sender = None;
        let worker = self.worker.take().ok_or_else(|| {
            StageError::Internal(format!("{}: writer already finished", self.path.display()))
        })?;
        worker.join().map_err(|_| {
            StageError::Internal(format!(
                "the writer thread of {} panicked",
                self.path.display()
            ))
        })?
    }

    /// Queue `batch` for writing (blocks while [`QUEUED_BATCHES`] are waiting). A failure of the
    /// writer thread surfaces here or in [`ParquetSink::finish`].
    pub fn write(&mut self, batch: &RecordBatch) -> Result<(), StageError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let sent = match &self.sender {
            Some(sender) => sender.send(batch.clone()).is_ok(),
            None => false,
        };
        if !sent {
            // The writer thread stopped: report why.
            return match self.join() {
                Err(error) => Err(error),
                Ok(_) => Err(StageError::Internal(format!(
                    "{}: the writer stopped early",
                    self.path.display()
                ))),
            };
        }
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Close the file and rename it into place. Returns the rows written.
    pub fn finish(mut self) -> Result<u64, StageError> {
        let writer = self.join()?;
        writer
            .close()
            .map_err(|e| StageError::user(format!("writing {}: {e}", self.path.display())))?;
        std::fs::rename(&self.temporary, &self.path).map_err(|e| {
            StageError::user(format!("cannot rename to {}: {e}", self.path.display()))
        })?;
        Ok(self.rows)
    }
}

impl Drop for ParquetSink {
    /// An unfinished sink (an error upstream) stops its thread; the `.partial` file stays behind
    /// in the stage's output directory, which the executor discards.
    fn drop(&mut self) {
        self.sender = None;
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// Write a JSON value to `path` atomically (pretty, trailing newline).
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), StageError> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| StageError::Internal(format!("serializing {}: {e}", path.display())))?;
    text.push('\n');
    let mut name = path.as_os_str().to_owned();
    name.push(".partial");
    let temporary = PathBuf::from(name);
    std::fs::write(&temporary, text)
        .map_err(|e| StageError::user(format!("cannot write {}: {e}", temporary.display())))?;
    std::fs::rename(&temporary, path)
        .map_err(|e| StageError::user(format!("cannot rename to {}: {e}", path.display())))
}
