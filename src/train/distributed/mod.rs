//! Data-parallel training: who this process is in the run (the [`World`]), how ranks talk (a
//! [`Communicator`]), which rows of a global batch a rank reads ([`shard_rows`]) and how the ranks'
//! gradients become one ([`average_gradients`]). Knows nothing of models, adapters, pipelines or
//! the cache; never prints.
//!
//! # The world
//! A run of `W` ranks is one process per GPU. The processes are started either by
//! [`launch::launch`] (one child per GPU on this host, for `peftpipe run --devices N`) or by an
//! outside launcher (torchrun, accelerate, a cluster's own scripts) that sets the torchrun
//! variables: `RANK` (global rank, `0..WORLD_SIZE`), `WORLD_SIZE`, `LOCAL_RANK` (the rank on
//! its host, which picks the CUDA device ordinal), `MASTER_ADDR`/`MASTER_PORT` (where rank 0
//! listens for the rendezvous) and, for several hosts, `NODE_RANK`. [`World::from_env`] reads them: none set is a world of one (single-GPU training);
//! some set and some missing, a value that does not parse, or `RANK >= WORLD_SIZE` is an error
//! naming the variable and its value. Several hosts work through the same variables: every host
//! runs one process per GPU with its own `NODE_RANK` and the same `MASTER_ADDR` (a host rank 0
//! can be reached at) and `MASTER_PORT`.
//!
//! # Status
//! A train stage with `devices:` (or `peftpipe run --devices N`) launches one
//! `peftpipe train-rank` process per GPU through [`launch::launch_with`]
//! (`stages::train::ranks`); each rank reads its world with [`World::from_env`], joins the
//! others through `nccl::NcclCommunicator` (a world of one needs none) and trains through
//! [`crate::train::train_data_parallel`]; rank 0 writes the artifact and the checkpoints.
//! Tested on the CPU: the collectives, sharding and averaging with in-process ranks, the stage's
//! job on 2 in-process ranks against 1 (and resumed on another number of ranks), and the launch
//! path end to end as a world of one device. Under an outside launcher (torchrun's variables on
//! every `peftpipe run`, one host or several) rank 0 runs the pipeline and hands each train job to
//! the other ranks (`stages::train::ranks::{lead, follow}`). Not done: overlapping the all-reduce
//! with the backward (the gradients are averaged after it). The NCCL path compiles but has not run
//! on several GPUs (no multi-GPU machine was lent).
//!
//! # Communicators
//! [`Communicator`] is the three collectives data parallelism needs: all-reduce-sum of an f32
//! buffer, broadcast from a root, barrier. Every call is bounded by the communicator's timeout: a
//! rank that died or hangs ends the others' call with [`CommError::Timeout`] or
//! [`CommError::PeerFailed`] naming the rank and the operation, never a silent hang.
//! - [`Solo`] is the world of one: every collective is the identity. Single-GPU training goes
//!   through the same calls.
//! - `nccl::NcclCommunicator` (with `--features nccl`, which implies `cuda`) is NCCL through
//!   cudarc's bindings; candle's cudarc links the host's `libnccl.so.2` dynamically, so only a
//!   binary built with the feature needs NCCL to start. Rank 0 creates the NCCL unique id and
//!   hands it to the others through [`rendezvous`] (a small TCP exchange on
//!   `MASTER_ADDR:MASTER_PORT`, std::net, bounded in time). `NCCL_NVLS_ENABLE=0` is set before
//!   the communicator is created (NVLink multicast stays off). NCCL is the only transport for real
//!   runs; there is no home-made one.
//! - [`local::LocalGroup`] is `W` ranks as threads of one process, for tests only: it sums in
//!   rank order, so every rank gets bit-identical results, and it honours the same timeout and
//!   peer-failure rules.
//!
//! # Sharding and the effective batch
//! `batch_size` (and `gradient_accumulation`) in a pipeline are *global*: one optimizer step sees
//! the same `batch_size × accumulation` rows whatever the world size. Every rank builds the same
//! seeded global batch order; rank `r` of `W` takes rows `r, r + W, r + 2W, …` of each global
//! micro-batch ([`shard_rows`]; strided, so length-sorted batches spread their long rows over the
//! ranks). The loss of a step is the mean NLL over the scored tokens of the whole global step, so a
//! rank scales its backward by `W / N` (`N` the global scored tokens, which every rank knows
//! because it holds the whole batch order) and [`average_gradients`] sums the ranks' gradients and
//! divides by `W`: the result is the full-batch gradient. For `W` a power of two the scale by `W`
//! and the division by `W` are exact in floating point, so the only difference from one GPU is the
//! order of the floating-point sums. Clipping (the global norm) and AdamW then run on the averaged
//! gradients, identically on every rank, so the parameters stay bit-identical across ranks.
//!
//! # Fingerprint rule
//! The world size changes results only through the order of floating-point sums (a rounding
//! difference, the same kind as a different GPU kernel), so it is **not** part of a stage's
//! fingerprint: a cached adapter trained on 2 GPUs is reused by a 1-GPU run of the same pipeline
//! and vice versa. The `devices` setting is likewise not hashed.
//!
//! # Gradient buckets
//! [`average_gradients`] flattens the gradients of the trainable variables, in the optimizer's
//! order, into f32 buckets of at most `bucket_elements` elements (a larger tensor is a bucket of
//! its own), all-reduces each bucket, divides by `W` and unflattens into the original shapes and
//! dtypes. Before the buckets, one small all-reduce of a presence mask makes the ranks agree on
//! which variables have a gradient at all: a variable with a gradient on some rank gets zeros on
//! the others (as its full-batch gradient would include them); one with none on every rank keeps
//! `None` (AdamW skips it, as it would on one GPU).

