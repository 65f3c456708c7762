//! TensorBoard event files of a training run: the metrics.jsonl records as scalar summaries,
//! readable by TensorBoard (`tensorboard --logdir DIR`) and its event readers.
//!
//! Format: a TFRecord file (each record: u64 length, masked CRC32C of the length bytes, the
//! data, masked CRC32C of the data; all little-endian) of protobuf `Event`s ([`proto`]); the
//! first event carries `file_version: "brain.Event:2"`, each later one a summary of scalars at
//! its step.
//!
//! Determinism: the file is part of a content-addressed artifact, so it holds only what the
//! inputs determine: every `wall_time` is 0 (TensorBoard's step axis is exact; its relative and
//! wall-time axes carry no information) and the file name has no time or host
//! ([`EVENTS_FILE`]). Timings (tokens per second) are not in metrics.jsonl for the same reason,
//! so they are not here either. Knows nothing of stages; never prints.

pub mod proto;

use std::path::{Path, PathBuf};

use proto::What;

/// Where the train stage writes its event file, relative to its output.
pub const EVENTS_FILE: &str = "tensorboard/events.out.tfevents.0.peftpipe";

/// The scalar tags, from metrics.jsonl fields.
const TAGS: [(&str, &str); 5] = [
    ("loss", "train/loss"),
    ("lr", "train/learning_rate"),
    ("grad_norm", "train/grad_norm"),
    ("eval_loss", "eval/loss"),
    ("eval_perplexity", "eval/perplexity"),
];

/// The tag of the smoothed training loss (exponential moving average, weight 0.9, bias
/// corrected: the progress bar's and the run report's smoothing).
pub const SMOOTHED_LOSS_TAG: &str = "train/loss_smoothed";

#[derive(Debug, thiserror::Error)]
pub enum TensorBoardError {
    #[error("metrics line {line}: {message}")]
    Metrics { line: usize, message: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The masked CRC32C TFRecord stores (`((crc >> 15) | (crc << 17)) + 0xa282ead8`).
pub fn masked_crc32c(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Append one TFRecord holding `data`.
pub fn push_record(out: &mut Vec<u8>, data: &[u8]) {
    let length = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&length);
    out.extend_from_slice(&masked_crc32c(&length).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
}

/// An event file in memory: the file-version event, then scalar events.
pub struct EventFile {
    bytes: Vec<u8>,
}

impl Default for EventFile {
    fn default() -> Self {
        Self::new()
    }
}

impl EventFile {
    pub fn new() -> EventFile {
        let mut bytes = Vec::new();
        push_record(
            &mut bytes,
            &proto::event(0.0, 0, &What::FileVersion("brain.Event:2")),
        );
        EventFile { bytes }
    }

    /// One event with the scalars `(tag, value)` at `step`.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f32)]) {
        let step = i64::try_from(step).unwrap_or(i64::MAX);
        push_record(
            &mut self.bytes,
            &proto::event(0.0, step, &What::Scalars(values)),
        );
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// The event file of metrics.jsonl's records: per line with a `step`, the scalars of the
/// fields it has (see `TAGS`) and the smoothed loss. Non-finite values are left out.
pub fn events_from_metrics(metrics_jsonl: &str) -> Result<EventFile, TensorBoardError> {
    let mut file = EventFile::new();
    let (mut average, mut weight) = (0.0f64, 0.0f64);
    for (index, line) in metrics_jsonl.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let error = |message: String| TensorBoardError::Metrics {
            line: index + 1,
            message,
        };
        let record: serde_json::Value =
            serde_json::from_str(line).map_err(|e| error(e.to_string()))?;
        let step = record
            .get("step")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| error("no integer `step`".into()))?;
        let field = |name: &str| {
            record
                .get(name)
                .and_then(serde_json::Value::as_f64)
                .filter(|value| value.is_finite())
        };
        let mut values: Vec<(&str, f32)> = Vec::new();
        for (name, tag) in TAGS {
            if let Some(value) = field(name) {
                values.push((tag, value as f32));
            }
            if name == "loss" {
                if let Some(loss) = field("loss") {
                    average = 0.9 * average + 0.1 * loss;
                    weight = 0.9 * weight + 0.1;
                    values.push((SMOOTHED_LOSS_TAG, (average / weight) as f32));
                }
            }
        }
        if !values.is_empty() {
            file.scalars(step, &values);
        }
    }
    Ok(file)
}

/// Write the event file of `metrics_jsonl` to `path` (its directory created), atomically.
pub fn write_metrics(path: &Path, metrics_jsonl: &str) -> Result<(), TensorBoardError> {
    let file = events_from_metrics(metrics_jsonl)?;
    let io = |source| TensorBoardError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    crate::peft::write_atomic(path, file.bytes()).map_err(|error| TensorBoardError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(error.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_and_its_mask() {
        // The CRC-32C check value, and TensorFlow's masking of it.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        // ((0xe3069283 >> 15) | (0xe3069283 << 17)) + 0xa282ead8, mod 2^32.
        assert_eq!(masked_crc32c(b"123456789"), 0xc78a_b0e5);
    }

    /// Split a TFRecord stream back into its records, checking both CRCs.
    fn records(mut bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let length_bytes: [u8; 8] = bytes[..8].try_into().unwrap();
            let crc = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
            assert_eq!(crc, masked_crc32c(&length_bytes));
            let length = u64::from_le_bytes(length_bytes) as usize;
            let data = &bytes[12..12 + length];
            let crc = u32::from_le_bytes(bytes[12 + length..16 + length].try_into().unwrap());
            assert_eq!(crc, masked_crc32c(data));
            out.push(data.to_vec());
            bytes = &bytes[16 + length..];
        }
        out
    }

    #[test]
    fn metrics_become_one_event_per_step_after_the_version() {
        let jsonl = "{\"step\":1,\"loss\":2.0,\"lr\":0.1,\"grad_norm\":1.5}\n\
                     {\"step\":2,\"loss\":1.0,\"lr\":0.05,\"grad_norm\":1.0,\"eval_loss\":1.2,\"eval_perplexity\":3.32}\n";
        let file = events_from_metrics(jsonl).unwrap();
        let records = records(file.bytes());
        assert_eq!(records.len(), 3);
        assert_eq!(
            records[0],
            proto::event(0.0, 0, &What::FileVersion("brain.Event:2"))
        );
        // Step 2: the smoothed loss is (0.09·2 + 0.1·1) / 0.19.
        let smoothed = ((0.09 * 2.0 + 0.1) / 0.19) as f32;
        assert_eq!(
            records[2],
            proto::event(
                0.0,
                2,
                &What::Scalars(&[
                    ("train/loss", 1.0),
                    (SMOOTHED_LOSS_TAG, smoothed),
                    ("train/learning_rate", 0.05),
                    ("train/grad_norm", 1.0),
                    ("eval/loss", 1.2),
                    ("eval/perplexity", 3.32),
                ])
            )
        );
        // Deterministic: the same metrics, the same bytes.
        assert_eq!(
            events_from_metrics(jsonl).unwrap().bytes(),
            file.bytes(),
            "no wall time in the file"
        );
    }

    #[test]
    fn a_line_without_a_step_is_an_error_naming_it() {
        let error = events_from_metrics("{\"step\":1,\"loss\":1}\n{\"loss\":2}\n")
            .err()
            .unwrap();
        assert_eq!(error.to_string(), "metrics line 2: no integer `step`");
    }
}
