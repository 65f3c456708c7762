//! Peak memory of one stretch of work (a training run, a benchmark row), measured, not estimated
//! (the estimate is [`super::memory`]): [`PeakMemoryWatch::start`] resets the high-water mark,
//! [`PeakMemoryWatch::peak`] reads it.
//! - CUDA: the high-water mark of bytes in use in the device's default async memory pool (what
//!   candle allocates from), `CU_MEMPOOL_ATTR_USED_MEM_HIGH`, reset to the bytes in use at the
//!   start. Not counted: the CUDA context and what the pool holds beyond what is in use.
//! - CPU: the process's peak resident set size (`VmHWM` in `/proc/self/status`), reset at the
//!   start through `/proc/self/clear_refs` (Linux). It is the whole process's peak while the work
//!   ran — what was resident before (the program, earlier stages' data) included, and, when two
//!   CPU stages run at once, the other one's memory too. Another watch's reset also drops what
//!   this one saw before it, so a CPU peak whose stretch overlapped another CPU watch says so
//!   ([`PeakMemory::shared`]). Where the mark cannot be reset (not Linux, or `clear_refs`
//!   refused), there is no figure: a process-lifetime peak would not belong to this work.
//!
//! Knows nothing of stages or pipelines; never prints.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use candle_core::Device;
use serde::{Deserialize, Serialize};

/// CPU watches running now, and started ever (each start resets the process's mark).
static CPU_WATCHES_RUNNING: AtomicUsize = AtomicUsize::new(0);
static CPU_WATCHES_STARTED: AtomicU64 = AtomicU64::new(0);

/// Where a peak was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeakMemorySource {
    /// The CUDA default memory pool's high-water mark of bytes in use.
    CudaPool,
    /// The process's peak resident set size.
    ProcessRss,
}

impl PeakMemorySource {
    /// For people (and `bench train`'s `peak_memory_source`).
    pub fn describe(self) -> &'static str {
        match self {
            PeakMemorySource::CudaPool => "cuda default mempool USED_MEM_HIGH",
            PeakMemorySource::ProcessRss => "process peak RSS (VmHWM)",
        }
    }
}

/// A measured peak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeakMemory {
    pub bytes: u64,
    pub source: PeakMemorySource,
    /// The process-wide mark was also reset and raised by other work measured at the same time
    /// (CPU stages running at once): the figure is the process's, not this work's alone.
    pub shared: bool,
}

/// A high-water mark reset at [`PeakMemoryWatch::start`].
#[derive(Debug)]
pub struct PeakMemoryWatch {
    #[cfg_attr(
        not(feature = "cuda"),
        expect(dead_code, reason = "only a CUDA device is read back")
    )]
    device: Device,
    /// Whether the mark was reset (without a reset, there is no figure for this stretch).
    reset: bool,
    /// CPU: whether another CPU watch was running at the start, and how many had started then
    /// (`None` on CUDA).
    cpu: Option<(bool, u64)>,
}

impl PeakMemoryWatch {
    /// Reset the high-water mark of `device`'s memory (the pool on CUDA, the process on CPU).
    pub fn start(device: &Device) -> Self {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cuda) = device {
            return PeakMemoryWatch {
                device: device.clone(),
                reset: cuda_pool::reset_used_high(cuda).is_ok(),
                cpu: None,
            };
        }
        let others = CPU_WATCHES_RUNNING.fetch_add(1, Ordering::SeqCst) > 0;
        let started = CPU_WATCHES_STARTED.fetch_add(1, Ordering::SeqCst) + 1;
        PeakMemoryWatch {
            device: device.clone(),
            reset: reset_process_peak(),
            cpu: Some((others, started)),
        }
    }

    /// The peak since [`PeakMemoryWatch::start`], or `None` when it cannot be read or was not
    /// reset.
    pub fn peak(&self) -> Option<PeakMemory> {
        if !self.reset {
            return None;
        }
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cuda) = &self.device {
            return cuda_pool::used_high(cuda).ok().map(|bytes| PeakMemory {
                bytes,
                source: PeakMemorySource::CudaPool,
                shared: false,
            });
        }
        let shared = self.cpu.is_some_and(|(others, started)| {
            others || CPU_WATCHES_STARTED.load(Ordering::SeqCst) != started
        });
        process_peak().map(|bytes| PeakMemory {
            bytes,
            source: PeakMemorySource::ProcessRss,
            shared,
        })
    }
}

