//! Few-shot demonstrations for the template stage: a bounded pool of rows of one split (the first
//! rows, or a seeded reservoir sample — per label for the stratified strategy), and per-row draws
//! of `k` demonstrations that never include the row itself. Each draw is seeded by the pool seed,
//! the split and the row index, so it does not depend on batch boundaries.
//!
//! Keeping evaluation rows out of training prompts is the caller's rule (the template config only
//! accepts the train split as the source); this module enforces "never the row itself". Never
//! prints.

use std::collections::BTreeMap;
use std::path::Path;

use minijinja::value::Value;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::render::{cell_value, BatchColumns};
use super::source::read_artifact;
pub use crate::config::template::FewShotStrategy;
use crate::stages::{derive_seed, StageError};

/// One candidate demonstration.
#[derive(Debug, Clone)]
struct Demonstration {
    /// Row index in the source split.
    row: u64,
    /// Its columns, as a template value.
    value: Value,
}

/// Settings of a pool.
#[derive(Debug, Clone)]
pub struct FewShotSettings {
    pub k: usize,
    pub strategy: FewShotStrategy,
    /// Label column (stratified strategy).
    pub label: Option<String>,
    /// Most rows kept as candidates (per label value for the stratified strategy).
    pub pool_size: usize,
    pub seed: u64,
    /// The split the demonstrations come from.
    pub split: String,
}

/// Candidate demonstrations drawn from one split.
#[derive(Debug)]
pub struct FewShotPool {
    settings: FewShotSettings,
    /// Label value → candidates (one group, `""`, when not stratified).
    groups: BTreeMap<String, Vec<Demonstration>>,
}

/// Most distinct label values the stratified strategy accepts.
const MAX_LABELS: usize = 1000;

