//! `W` ranks as threads of one process, for tests only (real runs use NCCL): the collectives of
//! [`super::Communicator`] on host copies, summed in rank order so every rank gets bit-identical
//! results. A rank that is dropped, or calls [`LocalRank::fail`], ends every pending and later
//! collective of the others with [`CommError::PeerFailed`]; one that never arrives ends them with
//! [`CommError::Timeout`] after the group's timeout.

use super::{CommError, Communicator};
use candle_core::Tensor;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

struct State {
    /// Completed collectives.
    generation: u64,
    /// This collective's contributions by rank (`Some(vec![])` for a barrier).
    contributions: Vec<Option<Vec<f32>>>,
    /// The last completed collective's result.
    result: Arc<Vec<f32>>,
    /// The first rank that stopped, and why.
    failed: Option<(usize, String)>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    world_size: usize,
    timeout: Duration,
}

/// A group of in-process ranks.
pub struct LocalGroup;

impl LocalGroup {
    /// One communicator per rank (move each to its own thread).
    #[allow(clippy::new_ret_no_self)]
    pub fn new(world_size: usize, timeout: Duration) -> Vec<LocalRank> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                generation: 0,
                contributions: vec![None; world_size],
                result: Arc::new(Vec::new()),
                failed: None,
            }),
            changed: Condvar::new(),
            world_size,
            timeout,
        });
        (0..world_size)
            .map(|rank| LocalRank {
                rank,
                shared: Arc::clone(&shared),
                done: false,
            })
            .collect()
    }
}

/// One rank of a [`LocalGroup`].
pub struct LocalRank {
    rank: usize,
    shared: Arc<Shared>,
    done: bool,
}

enum Combine {
    Sum,
    From(usize),
    Nothing,
}

impl LocalRank {
    /// Mark this rank as stopped with `reason`: the others' collectives fail at once.
    pub fn fail(&mut self, reason: &str) {
        self.done = true;
        let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.failed.is_none() {
            state.failed = Some((self.rank, reason.to_string()));
        }
        self.shared.changed.notify_all();
    }

    fn collective(
        &self,
        operation: &'static str,
        contribution: Vec<f32>,
        combine: Combine,
    ) -> Result<Arc<Vec<f32>>, CommError> {
        let shared = &*self.shared;
        let deadline = Instant::now() + shared.timeout;
        let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        let peer_failed = |state: &State| {
            state
                .failed
                .as_ref()
                .map(|(failed, reason)| CommError::PeerFailed {
                    rank: self.rank,
                    operation,
                    failed: *failed,
                    reason: reason.clone(),
                })
        };
        if let Some(error) = peer_failed(&state) {
            return Err(error);
        }
        let lengths: Vec<usize> = state.contributions.iter().flatten().map(Vec::len).collect();
        if let Some(&length) = lengths.first() {
            if matches!(combine, Combine::Sum) && length != contribution.len() {
                return Err(CommError::Mismatch {
                    rank: self.rank,
                    operation,
                    message: format!(
                        "{} elements here, {length} on another rank",
                        contribution.len()
                    ),
                });
            }
        }
        state.contributions[self.rank] = Some(contribution);
        let generation = state.generation;
        if state.contributions.iter().all(Option::is_some) {
            let contributions =
                std::mem::replace(&mut state.contributions, vec![None; shared.world_size]);
            let contributions: Vec<Vec<f32>> = contributions.into_iter().flatten().collect();
            let result = match combine {
                Combine::Sum => {
                    let mut sum = contributions[0].clone();
                    for other in &contributions[1..] {
                        for (s, x) in sum.iter_mut().zip(other) {
                            *s += x;
                        }
                    }
                    sum
                }
                Combine::From(root) => contributions[root].clone(),
                Combine::Nothing => Vec::new(),
            };
            state.result = Arc::new(result);
            state.generation += 1;
            shared.changed.notify_all();
            return Ok(Arc::clone(&state.result));
        }
        loop {
            let now = Instant::now();
            if now >= deadline {
                let waiting_for = state
                    .contributions
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.is_none())
                    .map(|(rank, _)| rank)
                    .collect();
                // Withdraw, so a late rank does not complete a collective nobody waits for.
                state.contributions[self.rank] = None;
                return Err(CommError::Timeout {
                    rank: self.rank,
                    operation,
                    seconds: shared.timeout.as_secs_f64(),
                    waiting_for,
                });
            }
            let (next, _) = shared
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner());
            state = next;
            if state.generation > generation {
                return Ok(Arc::clone(&state.result));
            }
            if let Some(error) = peer_failed(&state) {
                return Err(error);
            }
        }
    }
}

impl Drop for LocalRank {
    fn drop(&mut self) {
        if !self.done {
            self.fail("its communicator was dropped (the rank ended)");
        }
    }
}

fn host(buffer: &Tensor) -> Result<Vec<f32>, CommError> {
    Ok(buffer
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?)
}

impl Communicator for LocalRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world_size
    }
    fn all_reduce_sum(&self, buffer: &Tensor) -> Result<Tensor, CommError> {
        let result = self.collective("all-reduce", host(buffer)?, Combine::Sum)?;
        Ok(Tensor::from_slice(&result, result.len(), buffer.device())?)
    }
    fn broadcast(&self, buffer: &Tensor, root: usize) -> Result<Tensor, CommError> {
        if root >= self.shared.world_size {
            return Err(CommError::Mismatch {
                rank: self.rank,
                operation: "broadcast",
                message: format!("root {root} in a world of {}", self.shared.world_size),
            });
        }
        let contribution = if root == self.rank {
            host(buffer)?
        } else {
            Vec::new()
        };
        let result = self.collective("broadcast", contribution, Combine::From(root))?;
        if result.len() != buffer.elem_count() {
            return Err(CommError::Mismatch {
                rank: self.rank,
                operation: "broadcast",
                message: format!(
                    "{} elements here, {} from root {root}",
                    buffer.elem_count(),
                    result.len()
                ),
            });
        }
        Ok(Tensor::from_slice(&result, result.len(), buffer.device())?)
    }
    fn barrier(&self) -> Result<(), CommError> {
        self.collective("barrier", Vec::new(), Combine::Nothing)?;
        Ok(())
    }
}
