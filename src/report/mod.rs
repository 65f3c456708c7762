//! The only code that writes to the terminal: logging setup, progress bars, run summaries,
//! rendered diagnostics, `--json` output. Everything else returns data or sends events.
#![expect(
    clippy::print_stderr,
    reason = "the reporter is the one place that writes to the terminal"
)]

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
