//! The only code that writes to the terminal: logging setup, progress bars, run summaries,
//! rendered diagnostics, `--json` output. Everything else returns data or sends events.
//!
//! Every write goes through [`write_stdout`] / [`write_stderr`] (the `print!` family is refused
//! by clippy here too): they never panic. A closed pipe (`peftpipe status x.yaml | head -1`)
//! makes the rest of that stream's output go nowhere and the command ends with its own exit
//! code. Rust ignores SIGPIPE, so the write returns EPIPE; `print!` would panic on it (exit 101).
//! Restoring SIGPIPE's default instead would kill `run` mid-training, without summary or
//! checkpoint, whenever a log reader went away.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU8, Ordering};

pub mod format;
pub mod generate;
pub mod html;
pub mod inspect;
pub mod metrics;
pub mod preview;
pub mod problems;
pub mod run;
pub mod status;

/// `--color`: when stderr gets ANSI colors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ColorChoice {
    /// A terminal, and `NO_COLOR` unset or empty.
    #[default]
    Auto,
    Always,
    Never,
}

/// The process's color choice (set once by the command line; `Auto` until then).
static COLOR: AtomicU8 = AtomicU8::new(0);

/// Set the color choice for every later write.
pub fn set_color(choice: ColorChoice) {
    let code = match choice {
        ColorChoice::Auto => 0,
        ColorChoice::Always => 1,
        ColorChoice::Never => 2,
    };
    COLOR.store(code, Ordering::Relaxed);
}

/// Whether stderr gets ANSI colors under the color choice.
pub fn color_stderr() -> bool {
    match COLOR.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let no_color = std::env::var_os("NO_COLOR").is_some_and(|value| !value.is_empty());
            !no_color && std::io::stderr().is_terminal()
        }
    }
}

/// Set up `tracing` (RUST_LOG, else warn; `-q` error, `-v` info, `-vv` debug; stderr).
pub fn init_logging(quiet: bool, verbose: u8) {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Write `text` to `stream` and flush. Errors (a closed pipe, a full disk behind a
/// redirection) are dropped: output is a courtesy, never a reason to fail or panic.
fn emit(mut stream: impl Write, text: &str) {
    let _ = stream.write_all(text.as_bytes());
    let _ = stream.flush();
}

/// `text` with a trailing newline added when missing.
fn as_lines(text: &str) -> std::borrow::Cow<'_, str> {
    if text.ends_with('\n') {
        std::borrow::Cow::Borrowed(text)
    } else {
        std::borrow::Cow::Owned(format!("{text}\n"))
    }
}

/// Print an error line to stderr.
pub fn error(message: &str) {
    write_stderr(&format!(
        "error: {}",
        crate::exec::without_backtrace(message)
    ));
}

/// Print a warning line to stderr.
pub fn warning(message: &str) {
    write_stderr(&format!("warning: {message}"));
}

/// A block of text on stderr (a trailing newline is added when missing).
pub fn write_stderr(text: &str) {
    emit(std::io::stderr().lock(), &as_lines(text));
}

/// A block of text on stdout (a trailing newline is added when missing).
pub fn write_stdout(text: &str) {
    emit(std::io::stdout().lock(), &as_lines(text));
}

/// Text on stdout exactly as given (no newline added).
pub fn write_stdout_raw(text: &str) {
    emit(std::io::stdout().lock(), text);
}

/// Text on stderr exactly as given (no newline added).
pub fn write_stderr_raw(text: &str) {
    emit(std::io::stderr().lock(), text);
}

/// Pretty JSON on stdout (`--json`).
pub fn json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => write_stdout(&text),
        Err(error) => self::error(&format!("cannot encode the JSON output: {error}")),
    }
}

