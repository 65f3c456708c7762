//! Start one process per GPU on this host, as torchrun does: rank `r` gets `RANK=r`,
//! `LOCAL_RANK=r`, `WORLD_SIZE`, `NODE_RANK=0`, `MASTER_ADDR=127.0.0.1`, `MASTER_PORT`,
//! `NCCL_NVLS_ENABLE=0` and `CUDA_VISIBLE_DEVICES` set to the chosen GPUs (all of them, in order:
//! NCCL then sees every peer for NVLink/P2P, and the rank's device ordinal is its `LOCAL_RANK`).
//! The launcher waits for all of them: the first child that fails (non-zero exit or a signal)
//! ends the others (killed) and the launch with an error naming its rank; a run that outlives the
//! timeout is killed whole. Never prints (the children's output goes where the caller's does).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
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
    #[error("rank {rank} (GPU {device}) failed: {status}; the other ranks were stopped")]
    RankFailed {
        rank: usize,
        device: usize,
        status: ExitStatus,
    },
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

/// Start every rank and wait for all of them (see the module docs).
pub fn launch(plan: &LaunchPlan, timeout: Duration) -> Result<(), LaunchError> {
    if plan.devices.is_empty() {
        return Err(LaunchError::NoDevices);
    }
    let mut children: Vec<Option<Child>> = Vec::new();
    for rank in 0..plan.devices.len() {
        let mut command = Command::new(&plan.program);
        command.args(&plan.args).envs(plan.environment(rank));
        match command.spawn() {
            Ok(child) => children.push(Some(child)),
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
    let deadline = Instant::now() + timeout;
    loop {
        let mut running = Vec::new();
        for rank in 0..children.len() {
            let Some(child) = children[rank].as_mut() else {
                continue;
            };
            match child.try_wait() {
                Ok(Some(status)) if status.success() => children[rank] = None,
                Ok(Some(status)) => {
                    children[rank] = None;
                    stop(&mut children);
                    return Err(LaunchError::RankFailed {
                        rank,
                        device: plan.devices[rank],
                        status,
                    });
                }
                Ok(None) => running.push(rank),
                Err(source) => {
                    stop(&mut children);
                    return Err(LaunchError::Wait { rank, source });
                }
            }
        }
        if running.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            stop(&mut children);
            return Err(LaunchError::Timeout {
                seconds: timeout.as_secs_f64(),
                running,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kill and reap the children still running (each by its own handle).
fn stop(children: &mut [Option<Child>]) {
    for child in children.iter_mut().flatten() {
        let _ = child.kill();
        let _ = child.wait();
    }
}
