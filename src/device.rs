//! Device and compute-dtype selection, in one place: `auto | cpu | cuda[:N]` → a candle `Device`,
//! and the compute dtype for it (f32 on CPU; bf16 on CUDA unless asked otherwise).
//!
//! Must not: decide anything else about training (batch sizes, precision of adapter weights).

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

/// Which device the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// CUDA device 0 when this binary was built with CUDA and a GPU is visible, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

/// The compute dtype the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeSpec {
    /// f32 on CPU, bf16 on CUDA.
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error("unknown device `{0}` (expected auto, cpu, cuda or cuda:N)")]
    UnknownDevice(String),
    #[error("unknown dtype `{0}` (expected auto, f32, bf16 or f16)")]
    UnknownDType(String),
    #[error("device `{0}` needs CUDA, but this peftpipe was built without it (rebuild with `--features cuda`)")]
    NotBuiltWithCuda(String),
    #[error("cannot open CUDA device {ordinal}: {message}")]
    Cuda { ordinal: usize, message: String },
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|ordinal| ordinal.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| DeviceError::UnknownDevice(other.to_string())),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => formatter.write_str("auto"),
            Self::Cpu => formatter.write_str("cpu"),
            Self::Cuda(ordinal) => write!(formatter, "cuda:{ordinal}"),
        }
    }
}

impl FromStr for DTypeSpec {
    type Err = DeviceError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim() {
            "auto" => Ok(Self::Auto),
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "float16" => Ok(Self::F16),
            other => Err(DeviceError::UnknownDType(other.to_string())),
        }
    }
}

impl fmt::Display for DTypeSpec {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        })
    }
}

/// Whether this binary was built with the `cuda` feature.
pub const fn built_with_cuda() -> bool {
    cfg!(feature = "cuda")
}

/// Open the device `spec` names.
pub fn resolve_device(spec: DeviceSpec) -> Result<Device, DeviceError> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Auto => {
            if built_with_cuda() && candle_core::utils::cuda_is_available() {
                open_cuda(0)
            } else {
                Ok(Device::Cpu)
            }
        }
        DeviceSpec::Cuda(ordinal) => {
            if !built_with_cuda() {
                return Err(DeviceError::NotBuiltWithCuda(spec.to_string()));
            }
            open_cuda(ordinal)
        }
    }
}

fn open_cuda(ordinal: usize) -> Result<Device, DeviceError> {
    let cuda_error = |error: candle_core::Error| DeviceError::Cuda {
        ordinal,
        message: error.to_string(),
    };
    let device = Device::new_cuda(ordinal).map_err(cuda_error)?;
    // Keep freed memory in CUDA's pool instead of handing it back to the driver at every
    // synchronisation (the 1B LoRA optimizer phase went from 22 to 0.6 ms on the H200);
    // `PEFTPIPE_POOL_RELEASE=1` restores CUDA's default.
    #[cfg(feature = "cuda")]
    crate::ops::cuda::keep_pool(&device).map_err(cuda_error)?;
    // The backward's gradient sums by peftpipe's add kernel (`PEFTPIPE_UNFUSED=grad_add`: candle's).
    #[cfg(feature = "cuda")]
    crate::ops::cuda::install_gradient_add();
    Ok(device)
}

/// The compute dtype for `device`: `Auto` is f32 on CPU and bf16 on CUDA.
pub fn compute_dtype(device: &Device, spec: DTypeSpec) -> DType {
    match spec {
        DTypeSpec::F32 => DType::F32,
        DTypeSpec::Bf16 => DType::BF16,
        DTypeSpec::F16 => DType::F16,
        DTypeSpec::Auto if device.is_cuda() => DType::BF16,
        DTypeSpec::Auto => DType::F32,
    }
}

/// A short name for reports and fingerprints: `cpu`, `cuda:0`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_specs() {
        assert_eq!("auto".parse(), Ok(DeviceSpec::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        assert!("gpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn cpu_computes_in_f32_by_default() -> Result<(), DeviceError> {
        let device = resolve_device(DeviceSpec::Cpu)?;
        assert_eq!(compute_dtype(&device, DTypeSpec::Auto), DType::F32);
        assert_eq!(compute_dtype(&device, DTypeSpec::Bf16), DType::BF16);
        Ok(())
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        assert!(matches!(
            resolve_device(DeviceSpec::Cuda(0)),
            Err(DeviceError::NotBuiltWithCuda(_))
        ));
        assert_eq!(
            resolve_device(DeviceSpec::Auto).ok().map(|d| d.is_cpu()),
            Some(true)
        );
    }
}