/// `peftpipe bench train`: a readable summary on stderr and the `RESULT {...}` JSON line on stdout
/// (with `--json`, only the JSON object).
pub fn bench_train(result: &crate::train::bench::BenchResult, json_only: bool) {
    let line = serde_json::to_string(result).unwrap_or_default();
    if json_only {
        write_stdout(&line);
        return;
    }
    write_stderr(&format!(
        "{} on {} ({} params, {} trainable), {} {}, batch {} × {}{}\n  {:.0} tokens/s (median of {} steps after {} warm-up) · step {:.1} ms = forward {:.1} + backward {:.1} + optimizer {:.1} · MFU {:.1}% of {} TFLOP/s\n  peak memory {:.2} GiB ({})",
        result.method,
        result.model_type,
        result.base_parameters,
        result.trainable_parameters,
        result.device,
        result.dtype,
        result.batch,
        result.sequence_length,
        match (result.activation_checkpointing, result.activation_offload) {
            (true, true) => ", activation checkpointing offloaded to the host",
            (true, false) => ", activation checkpointing",
            _ => "",
        },
        result.tokens_per_second,
        result.timed_steps,
        result.warmup_steps,
        result.step_ms,
        result.forward_ms,
        result.backward_ms,
        result.optimizer_ms,
        100.0 * result.mfu,
        result.peak_tflops,
        result.peak_memory_bytes as f64 / (1u64 << 30) as f64,
        result.peak_memory_source
    ));
    write_stdout(&format!("RESULT {line}"));
}

/// A bench row's checkpointing setting as `bench train --checkpointing` spells it and the table
/// shows it: `off`, `on` or `offload` (on, layer inputs on the host).
pub(crate) fn checkpointing_label(checkpointing: bool, offload: bool) -> &'static str {
    match (checkpointing, offload) {
        (true, true) => "offload",
        (true, false) => "on",
        _ => "off",
    }
}

/// `bench train` over several shapes / checkpointing settings: one table on stderr and a
/// `RESULT {...}` line per row on stdout; with `--json`, one JSON array on stdout.
pub fn bench_train_table(rows: &[crate::train::bench::BenchRow], json_only: bool) {
    use crate::train::bench::BenchRow;
    if json_only {
        write_stdout(&serde_json::to_string(rows).unwrap_or_default());
        return;
    }
    let mut text = String::new();
    if let Some(BenchRow::Measured(first)) = rows.first() {
        text.push_str(&format!(
            "{} on {} ({} params, {} trainable), {} {}; MFU against {} TFLOP/s\n",
            first.method,
            first.model_type,
            first.base_parameters,
            first.trainable_parameters,
            first.device,
            first.dtype,
            first.peak_tflops
        ));
    }
    text.push_str(&format!(
        "{:<11} {:<13} {:>10} {:>28} {:>7} {:>9} {:>14}\n",
        "shape",
        "checkpointing",
        "tokens/s",
        "step ms (fwd/bwd/opt)",
        "MFU",
        "peak GiB",
        "launches/step"
    ));
    for row in rows {
        match row {
            BenchRow::Measured(r) => text.push_str(&format!(
                "{:<11} {:<13} {:>10.0} {:>28} {:>6.1}% {:>9.2} {:>14}\n",
                format!("{}x{}", r.batch, r.sequence_length),
                checkpointing_label(r.activation_checkpointing, r.activation_offload),
                r.tokens_per_second,
                format!(
                    "{:.1} ({:.1}/{:.1}/{:.1})",
                    r.step_ms, r.forward_ms, r.backward_ms, r.optimizer_ms
                ),
                100.0 * r.mfu,
                r.peak_memory_bytes as f64 / (1u64 << 30) as f64,
                r.launches_per_step
                    .map_or_else(|| "-".to_string(), |n| format!("{n:.0}")),
            )),
            BenchRow::Failed {
                batch,
                sequence_length,
                activation_checkpointing,
                activation_offload,
                error,
            } => text.push_str(&format!(
                "{:<11} {:<13} failed: {error}\n",
                format!("{batch}x{sequence_length}"),
                checkpointing_label(*activation_checkpointing, *activation_offload),
            )),
        }
    }
    write_stderr(text.trim_end());
    for row in rows {
        write_stdout(&format!(
            "RESULT {}",
            serde_json::to_string(row).unwrap_or_default()
        ));
    }
}
