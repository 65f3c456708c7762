//! Start one process per GPU on this host, as torchrun does: rank `r` gets `RANK=r`,
//! `LOCAL_RANK=r`, `WORLD_SIZE`, `NODE_RANK=0`, `MASTER_ADDR=127.0.0.1`, `MASTER_PORT`,
//! `NCCL_NVLS_ENABLE=0` and `CUDA_VISIBLE_DEVICES` set to the chosen GPUs (all of them, in order:
//! NCCL then sees every peer for NVLink/P2P, and the rank's device ordinal is its `LOCAL_RANK`).
//! The launcher waits for all of them: the first child that fails (non-zero exit or a signal)
//! ends the others (killed) and the launch with an error naming its rank; a run that outlives the
//! timeout is killed whole, and so is one whose caller cancels it. Never prints: the children's
//! output goes where the caller's does, or line by line to the caller ([`launch_with`]).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What to start.
#[derive(Debug, Clone)]
pub struct LaunchPlan {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Physical GPU indices, one rank each.
    pub devices: Vec<usize>,
    /// Rank 0's rendezvous port.
    pub master_port: u16,
}

/// Why a launch failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot start rank {rank} ({program}): {source}")]
    Spawn {
        rank: usize,
        program: String,
        source: std::io::Error,
    },
    #[error("rank {rank} (GPU {device}) failed: {status}; the other ranks were stopped{output}")]
    RankFailed {
        rank: usize,
        device: usize,
        status: ExitStatus,
        /// The last lines the rank wrote to stderr (each on its own indented line), when the
        /// launch captured the output.
        output: String,
    },
    #[error("cancelled: every rank was stopped")]
    Cancelled,
    #[error(
        "the run did not finish within {seconds:.0} s (rank(s) {running:?} still running); all \
         ranks were stopped"
    )]
    Timeout { seconds: f64, running: Vec<usize> },
    #[error("waiting for rank {rank}: {source}")]
    Wait { rank: usize, source: std::io::Error },
    #[error("no devices to launch on")]
    NoDevices,
}

impl LaunchPlan {
    /// The environment of rank `rank`.
    pub fn environment(&self, rank: usize) -> Vec<(&'static str, String)> {
        let visible = self
            .devices
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(",");
        vec![
            ("RANK", rank.to_string()),
            ("LOCAL_RANK", rank.to_string()),
            ("WORLD_SIZE", self.devices.len().to_string()),
            ("NODE_RANK", "0".into()),
            ("MASTER_ADDR", "127.0.0.1".into()),
            ("MASTER_PORT", self.master_port.to_string()),
            ("CUDA_VISIBLE_DEVICES", visible),
            ("NCCL_NVLS_ENABLE", "0".into()),
        ]
    }
}

/// Which output of a rank a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Receives a rank's output line: `(rank, stream, line)`.
pub type OutputSink<'a> = dyn FnMut(usize, Stream, &str) + 'a;

/// How [`launch_with`] watches the ranks.
#[derive(Default)]
pub struct Watch<'a> {
    /// Stop every rank once the run has lasted this long (`None`: no limit; a hung rank still
    /// ends the others' collectives within their own timeout).
    pub timeout: Option<Duration>,
    /// Stop every rank once this is set (Ctrl-C in the launching process).
    pub cancel: Option<&'a AtomicBool>,
    /// Receives every line the ranks write, as `(rank, stream, line)`, in the order they
    /// arrive. `None`: the ranks write to this process's stdout and stderr.
    pub output: Option<&'a mut OutputSink<'a>>,
}

/// The last lines of a rank's stderr kept for its error.
const KEPT_LINES: usize = 20;

/// Start every rank and wait for all of them (see the module docs), with a time limit.
pub fn launch(plan: &LaunchPlan, timeout: Duration) -> Result<(), LaunchError> {
    launch_with(
        plan,
        Watch {
            timeout: Some(timeout),
            ..Watch::default()
        },
    )
}

