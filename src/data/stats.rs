//! Dataset statistics that stay small however many rows stream past: exact text-length
//! percentiles from a histogram of lengths (one counter per distinct length), null counts per
//! column. Serialized into the ingest stage's `stats.json`.

use std::collections::BTreeMap;

use arrow::array::{Array, RecordBatch, StringArray};
use serde::Serialize;

use super::filter::as_text;

/// Histogram of string lengths in characters.
#[derive(Debug, Clone, Default)]
pub struct LengthHistogram {
    counts: BTreeMap<u64, u64>,
    total: u64,
    sum: u128,
}

/// Percentiles of a length distribution (nearest-rank).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LengthSummary {
    pub count: u64,
    pub min: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
    pub mean: f64,
}

impl LengthHistogram {
    pub fn add(&mut self, length: u64) {
        *self.counts.entry(length).or_insert(0) += 1;
        self.total += 1;
        self.sum += u128::from(length);
    }

    /// The smallest length with at least `q` of the values at or below it (nearest rank).
    fn quantile(&self, q: f64) -> u64 {
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (&length, &count) in &self.counts {
            seen += count;
            if seen >= rank {
                return length;
            }
        }
        0
    }

    pub fn summary(&self) -> Option<LengthSummary> {
        if self.total == 0 {
            return None;
        }
        Some(LengthSummary {
            count: self.total,
            min: *self.counts.keys().next()?,
            p50: self.quantile(0.5),
            p90: self.quantile(0.9),
            p99: self.quantile(0.99),
            max: *self.counts.keys().next_back()?,
            mean: (self.sum as f64 / self.total as f64 * 100.0).round() / 100.0,
        })
    }
}

/// Null counts and string-length histograms of a stream of batches with one schema.
#[derive(Debug, Clone, Default)]
pub struct ColumnStats {
    pub rows: u64,
    pub nulls: BTreeMap<String, u64>,
    pub lengths: BTreeMap<String, LengthHistogram>,
}

impl ColumnStats {
    /// Count `batch`; string columns also feed their length histograms.
    pub fn add(&mut self, batch: &RecordBatch, with_lengths: bool) {
        self.rows += batch.num_rows() as u64;
        let schema = batch.schema();
        for (field, column) in schema.fields().iter().zip(batch.columns()) {
            *self.nulls.entry(field.name().clone()).or_insert(0) += column.null_count() as u64;
            if with_lengths && super::source::is_string(column.as_ref()) {
                let Ok(text) = as_text(column) else { continue };
                let histogram = self.lengths.entry(field.name().clone()).or_default();
                add_lengths(histogram, &text);
            }
        }
    }

    /// Length summaries of the string columns.
    pub fn length_summaries(&self) -> BTreeMap<String, LengthSummary> {
        self.lengths
            .iter()
            .filter_map(|(name, h)| Some((name.clone(), h.summary()?)))
            .collect()
    }
}

fn add_lengths(histogram: &mut LengthHistogram, text: &StringArray) {
    for value in text.iter().flatten() {
        // ASCII fast path: byte length equals character count.
        let length = if value.is_ascii() {
            value.len()
        } else {
            value.chars().count()
        };
        histogram.add(length as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut histogram = LengthHistogram::default();
        for length in 1..=100 {
            histogram.add(length);
        }
        let summary = histogram.summary().unwrap();
        assert_eq!(
            (
                summary.min,
                summary.p50,
                summary.p90,
                summary.p99,
                summary.max
            ),
            (1, 50, 90, 99, 100)
        );
        assert_eq!(summary.mean, 50.5);
        assert!(LengthHistogram::default().summary().is_none());
    }
}
