//! Interrupts: Ctrl-C (SIGINT) and SIGTERM, what Slurm, Kubernetes and CI send before they kill.
//!
//! [`install`] runs first thing in `main`. On Unix it blocks both signals in the main thread while
//! no other thread exists yet, so every thread started later inherits the mask (Rust's `Command`
//! clears it again for child processes), and one thread takes them with `sigwait` — safe code,
//! and it knows which signal arrived. Until a command [`arm`]s the cancel flag, a signal ends the
//! process at once with exit code 128 + its number, as the default action would. Once armed (`run`,
//! `preview`), the first signal sets the flag: the executor stops at the next safe point (training
//! at a step boundary, after writing a checkpoint), the summary is printed and the command exits
//! with [`exit_code`] (130 for Ctrl-C, 143 for SIGTERM); a second signal exits at once.
//! Elsewhere than Unix, Ctrl-C only, through the `ctrlc` crate.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, OnceLock};

/// SIGINT's number, the code of an interrupt when no signal was recorded.
const SIGINT: i32 = 2;

struct State {
    cancel: Arc<AtomicBool>,
    armed: AtomicBool,
    /// The first signal received while armed (0: none).
    first: AtomicI32,
}

fn state() -> &'static State {
    static STATE: OnceLock<State> = OnceLock::new();
    STATE.get_or_init(|| State {
        cancel: Arc::new(AtomicBool::new(false)),
        armed: AtomicBool::new(false),
        first: AtomicI32::new(0),
    })
}

/// The exit code of a process ended by `signal`: 128 + its number, as shells report it.
fn code_of(signal: i32) -> u8 {
    u8::try_from(signal.saturating_add(128)).unwrap_or(u8::MAX)
}

/// What a signal does: exit at once (not armed, or a second signal), or ask for a stop.
fn on_signal(signal: i32) {
    let state = state();
    if !state.armed.load(Ordering::SeqCst) {
        std::process::exit(i32::from(code_of(signal)));
    }
    if state
        .first
        .compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        std::process::exit(i32::from(code_of(signal)));
    }
    state.cancel.store(true, Ordering::SeqCst);
}

/// Take over SIGINT and SIGTERM. Call before any thread is started; an error (reported as a
/// warning by the caller) leaves the default actions in place.
#[cfg(unix)]
pub fn install() -> Result<(), String> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block()
        .map_err(|error| format!("cannot block SIGINT/SIGTERM: {error}"))?;
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            while let Ok(signal) = set.wait() {
                on_signal(signal as i32);
            }
        });
    if let Err(error) = spawned {
        let _ = set.thread_unblock();
        return Err(format!("cannot start the signal thread: {error}"));
    }
    Ok(())
}

/// Take over Ctrl-C.
#[cfg(not(unix))]
pub fn install() -> Result<(), String> {
    ctrlc::set_handler(|| on_signal(SIGINT))
        .map_err(|error| format!("cannot install the Ctrl-C handler: {error}"))
}

/// From now on, the first SIGINT/SIGTERM sets the returned flag instead of ending the process.
pub fn arm() -> Arc<AtomicBool> {
    let state = state();
    state.armed.store(true, Ordering::SeqCst);
    Arc::clone(&state.cancel)
}

/// The exit code of an interrupted command: 128 + the first signal received (130 when none was).
pub fn exit_code() -> u8 {
    match state().first.load(Ordering::SeqCst) {
        0 => code_of(SIGINT),
        signal => code_of(signal),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_128_plus_the_signal() {
        assert_eq!(code_of(2), 130);
        assert_eq!(code_of(15), 143);
        assert_eq!(code_of(i32::MAX), u8::MAX);
    }
}
