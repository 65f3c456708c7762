//! Compiles each `kernels/NAME.cu` to PTX with nvcc, only for `--features cuda` (the default build
//! has no CUDA toolchain and needs none). The PTX lands in `$OUT_DIR/NAME.ptx` (`peftpipe.cu` keeps
//! the name `peftpipe_kernels.ptx`), which the Rust module that launches its kernels embeds
//! (`src/ops/cuda.rs`, ...); the driver JIT-compiles it for the GPU at first use. nvcc is found as
//! `$NVCC`, `$CUDA_HOME/bin/nvcc` or `nvcc` on PATH; the virtual architecture is
//! `compute_$CUDA_COMPUTE_CAP` (default 90, Hopper), as candle-kernels does; the files in
//! `SM90A_ONLY` use Hopper's arch-specific instructions and are compiled for `compute_90a` (an
//! empty module when the capability is not 90). `kernels/*/` holds headers they include.

use std::path::PathBuf;
use std::process::Command;

/// `kernels/NAME.cu` files compiled for `compute_90a` (Hopper's arch-specific features).
const SM90A_ONLY: [&str; 1] = ["flash_wgmma"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for variable in ["NVCC", "CUDA_HOME", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={variable}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| match std::env::var("CUDA_HOME") {
        Ok(home) => format!("{home}/bin/nvcc"),
        Err(_) => "nvcc".to_string(),
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let mut sources: Vec<PathBuf> = std::fs::read_dir("kernels")
        .expect("reading kernels/")
        .map(|entry| entry.expect("reading kernels/").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "cu"))
        .collect();
    sources.sort();
    for source in sources {
        // kernels/peftpipe.cu keeps its historical PTX name; every other kernels/NAME.cu becomes
        // $OUT_DIR/NAME.ptx, embedded by the Rust module that launches it.
        let stem = source
            .file_stem()
            .and_then(|stem| stem.to_str())
            .expect("kernel file names are UTF-8");
        let name = if stem == "peftpipe" {
            "peftpipe_kernels"
        } else {
            stem
        };
        let target = out.join(format!("{name}.ptx"));
        // Hopper-only kernels (wgmma, setmaxnreg, TMA) exist in the arch-specific target
        // compute_90a alone, whose PTX the driver compiles for sm_90 GPUs only: built for a
        // CUDA_COMPUTE_CAP of 90, an empty module otherwise (its Rust side never loads one).
        let arch = if SM90A_ONLY.contains(&stem) {
            if cap != "90" {
                std::fs::write(&target, "").expect("writing an empty PTX module");
                continue;
            }
            "compute_90a".to_string()
        } else {
            format!("compute_{cap}")
        };
        let result = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", "-lineinfo"])
            .arg(format!("-arch={arch}"))
            .arg(&source)
            .arg("-o")
            .arg(&target)
            .output()
            .unwrap_or_else(|error| panic!("running {nvcc}: {error} (set NVCC or CUDA_HOME)"));
        assert!(
            result.status.success(),
            "nvcc failed on {}:\n{}",
            source.display(),
            String::from_utf8_lossy(&result.stderr)
        );
    }
}