/// Start every rank and wait for all of them, watched as `watch` says. With an output callback,
/// a rank that fails is reported with the last lines it wrote to stderr.
pub fn launch_with(plan: &LaunchPlan, mut watch: Watch<'_>) -> Result<(), LaunchError> {
    if plan.devices.is_empty() {
        return Err(LaunchError::NoDevices);
    }
    let capture = watch.output.is_some();
    let (sender, receiver) = mpsc::channel::<(usize, Stream, String)>();
    let mut children: Vec<Option<Child>> = Vec::new();
    let mut readers = Vec::new();
    for rank in 0..plan.devices.len() {
        let mut command = Command::new(&plan.program);
        command.args(&plan.args).envs(plan.environment(rank));
        if capture {
            command.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        match command.spawn() {
            Ok(mut child) => {
                if capture {
                    if let Some(stdout) = child.stdout.take() {
                        readers.push(forward_lines(stdout, rank, Stream::Stdout, sender.clone()));
                    }
                    if let Some(stderr) = child.stderr.take() {
                        readers.push(forward_lines(stderr, rank, Stream::Stderr, sender.clone()));
                    }
                }
                children.push(Some(child));
            }
            Err(source) => {
                stop(&mut children);
                return Err(LaunchError::Spawn {
                    rank,
                    program: plan.program.display().to_string(),
                    source,
                });
            }
        }
    }
    drop(sender);
    let mut kept: Vec<VecDeque<String>> = vec![VecDeque::new(); plan.devices.len()];
    let mut drain = |watch: &mut Watch<'_>, wait: Duration| {
        let mut deliver = |(rank, stream, line): (usize, Stream, String)| {
            if stream == Stream::Stderr {
                let lines: &mut VecDeque<String> = &mut kept[rank];
                if lines.len() == KEPT_LINES {
                    lines.pop_front();
                }
                lines.push_back(line.clone());
            }
            if let Some(output) = watch.output.as_mut() {
                output(rank, stream, &line);
            }
        };
        if let Ok(first) = receiver.recv_timeout(wait) {
            deliver(first);
            while let Ok(next) = receiver.try_recv() {
                deliver(next);
            }
        }
    };
    let started = Instant::now();
    let result = loop {
        let mut running = Vec::new();
        let mut failed = None;
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot.as_mut() else {
                continue;
            };
            match child.try_wait() {
                Ok(Some(status)) if status.success() => *slot = None,
                Ok(Some(status)) => {
                    *slot = None;
                    failed = Some(Ok((rank, status)));
                    break;
                }
                Ok(None) => running.push(rank),
                Err(source) => {
                    failed = Some(Err(LaunchError::Wait { rank, source }));
                    break;
                }
            }
        }
        match failed {
            Some(Ok((rank, status))) => {
                stop(&mut children);
                break Err((rank, status));
            }
            Some(Err(error)) => {
                stop(&mut children);
                return Err(error);
            }
            None => {}
        }
        if running.is_empty() {
            break Ok(());
        }
        if watch
            .cancel
            .is_some_and(|cancel| cancel.load(Ordering::Relaxed))
        {
            stop(&mut children);
            return Err(LaunchError::Cancelled);
        }
        if watch
            .timeout
            .is_some_and(|timeout| started.elapsed() >= timeout)
        {
            stop(&mut children);
            return Err(LaunchError::Timeout {
                seconds: watch.timeout.unwrap_or_default().as_secs_f64(),
                running,
            });
        }
        if capture {
            drain(&mut watch, Duration::from_millis(50));
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // Every child has ended: read what is left of their output.
    for reader in readers {
        let _ = reader.join();
    }
    if capture {
        drain(&mut watch, Duration::ZERO);
    }
    result.map_err(|(rank, status)| LaunchError::RankFailed {
        rank,
        device: plan.devices[rank],
        status,
        output: kept[rank]
            .iter()
            .map(|line| format!("\n  {line}"))
            .collect(),
    })
}

/// A thread sending each line of `source` to `sender` as `(rank, stream, line)`.
fn forward_lines(
    source: impl Read + Send + 'static,
    rank: usize,
    stream: Stream,
    sender: mpsc::Sender<(usize, Stream, String)>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(source).lines() {
            let Ok(line) = line else { break };
            if sender.send((rank, stream, line)).is_err() {
                break;
            }
        }
    })
}

/// Kill and reap the children still running (each by its own handle).
fn stop(children: &mut [Option<Child>]) {
    for child in children.iter_mut().flatten() {
        let _ = child.kill();
        let _ = child.wait();
    }
}
