//! NCCL through cudarc (`candle-core/nccl` → `cudarc/nccl`, NCCL loaded at run time from the
//! host's `libnccl.so.2`). Rank 0 creates the unique id, [`super::rendezvous`] hands it to the
//! others, then every rank joins the NCCL communicator on its candle device's stream, so
//! collectives are ordered with the rank's own kernels.
//!
//! Time bound: a collective is enqueued on the stream and its completion is polled against the
//! deadline (a CUDA event); on timeout the communicator is aborted (cudarc's `Drop` calls
//! `ncclCommAbort`, which also frees the peers' kernels from waiting on us) and
//! [`CommError::Timeout`] comes back. `ncclCommInitRank` itself has no timeout in NCCL's blocking
//! mode; the rendezvous just before it bounds the common failure (a rank that never started).
//!
//! Untested here: this file needs a machine with several GPUs (see the report of issue 12).

use super::{rendezvous, CommError, Communicator, World};
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::CudaStorage;
use candle_core::op::BackpropOp;
use candle_core::{Device, Storage, Tensor};
use std::cell::RefCell;
use std::time::{Duration, Instant};

/// One rank's NCCL communicator.
pub struct NcclCommunicator {
    comm: RefCell<Option<Comm>>,
    device: candle_core::CudaDevice,
    rank: usize,
    world_size: usize,
    timeout: Duration,
}

fn nccl(error: impl std::fmt::Debug) -> CommError {
    CommError::Nccl(format!("{error:?}"))
}

impl NcclCommunicator {
    /// Join the world on `device` (the rank's GPU, `LOCAL_RANK`): rendezvous, then NCCL init.
    pub fn new(world: &World, device: &Device, timeout: Duration) -> Result<Self, CommError> {
        let Device::Cuda(cuda) = device else {
            return Err(CommError::Nccl(format!(
                "NCCL needs a CUDA device, rank {} has {device:?}",
                world.rank
            )));
        };
        // NVLink multicast (NVLS) stays off; a user's explicit setting wins.
        if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
            std::env::set_var("NCCL_NVLS_ENABLE", "0");
        }
        let (address, port) = world.master.clone().ok_or_else(|| {
            CommError::Rendezvous(
                "a world of several ranks needs MASTER_ADDR and MASTER_PORT".into(),
            )
        })?;
        let id = if world.rank == 0 {
            let id = Id::new().map_err(nccl)?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            rendezvous::serve(port, world.world_size, &bytes, timeout)?;
            id
        } else {
            let bytes = rendezvous::join(&address, port, world.rank, world.world_size, timeout)?;
            let internal: [std::ffi::c_char; 128] = bytes
                .iter()
                .map(|&b| b as std::ffi::c_char)
                .collect::<Vec<_>>()
                .try_into()
                .map_err(|v: Vec<std::ffi::c_char>| {
                    CommError::Rendezvous(format!(
                        "rank 0 sent a {}-byte NCCL id, expected 128",
                        v.len()
                    ))
                })?;
            Id::uninit(internal)
        };
        let comm =
            Comm::from_rank(cuda.cuda_stream(), world.rank, world.world_size, id).map_err(nccl)?;
        Ok(Self {
            comm: RefCell::new(Some(comm)),
            device: cuda.clone(),
            rank: world.rank,
            world_size: world.world_size,
            timeout,
        })
    }

    /// Run `enqueue` on the communicator, then wait for the stream up to the timeout.
    fn bounded(
        &self,
        operation: &'static str,
        enqueue: impl FnOnce(&Comm) -> Result<(), CommError>,
    ) -> Result<(), CommError> {
        let mut slot = self.comm.borrow_mut();
        let comm = slot.as_ref().ok_or_else(|| CommError::PeerFailed {
            rank: self.rank,
            operation,
            failed: self.rank,
            reason: "an earlier collective timed out and the communicator was aborted".into(),
        })?;
        enqueue(comm)?;
        let stream = self.device.cuda_stream();
        let event = stream.record_event(None).map_err(nccl)?;
        let deadline = Instant::now() + self.timeout;
        while !event.is_complete() {
            if Instant::now() >= deadline {
                // Dropping the Comm aborts it (ncclCommAbort).
                slot.take();
                return Err(CommError::Timeout {
                    rank: self.rank,
                    operation,
                    seconds: self.timeout.as_secs_f64(),
                    waiting_for: Vec::new(),
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    fn contiguous_f32(
        &self,
        buffer: &Tensor,
        operation: &'static str,
    ) -> Result<Tensor, CommError> {
        if buffer.dtype() != candle_core::DType::F32 || buffer.rank() != 1 {
            return Err(CommError::Mismatch {
                rank: self.rank,
                operation,
                message: format!(
                    "expects a 1-D f32 buffer, got {:?} {:?}",
                    buffer.dtype(),
                    buffer.shape()
                ),
            });
        }
        Ok(buffer.contiguous()?)
    }

    /// Copy `buffer` into a fresh device slice and run `op` on it in place.
    fn in_place(
        &self,
        buffer: &Tensor,
        operation: &'static str,
        op: impl FnOnce(
            &Comm,
            &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
        ) -> Result<(), CommError>,
    ) -> Result<Tensor, CommError> {
        let buffer = self.contiguous_f32(buffer, operation)?;
        let count = buffer.elem_count();
        let mut out = {
            let (storage, layout) = buffer.storage_and_layout();
            let Storage::Cuda(storage) = &*storage else {
                return Err(CommError::Nccl(format!(
                    "{operation}: the buffer is not on a CUDA device"
                )));
            };
            let slice = storage.as_cuda_slice::<f32>()?;
            let offset = layout.start_offset();
            let stream = self.device.cuda_stream();
            stream
                .clone_dtod(&slice.slice(offset..offset + count))
                .map_err(nccl)?
        };
        self.bounded(operation, |comm| op(comm, &mut out))?;
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, self.device.clone()));
        Ok(Tensor::from_storage(
            storage,
            count,
            BackpropOp::none(),
            false,
        ))
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn all_reduce_sum(&self, buffer: &Tensor) -> Result<Tensor, CommError> {
        self.in_place(buffer, "all-reduce", |comm, slice| {
            comm.all_reduce_in_place(slice, &ReduceOp::Sum)
                .map(|_| ())
                .map_err(nccl)
        })
    }
    fn broadcast(&self, buffer: &Tensor, root: usize) -> Result<Tensor, CommError> {
        if root >= self.world_size {
            return Err(CommError::Mismatch {
                rank: self.rank,
                operation: "broadcast",
                message: format!("root {root} in a world of {}", self.world_size),
            });
        }
        self.in_place(buffer, "broadcast", |comm, slice| {
            comm.broadcast_in_place(slice, root as i32)
                .map(|_| ())
                .map_err(nccl)
        })
    }
    fn barrier(&self) -> Result<(), CommError> {
        // NCCL has no barrier: an all-reduce of one element is one.
        let one = Tensor::ones(
            1,
            candle_core::DType::F32,
            &Device::Cuda(self.device.clone()),
        )?;
        self.all_reduce_sum(&one).map(|_| ())
    }
}