impl Drop for PeakMemoryWatch {
    fn drop(&mut self) {
        if self.cpu.is_some() {
            CPU_WATCHES_RUNNING.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Reset the process's `VmHWM` to its current RSS (`echo 5 > /proc/self/clear_refs`).
fn reset_process_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", b"5").is_ok() && process_peak().is_some()
}

/// The process's `VmHWM` in bytes.
fn process_peak() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(feature = "cuda")]
mod cuda_pool {
    use candle_core::cuda_backend::cudarc::driver::sys;

    /// The device's default async memory pool (what candle allocates from).
    fn default_pool(device: &candle_core::CudaDevice) -> Result<sys::CUmemoryPool, String> {
        let stream = device.cuda_stream();
        let context = stream.context();
        context
            .bind_to_thread()
            .map_err(|error| format!("binding the CUDA context: {error:?}"))?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        #[expect(
            unsafe_code,
            reason = "finding the default memory pool is a CUDA driver call"
        )]
        // SAFETY: `pool` is a valid out-pointer of the type the driver writes (CUmemoryPool);
        // the device handle comes from a live context.
        let result = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device()) };
        if result != sys::CUresult::CUDA_SUCCESS {
            return Err(format!("cuDeviceGetDefaultMemPool: {result:?}"));
        }
        Ok(pool)
    }

    /// `CU_MEMPOOL_ATTR_USED_MEM_HIGH`: the high-water mark of bytes in use.
    pub fn used_high(device: &candle_core::CudaDevice) -> Result<u64, String> {
        let pool = default_pool(device)?;
        let mut value: u64 = 0;
        #[expect(
            unsafe_code,
            reason = "reading the memory pool's high-water mark is a CUDA driver call"
        )]
        // SAFETY: `value` is a valid out-pointer of the type the attribute is (cuuint64_t); the
        // pool comes from `default_pool`.
        let result = unsafe {
            sys::cuMemPoolGetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut value as *mut u64).cast(),
            )
        };
        if result != sys::CUresult::CUDA_SUCCESS {
            return Err(format!("cuMemPoolGetAttribute: {result:?}"));
        }
        Ok(value)
    }

    /// Reset the high-water mark to the bytes in use now (the driver accepts only 0, which
    /// means exactly that).
    pub fn reset_used_high(device: &candle_core::CudaDevice) -> Result<(), String> {
        let pool = default_pool(device)?;
        let mut zero: u64 = 0;
        #[expect(
            unsafe_code,
            reason = "resetting the memory pool's high-water mark is a CUDA driver call"
        )]
        // SAFETY: `zero` is a valid pointer to a cuuint64_t, the type the attribute takes; the
        // pool comes from `default_pool`.
        let result = unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut zero as *mut u64).cast(),
            )
        };
        if result != sys::CUresult::CUDA_SUCCESS {
            return Err(format!("cuMemPoolSetAttribute: {result:?}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[expect(clippy::print_stderr, reason = "the test says why it skips")]
    fn the_cpu_peak_grows_by_what_is_touched_after_the_reset() {
        let watch = PeakMemoryWatch::start(&Device::Cpu);
        let Some(start) = watch.peak() else {
            eprintln!("skipped: this system cannot reset the process's peak RSS");
            return;
        };
        assert_eq!(start.source, PeakMemorySource::ProcessRss);
        // Another watch starting meanwhile resets the same mark: the figure is marked shared.
        let other = PeakMemoryWatch::start(&Device::Cpu);
        drop(other);
        // Touch 64 MiB: the peak grows by about that much.
        let during = vec![1u8; 64 << 20];
        std::hint::black_box(&during);
        let end = watch.peak().expect("a peak");
        drop(during);
        assert!(end.shared);
        assert!(
            end.bytes >= start.bytes + (60 << 20),
            "{} → {}",
            start.bytes,
            end.bytes
        );
    }
}