pub mod launch;
pub mod local;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod rendezvous;
mod world;

pub use world::{World, WorldError};

use candle_core::{DType, Tensor};
use std::time::Duration;

/// Default bound on one collective (and on the rendezvous): a rank that has not arrived by then
/// is taken as dead or hung.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Default gradient bucket: 25 Mi f32 elements (100 MiB), torch DDP's bucket size order.
pub const DEFAULT_BUCKET_ELEMENTS: usize = 25 * 1024 * 1024;

/// Why a collective failed.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error(
        "rank {rank}: {operation} timed out after {seconds:.0} s waiting for rank(s) {waiting_for:?} \
         (a rank died or hangs)"
    )]
    Timeout {
        rank: usize,
        operation: &'static str,
        seconds: f64,
        waiting_for: Vec<usize>,
    },
    #[error("rank {rank}: {operation} failed because rank {failed} stopped: {reason}")]
    PeerFailed {
        rank: usize,
        operation: &'static str,
        failed: usize,
        reason: String,
    },
    #[error("rank {rank}: {operation}: {message}")]
    Mismatch {
        rank: usize,
        operation: &'static str,
        message: String,
    },
    #[error("rendezvous: {0}")]
    Rendezvous(String),
    #[error("NCCL: {0}")]
    Nccl(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// The collectives data-parallel training needs. Buffers are 1-D f32 tensors on the rank's
/// device; every rank must call the same collectives in the same order with the same lengths.
pub trait Communicator {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// The element-wise sum of `buffer` over all ranks, on every rank.
    fn all_reduce_sum(&self, buffer: &Tensor) -> Result<Tensor, CommError>;
    /// `buffer` of rank `root`, on every rank (the others' `buffer` gives the length).
    fn broadcast(&self, buffer: &Tensor, root: usize) -> Result<Tensor, CommError>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<(), CommError>;
}

/// The world of one rank: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct Solo;

impl Communicator for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, buffer: &Tensor) -> Result<Tensor, CommError> {
        Ok(buffer.clone())
    }
    fn broadcast(&self, buffer: &Tensor, root: usize) -> Result<Tensor, CommError> {
        if root != 0 {
            return Err(CommError::Mismatch {
                rank: 0,
                operation: "broadcast",
                message: format!("root {root} in a world of one"),
            });
        }
        Ok(buffer.clone())
    }
    fn barrier(&self) -> Result<(), CommError> {
        Ok(())
    }
}