impl FewShotPool {
    /// Build the pool from the source split's Parquet file (streamed; memory is the pool).
    pub fn build(path: &Path, settings: FewShotSettings) -> Result<Self, StageError> {
        let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(settings.seed, "few-shot-pool"));
        let mut groups: BTreeMap<String, Vec<Demonstration>> = BTreeMap::new();
        let mut seen: BTreeMap<String, u64> = BTreeMap::new();
        let mut row = 0u64;
        let first_k_limit = settings.k as u64 + 1;
        let mut label_index: Option<usize> = None;
        read_artifact(path, |batch| {
            if settings.strategy == FewShotStrategy::FirstK && row >= first_k_limit {
                row += batch.num_rows() as u64;
                return Ok(());
            }
            if settings.strategy == FewShotStrategy::Stratified && label_index.is_none() {
                let label = settings.label.as_deref().unwrap_or_default();
                label_index = Some(batch.schema().index_of(label).map_err(|_| {
                    StageError::user(format!(
                        "few_shot: label column `{label}` is not in {}",
                        path.display()
                    ))
                })?);
            }
            let columns = BatchColumns::new(&batch);
            for index in 0..batch.num_rows() {
                let group = match (settings.strategy, label_index) {
                    (FewShotStrategy::Stratified, Some(column)) => {
                        let value = cell_value(batch.column(column).as_ref(), index);
                        if value.is_none() {
                            row += 1;
                            continue;
                        }
                        value.to_string()
                    }
                    _ => String::new(),
                };
                match settings.strategy {
                    FewShotStrategy::FirstK => {
                        if row < first_k_limit {
                            groups.entry(group).or_default().push(Demonstration {
                                row,
                                value: columns.row_map(index),
                            });
                        }
                    }
                    FewShotStrategy::Random | FewShotStrategy::Stratified => {
                        if !groups.contains_key(&group) && groups.len() >= MAX_LABELS {
                            return Err(StageError::user(format!(
                                "few_shot: the label column has more than {MAX_LABELS} values"
                            )));
                        }
                        let count = seen.entry(group.clone()).or_insert(0);
                        let candidates = groups.entry(group).or_default();
                        // Reservoir sampling (Algorithm R).
                        if candidates.len() < settings.pool_size {
                            candidates.push(Demonstration {
                                row,
                                value: columns.row_map(index),
                            });
                        } else {
                            let slot = rng.random_range(0..=*count);
                            if (slot as usize) < settings.pool_size {
                                candidates[slot as usize] = Demonstration {
                                    row,
                                    value: columns.row_map(index),
                                };
                            }
                        }
                        *count += 1;
                    }
                }
                row += 1;
            }
            Ok(())
        })?;
        // Candidates in source order, so draws do not depend on reservoir replacement order.
        for candidates in groups.values_mut() {
            candidates.sort_by_key(|d| d.row);
        }
        Ok(FewShotPool { settings, groups })
    }

    /// Number of candidate rows.
    pub fn len(&self) -> usize {
        self.groups.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `k` demonstrations for row `row` of `split` (never that row itself), each a map of
    /// the source row's columns.
    pub fn draw(&self, split: &str, row: u64) -> Result<Vec<Value>, String> {
        Ok(self
            .choose(split, row)?
            .into_iter()
            .map(|d| d.value.clone())
            .collect())
    }

    fn choose(&self, split: &str, row: u64) -> Result<Vec<&Demonstration>, String> {
        let k = self.settings.k;
        let is_self = |d: &Demonstration| split == self.settings.split && d.row == row;
        let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(
            self.settings.seed,
            &format!("few-shot/{split}/{row}"),
        ));
        let chosen: Vec<&Demonstration> = match self.settings.strategy {
            FewShotStrategy::FirstK => self
                .groups
                .values()
                .flatten()
                .filter(|d| !is_self(d))
                .take(k)
                .collect(),
            FewShotStrategy::Random => {
                let all: Vec<&Demonstration> = self.groups.values().flatten().collect();
                sample_excluding(&all, k, &is_self, &mut rng)
            }
            FewShotStrategy::Stratified => {
                // A random sample of up to k rows of each label, then round-robin over the
                // labels in a random order.
                let mut per_label: Vec<Vec<&Demonstration>> = self
                    .groups
                    .values()
                    .map(|candidates| {
                        let refs: Vec<&Demonstration> = candidates.iter().collect();
                        sample_excluding(&refs, k.min(refs.len()), &is_self, &mut rng)
                    })
                    .collect();
                per_label.shuffle(&mut rng);
                let mut chosen = Vec::with_capacity(k);
                let mut depth = 0;
                while chosen.len() < k {
                    let before = chosen.len();
                    for candidates in &per_label {
                        if chosen.len() == k {
                            break;
                        }
                        if let Some(d) = candidates.get(depth) {
                            chosen.push(*d);
                        }
                    }
                    if chosen.len() == before {
                        break;
                    }
                    depth += 1;
                }
                chosen.shuffle(&mut rng);
                chosen
            }
        };
        if chosen.len() < k {
            return Err(self.too_few(chosen.len()));
        }
        Ok(chosen)
    }

    fn too_few(&self, available: usize) -> String {
        format!(
            "few_shot.k is {} but only {available} demonstration(s) are available from the {} split",
            self.settings.k, self.settings.split
        )
    }

    /// The source row indices of the demonstrations for row `row` of `split`.
    pub fn draw_rows(&self, split: &str, row: u64) -> Result<Vec<u64>, String> {
        Ok(self
            .choose(split, row)?
            .into_iter()
            .map(|d| d.row)
            .collect())
    }
}

/// `want` distinct random candidates that are not `is_self` (fewer when there are not enough),
/// in random order. Samples `want + 1` indices so skipping the row itself costs nothing extra.
fn sample_excluding<'a>(
    candidates: &[&'a Demonstration],
    want: usize,
    is_self: &dyn Fn(&Demonstration) -> bool,
    rng: &mut ChaCha8Rng,
) -> Vec<&'a Demonstration> {
    let draw = (want + 1).min(candidates.len());
    let mut picks: Vec<usize> = rand::seq::index::sample(rng, candidates.len(), draw).into_vec();
    picks.sort_unstable();
    picks.shuffle(rng);
    picks
        .into_iter()
        .map(|i| candidates[i])
        .filter(|d| !is_self(d))
        .take(want)
        .collect()
}
