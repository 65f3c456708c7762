//! Activations kept in host memory between a forward and its backward (activation offloading,
//! as Unsloth's offloaded checkpointing does): [`HostStash::keep`] copies a CUDA tensor into a
//! page-locked host buffer of its slot and lets the device buffer go; [`HostStash::take`]
//! copies it back into a new device tensor. Both copies are asynchronous on the device's stream,
//! so they are ordered with the kernels around them without the host waiting: the device buffer
//! is freed stream-ordered after the copy out, the copy back runs before the kernels that read
//! it, and a slot's host buffer is reused only by copies queued after the last one that read it.
//! Each slot's buffer grows to the largest tensor kept in it and is reused step after step; the
//! stash waits for the device before it frees them. On the CPU (and when disabled) a kept tensor
//! stays as it is.
//! Must not: be read by the host while copies are in flight (nothing here does).

use std::sync::Mutex;

use candle_core::{Device, Result, Tensor};

/// A tensor kept by [`HostStash::keep`].
pub enum Kept {
    /// Still on its device (CPU, or offloading off).
    Device(Tensor),
    /// In the host buffer of `slot`.
    Host {
        slot: usize,
        shape: candle_core::Shape,
        dtype: candle_core::DType,
        device: Device,
    },
}

/// Page-locked host buffers, one per slot (a decoder layer), for activations offloaded between
/// forward and backward.
pub struct HostStash {
    enabled: bool,
    #[cfg(feature = "cuda")]
    slots: Mutex<Vec<Option<cuda::PinnedBuffer>>>,
    /// The device the copies were queued on (waited for before the buffers are freed).
    device: Mutex<Option<Device>>,
}

impl HostStash {
    /// A stash that offloads CUDA tensors when `enabled`.
    pub fn new(enabled: bool) -> Self {
        HostStash {
            enabled,
            #[cfg(feature = "cuda")]
            slots: Mutex::default(),
            device: Mutex::default(),
        }
    }

    /// Whether CUDA tensors go to host memory.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Keep `x` in `slot` until [`HostStash::take`]: in host memory when offloading a CUDA
    /// tensor, else as it is. A slot holds one tensor at a time.
    pub fn keep(&self, slot: usize, x: Tensor) -> Result<Kept> {
        let copyable = matches!(
            x.dtype(),
            candle_core::DType::BF16 | candle_core::DType::F32 | candle_core::DType::F64
        );
        if !self.enabled || !x.device().is_cuda() || !copyable {
            return Ok(Kept::Device(x));
        }
        #[cfg(feature = "cuda")]
        {
            let x = x.contiguous()?;
            let bytes = x.elem_count() * x.dtype().size_in_bytes();
            let mut slots = self
                .slots
                .lock()
                .map_err(|_| candle_core::Error::Msg("host stash: poisoned lock".into()))?;
            if slots.len() <= slot {
                slots.resize_with(slot + 1, || None);
            }
            let device = x.device().clone();
            let grown = match slots[slot].take() {
                Some(buffer) if buffer.bytes() >= bytes => buffer,
                old => {
                    // A larger buffer: the old one may still be read by a queued copy.
                    if old.is_some() {
                        device.synchronize()?;
                    }
                    drop(old);
                    cuda::PinnedBuffer::new(bytes)?
                }
            };
            let buffer = slots[slot].insert(grown);
            cuda::copy_to_host(&x, buffer)?;
            if let Ok(mut last) = self.device.lock() {
                last.get_or_insert_with(|| device.clone());
            }
            Ok(Kept::Host {
                slot,
                shape: x.shape().clone(),
                dtype: x.dtype(),
                device,
            })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = slot;
            Ok(Kept::Device(x))
        }
    }

    /// The tensor `kept` holds, on its device.
    pub fn take(&self, kept: Kept) -> Result<Tensor> {
        match kept {
            Kept::Device(x) => Ok(x),
            #[cfg(feature = "cuda")]
            Kept::Host {
                slot,
                shape,
                dtype,
                device,
            } => {
                let slots = self
                    .slots
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("host stash: poisoned lock".into()))?;
                let buffer = slots.get(slot).and_then(Option::as_ref).ok_or_else(|| {
                    candle_core::Error::Msg(format!("host stash: slot {slot} holds nothing"))
                })?;
                let x = Tensor::zeros(shape, dtype, &device)?;
                cuda::copy_from_host(buffer, &x)?;
                Ok(x)
            }
            #[cfg(not(feature = "cuda"))]
            Kept::Host { slot, .. } => Err(candle_core::Error::Msg(format!(
                "host stash: slot {slot} in a build without CUDA"
            ))),
        }
    }
}