/// The rows of a global micro-batch that `rank` of `world_size` reads: positions
/// `rank, rank + W, rank + 2W, …` of `rows` (strided). Over all ranks every row is read exactly
/// once; a rank gets nothing when the batch has fewer rows than ranks.
pub fn shard_rows(rows: &[usize], rank: usize, world_size: usize) -> Vec<usize> {
    assert!(
        world_size > 0 && rank < world_size,
        "rank {rank} outside a world of {world_size}"
    );
    rows.iter()
        .skip(rank)
        .step_by(world_size)
        .copied()
        .collect()
}

/// The scale a rank applies to its summed shard loss before its backward, so that the average
/// over ranks ([`average_gradients`]) is the gradient of the global mean loss: `W / N`, with `N`
/// the global step's scored tokens.
pub fn backward_scale(world_size: usize, global_scored_tokens: usize) -> f64 {
    world_size as f64 / global_scored_tokens.max(1) as f64
}

/// Replace every rank's gradients of the trainable variables (in the optimizer's order;
/// `variables` gives each one's shape and dtype, for the zeros a rank without a gradient
/// contributes) with their average over the ranks. See the module docs for the bucketing and the `None` rule.
pub fn average_gradients(
    comm: &dyn Communicator,
    gradients: &mut [Option<Tensor>],
    variables: &[&Tensor],
    bucket_elements: usize,
) -> Result<(), CommError> {
    let world = comm.world_size();
    if world == 1 {
        return Ok(());
    }
    if gradients.len() != variables.len() {
        return Err(CommError::Mismatch {
            rank: comm.rank(),
            operation: "gradient averaging",
            message: format!(
                "{} gradients for {} variables",
                gradients.len(),
                variables.len()
            ),
        });
    }
    let Some(first) = variables.first() else {
        return Ok(());
    };
    let device = first.device().clone();
    // Which variables have a gradient on any rank.
    let mask: Vec<f32> = gradients
        .iter()
        .map(|g| if g.is_some() { 1.0 } else { 0.0 })
        .collect();
    let mask = Tensor::from_vec(mask, gradients.len(), &device)?;
    let present = comm.all_reduce_sum(&mask)?.to_vec1::<f32>()?;

    let wanted: Vec<usize> = (0..variables.len()).filter(|&i| present[i] > 0.0).collect();
    let scale = 1.0 / world as f64;
    let mut start = 0;
    while start < wanted.len() {
        // One bucket: consecutive variables up to `bucket_elements` (at least one).
        let mut end = start + 1;
        let mut elements = variables[wanted[start]].elem_count();
        while end < wanted.len() {
            let next = variables[wanted[end]].elem_count();
            if elements + next > bucket_elements {
                break;
            }
            elements += next;
            end += 1;
        }
        let members = &wanted[start..end];
        let flat: Vec<Tensor> = members
            .iter()
            .map(|&i| match &gradients[i] {
                Some(g) => g.to_dtype(DType::F32)?.flatten_all(),
                None => Tensor::zeros(variables[i].elem_count(), DType::F32, &device),
            })
            .collect::<candle_core::Result<_>>()?;
        let bucket = Tensor::cat(&flat, 0)?;
        let summed = comm.all_reduce_sum(&bucket)?.affine(scale, 0.0)?;
        let mut offset = 0;
        for &i in members {
            let variable = variables[i];
            let count = variable.elem_count();
            let averaged = summed
                .narrow(0, offset, count)?
                .reshape(variable.shape())?
                .to_dtype(variable.dtype())?;
            gradients[i] = Some(averaged);
            offset += count;
        }
        start = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
