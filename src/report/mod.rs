//! The only code that writes to the terminal: logging setup, progress bars, run summaries,
//! rendered diagnostics, `--json` output. Everything else returns data or sends events.
#![expect(
    clippy::print_stderr,
    clippy::print_stdout,
    reason = "the reporter is the one place that writes to the terminal"
)]

pub mod generate;
pub mod inspect;
pub mod preview;
pub mod run;
pub mod status;

/// Set up `tracing` (RUST_LOG, default warn; stderr).
pub fn init_logging(quiet: bool) {
    let default = if quiet { "error" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Print an error line to stderr.
pub fn error(message: &str) {
    eprintln!("error: {message}");
}

/// Print a warning line to stderr.
pub fn warning(message: &str) {
    eprintln!("warning: {message}");
}

/// A block of text on stderr (a trailing newline is added when missing).
pub fn write_stderr(text: &str) {
    if text.ends_with('\n') {
        eprint!("{text}");
    } else {
        eprintln!("{text}");
    }
}

/// A block of text on stdout (a trailing newline is added when missing).
pub fn write_stdout(text: &str) {
    if text.ends_with('\n') {
        print!("{text}");
    } else {
        println!("{text}");
    }
}

/// Pretty JSON on stdout (`--json`).
pub fn json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(error) => eprintln!("error: cannot encode the JSON output: {error}"),
    }
}
pub mod problems;

/// `peftpipe bench train`: a readable summary on stderr and the `RESULT {...}` JSON line on stdout
/// (with `--json`, only the JSON object).
pub fn bench_train(result: &crate::train::bench::BenchResult, json_only: bool) {
    let line = serde_json::to_string(result).unwrap_or_default();
    if json_only {
        println!("{line}");
        return;
    }
    eprintln!(
        "LoRA r{} α{} on {} ({} params, {} trainable), {} {}, batch {} × {}",
        result.rank,
        result.alpha,
        result.model_type,
        result.base_parameters,
        result.trainable_parameters,
        result.device,
        result.dtype,
        result.batch,
        result.sequence_length
    );
    eprintln!(
        "  {:.0} tokens/s (median of {} steps after {} warm-up) · step {:.1} ms = forward {:.1} + backward {:.1} + optimizer {:.1}",
        result.tokens_per_second,
        result.timed_steps,
        result.warmup_steps,
        result.step_ms,
        result.forward_ms,
        result.backward_ms,
        result.optimizer_ms
    );
    eprintln!(
        "  peak memory {:.2} GiB ({})",
        result.peak_memory_bytes as f64 / (1u64 << 30) as f64,
        result.peak_memory_source
    );
    println!("RESULT {line}");
}