impl Drop for HostStash {
    fn drop(&mut self) {
        // Copies may still be queued on the device: wait for them before freeing their buffers.
        if let Ok(Some(device)) = self.device.get_mut() {
            let _ = device.synchronize();
        }
    }
}

#[cfg(feature = "cuda")]
#[expect(
    unsafe_code,
    reason = "page-locked host memory and asynchronous copies are CUDA driver calls on raw pointers"
)]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    use candle_core::{Result, Storage, Tensor};

    /// Page-locked host memory (`cuMemHostAlloc`), freed on drop.
    pub struct PinnedBuffer {
        ptr: *mut u8,
        bytes: usize,
    }

    // SAFETY: the buffer is plain host memory owned by this value; the stash's lock serializes
    // access from the host, and the device only touches it through copies queued on a stream.
    unsafe impl Send for PinnedBuffer {}

    impl PinnedBuffer {
        pub fn new(bytes: usize) -> Result<Self> {
            let size = bytes.max(1);
            // SAFETY: a plain allocation call; the pointer is checked and owned from here on.
            let ptr = unsafe { result::malloc_host(size, 0) }
                .map_err(|error| candle_core::Error::Msg(format!("pinned host memory: {error}")))?;
            if ptr.is_null() {
                candle_core::bail!("pinned host memory: cuMemHostAlloc returned null");
            }
            Ok(PinnedBuffer {
                ptr: ptr.cast(),
                bytes: size,
            })
        }

        pub fn bytes(&self) -> usize {
            self.bytes
        }
    }

    impl Drop for PinnedBuffer {
        fn drop(&mut self) {
            // SAFETY: allocated by cuMemHostAlloc; the stash synchronized the devices first.
            let _ = unsafe { result::free_host(self.ptr.cast()) };
        }
    }

    /// `(device address, stream)` of a contiguous CUDA tensor.
    fn address(x: &Tensor) -> Result<(sys::CUdeviceptr, sys::CUstream)> {
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cuda(cuda) = &*storage else {
            candle_core::bail!("host stash: the tensor is not on a CUDA device")
        };
        let Some((start, _)) = layout.contiguous_offsets() else {
            candle_core::bail!("host stash: the tensor must be contiguous")
        };
        let stream = cuda.device.cuda_stream();
        let base = super::super::cuda::address_at(cuda, start)?;
        Ok((base, stream.cu_stream()))
    }

    /// `x`'s size in bytes, which must fit in `buffer` (`direction`: "into" / "from", for the error).
    fn fitting_bytes(x: &Tensor, buffer: &PinnedBuffer, direction: &str) -> Result<usize> {
        let bytes = x.elem_count() * x.dtype().size_in_bytes();
        if bytes > buffer.bytes {
            candle_core::bail!(
                "host stash: {bytes} bytes {direction} a buffer of {}",
                buffer.bytes
            );
        }
        Ok(bytes)
    }

    /// Queue the copy of `x` into `buffer` on `x`'s stream.
    pub fn copy_to_host(x: &Tensor, buffer: &mut PinnedBuffer) -> Result<()> {
        let bytes = fitting_bytes(x, buffer, "into")?;
        let (src, stream) = address(x)?;
        // SAFETY: `buffer` holds at least `bytes` bytes and outlives the copy (it is freed only
        // after the stash synchronized the device); `src` is `bytes` bytes of `x`, whose device
        // memory is freed stream-ordered after this copy.
        let dst = unsafe { std::slice::from_raw_parts_mut(buffer.ptr, bytes) };
        unsafe { result::memcpy_dtoh_async(dst, src, stream) }
            .map_err(|error| candle_core::Error::Msg(format!("host stash: copy out: {error}")))
    }

    /// Queue the copy of `buffer`'s first bytes into `x` (contiguous, fresh) on `x`'s stream.
    pub fn copy_from_host(buffer: &PinnedBuffer, x: &Tensor) -> Result<()> {
        let bytes = fitting_bytes(x, buffer, "from")?;
        let (dst, stream) = address(x)?;
        // SAFETY: `buffer` holds at least `bytes` bytes and outlives the copy; `x` is a fresh
        // tensor of `bytes` bytes no other handle writes.
        let src = unsafe { std::slice::from_raw_parts(buffer.ptr, bytes) };
        unsafe { result::memcpy_htod_async(dst, src, stream) }
            .map_err(|error| candle_core::Error::Msg(format!("host stash: copy back: {error}")))
    }
}
