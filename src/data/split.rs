//! Exact, seeded, streaming train / eval / test splits.
//!
//! Once the number of kept rows per stratum is known (first pass), [`split_quotas`] fixes how many
//! rows of each stratum go to each split: global quotas by largest remainder, then a controlled
//! rounding of the per-stratum shares so both the per-split totals and the per-stratum totals are
//! exact. [`SplitAssigner`] then walks the rows in input order and draws each row's split with
//! probability proportional to the remaining quotas of its stratum (sequential sampling without
//! replacement): every subset of the right sizes is equally likely, memory is one counter per
//! stratum, and the same seed gives the same assignment. Holds no rows.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::ingest::SplitSizes;

/// Number of splits: train, eval, test.
pub const SPLITS: usize = 3;

/// Split names by index.
pub const SPLIT_NAMES: [&str; SPLITS] = ["train", "eval", "test"];

/// Largest-remainder rounding of `ideal` shares to integers that add up to `total`.
fn largest_remainder(ideal: &[f64], total: u64) -> Vec<u64> {
    let mut result: Vec<u64> = ideal.iter().map(|v| v.max(0.0).floor() as u64).collect();
    let assigned: u64 = result.iter().sum();
    let mut remaining = total.saturating_sub(assigned);
    let mut order: Vec<usize> = (0..ideal.len()).collect();
    // Largest fractional part first; ties go to the earlier index (deterministic).
    order.sort_by(|&a, &b| {
        let fa = ideal[a] - ideal[a].floor();
        let fb = ideal[b] - ideal[b].floor();
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    for &index in order.iter().cycle() {
        if remaining == 0 {
            break;
        }
        result[index] += 1;
        remaining -= 1;
    }
    result
}

/// Rows per split for each stratum (in the strata's order, which decides the rounding). Errors
/// when counts ask for more rows than there are.
pub fn split_quotas<K: Ord + Clone>(
    strata: &BTreeMap<K, u64>,
    sizes: &SplitSizes,
) -> Result<BTreeMap<K, [u64; SPLITS]>, String> {
    let total: u64 = strata.values().sum();
    let global: Vec<u64> = match sizes {
        SplitSizes::Fractions(fractions) => {
            let ideal: Vec<f64> = fractions.iter().map(|f| f * total as f64).collect();
            largest_remainder(&ideal, total)
        }
        SplitSizes::Counts([eval, test]) => {
            if eval + test > total {
                return Err(format!(
                    "split.counts asks for {eval} eval + {test} test rows but only {total} rows remain after filtering and dedup"
                ));
            }
            vec![total - eval - test, *eval, *test]
        }
    };
    let names: Vec<&K> = strata.keys().collect();
    if total == 0 {
        return Ok(names
            .into_iter()
            .map(|n| (n.clone(), [0; SPLITS]))
            .collect());
    }
    // Ideal shares and their floors.
    let ideal: Vec<[f64; SPLITS]> = strata
        .values()
        .map(|&n| {
            let mut row = [0.0; SPLITS];
            for (split, cell) in row.iter_mut().enumerate() {
                *cell = n as f64 * global[split] as f64 / total as f64;
            }
            row
        })
        .collect();
    let mut cells: Vec<[u64; SPLITS]> = ideal
        .iter()
        .map(|row| row.map(|v| v.floor() as u64))
        .collect();
    let counts: Vec<u64> = strata.values().copied().collect();
    let mut row_deficit: Vec<u64> = cells
        .iter()
        .zip(&counts)
        .map(|(row, n)| n - row.iter().sum::<u64>())
        .collect();
    let mut column_deficit: Vec<u64> = (0..SPLITS)
        .map(|split| global[split] - cells.iter().map(|row| row[split]).sum::<u64>())
        .collect();
    // Controlled rounding: hand out the remaining units to the largest fractional parts first,
    // respecting both the stratum and the split totals.
    let mut order: Vec<(usize, usize)> = (0..cells.len())
        .flat_map(|s| (0..SPLITS).map(move |j| (s, j)))
        .collect();
    order.sort_by(|&(s1, j1), &(s2, j2)| {
        let f1 = ideal[s1][j1] - ideal[s1][j1].floor();
        let f2 = ideal[s2][j2] - ideal[s2][j2].floor();
        f2.total_cmp(&f1).then((s1, j1).cmp(&(s2, j2)))
    });
    for &(s, j) in &order {
        if row_deficit[s] > 0 && column_deficit[j] > 0 && ideal[s][j] > ideal[s][j].floor() {
            cells[s][j] += 1;
            row_deficit[s] -= 1;
            column_deficit[j] -= 1;
        }
    }
    // Anything left (rare ties): any cell whose stratum and split still lack rows.
    for s in 0..cells.len() {
        for j in 0..SPLITS {
            let units = row_deficit[s].min(column_deficit[j]);
            cells[s][j] += units;
            row_deficit[s] -= units;
            column_deficit[j] -= units;
        }
    }
    Ok(names.into_iter().cloned().zip(cells).collect())
}

/// Draws each row's split from the remaining quotas of its stratum (`K` names a stratum).
pub struct SplitAssigner<K> {
    remaining: BTreeMap<K, [u64; SPLITS]>,
    rng: ChaCha8Rng,
}

impl<K: Ord> SplitAssigner<K> {
    pub fn new(quotas: BTreeMap<K, [u64; SPLITS]>, seed: u64) -> Self {
        SplitAssigner {
            remaining: quotas,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The split (index into [`SPLIT_NAMES`]) of the next row of `stratum`. Errors when the
    /// stratum has no rows left (the two passes disagree: the input changed while reading); the
    /// caller names the stratum.
    pub fn assign(&mut self, stratum: &K) -> Result<usize, String> {
        let left = self.remaining.get_mut(stratum).ok_or_else(|| {
            "not seen in the first pass; did the input change while it was read?".to_string()
        })?;
        let total: u64 = left.iter().sum();
        if total == 0 {
            return Err(
                "more rows than in the first pass; did the input change while it was read?".into(),
            );
        }
        let mut draw = self.rng.random_range(0..total);
        for (split, count) in left.iter_mut().enumerate() {
            if draw < *count {
                *count -= 1;
                return Ok(split);
            }
            draw -= *count;
        }
        Err("split quotas are inconsistent".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stratified_quotas_are_exact_per_split_and_per_stratum() {
        let strata: BTreeMap<String, u64> = (0..10).map(|i| (format!("s{i}"), 5)).collect();
        let quotas = split_quotas(&strata, &SplitSizes::Fractions([0.9, 0.1, 0.0])).unwrap();
        let eval: u64 = quotas.values().map(|q| q[1]).sum();
        assert_eq!(eval, 5, "global eval share of 50 rows at 10%");
        for q in quotas.values() {
            assert_eq!(q.iter().sum::<u64>(), 5);
        }
    }

    #[test]
    fn counts_give_train_the_rest_and_refuse_too_many() {
        let strata: BTreeMap<String, u64> = [("a".to_string(), 70), ("b".to_string(), 30)].into();
        let quotas = split_quotas(&strata, &SplitSizes::Counts([10, 20])).unwrap();
        assert_eq!(quotas["a"], [49, 7, 14]);
        assert_eq!(quotas["b"], [21, 3, 6]);
        assert!(split_quotas(&strata, &SplitSizes::Counts([90, 20])).is_err());
    }

    #[test]
    fn assigner_meets_quotas_exactly_and_is_deterministic() {
        let strata: BTreeMap<String, u64> = [("x".to_string(), 1000)].into();
        let quotas = split_quotas(&strata, &SplitSizes::Fractions([0.7, 0.2, 0.1])).unwrap();
        let run = |seed| {
            let mut assigner = SplitAssigner::new(quotas.clone(), seed);
            (0..1000)
                .map(|_| assigner.assign(&"x".to_string()).unwrap())
                .collect::<Vec<_>>()
        };
        let first = run(7);
        assert_eq!(first, run(7));
        assert_ne!(first, run(8));
        let counts = [0, 1, 2].map(|s| first.iter().filter(|&&v| v == s).count());
        assert_eq!(counts, [700, 200, 100]);
    }
}
