//! A train stage on several devices (`devices:` or `run --devices N`): the stage, in the `run`
//! process, writes its [`TrainJob`] to a file and starts one `peftpipe train-rank JOB` process per
//! GPU through [`launch`](crate::train::distributed::launch) ([`train_on_devices`]); each process
//! reads its place in the world from the torchrun variables the launcher sets, joins the others
//! (NCCL; a world of one needs no communicator) and trains its shard of every batch
//! ([`run_rank`], through the same [`train_job`] as a run without `devices`). Rank 0 writes the
//! artifact into the stage's output directory and reports progress, notes and its outcome to the
//! stage as JSON lines on its stdout; the stage forwards them to the run's progress sink, so the
//! executor, the cache and the reporter see one stage as usual. Any rank that fails stops the
//! others and fails the stage with that rank's last stderr lines; Ctrl-C stops them all (the
//! checkpoints stay, and the next run resumes). The stage's output directory is the executor's
//! staging directory: nothing lands in the cache unless every rank finished.
//!
//! With `device: cpu` a world of one device is accepted (one worker process, no communicator):
//! the path CI can run. Several GPUs need a build with `--features nccl`.
//!
//! **Under an outside launcher** (`torchrun --nproc-per-node 2 peftpipe run p.yaml`, or one such
//! command per host with `--nnodes`/`--node-rank`: every process has torchrun's variables with
//! `WORLD_SIZE > 1`): rank 0 runs the pipeline; every other rank [`follow`]s it. A train stage on
//! rank 0 hands its job to the followers through the rendezvous on `MASTER_ADDR:MASTER_PORT`
//! ([`lead`]) and trains as rank 0; each follower trains its shard and waits for the next job;
//! when rank 0's run ends it [`dismiss`]es them. The job names files by rank 0's paths, so on
//! several hosts the project and the cache must be on a shared filesystem at the same path (as
//! torchrun jobs usually have). A follower whose job fails reports it on its stderr and exits
//! non-zero when dismissed; a rank 0 that dies leaves the followers to the launcher, which stops
//! the others when one fails (torchrun does).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use serde::{Deserialize, Serialize};

use super::{train_job, TrainJob};
use crate::config::train::{device_kind, DevicesConfig};
use crate::stages::{NullSink, Progress, ProgressSink, StageError};
use crate::train::distributed::launch::{launch_with, LaunchError, LaunchPlan, Stream, Watch};
use crate::train::distributed::{Communicator, Solo, World};

/// The hidden subcommand a rank process runs: `peftpipe train-rank JOB.json`.
pub const RANK_COMMAND: &str = "train-rank";

/// What rank 0 tells the launching stage, one JSON object per stdout line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RankMessage {
    Progress {
        position: u64,
        length: Option<u64>,
        message: String,
    },
    Note(String),
    Warning(String),
    Outcome(BTreeMap<String, serde_json::Value>),
}

/// Train `job` on `devices`, one rank process each (see the module docs); returns rank 0's
/// outcome summary.
pub fn train_on_devices(
    job: &TrainJob,
    devices: &DevicesConfig,
    progress: &dyn ProgressSink,
    cancel: &AtomicBool,
) -> Result<BTreeMap<String, serde_json::Value>, StageError> {
    let user = |message: String| StageError::User(format!("devices: {message}"));
    let kind = device_kind(&job.device).map_err(user)?;
    let indices = if kind == "cpu" {
        devices.resolve(Some(1)).map_err(|_| {
            user(
                "data-parallel training over several devices needs CUDA, and the device is cpu \
                 (on the CPU only one device is accepted)"
                    .into(),
            )
        })?
    } else {
        devices.resolve(visible_gpus()).map_err(user)?
    };
    if indices.len() > 1 && !cfg!(feature = "nccl") {
        return Err(user(format!(
            "training on {} GPUs needs a peftpipe built with NCCL (`cargo build --release \
             --features nccl`); this one was built without it",
            indices.len()
        )));
    }
    // The indices count the GPUs this process sees: under CUDA_VISIBLE_DEVICES they are
    // positions in its list, which the ranks get as it is written.
    let physical =
        physical_devices(&indices, std::env::var("CUDA_VISIBLE_DEVICES").ok()).map_err(user)?;

    let mut file = tempfile::Builder::new()
        .prefix("peftpipe-train-job-")
        .suffix(".json")
        .tempfile()
        .map_err(|error| StageError::Internal(format!("writing the rank job: {error}")))?;
    let text = serde_json::to_vec(job).map_err(|error| StageError::Internal(error.to_string()))?;
    file.write_all(&text)
        .and_then(|()| file.flush())
        .map_err(|error| StageError::Internal(format!("writing the rank job: {error}")))?;

    let program = std::env::current_exe().map_err(|error| {
        StageError::Internal(format!("finding the peftpipe executable: {error}"))
    })?;
    let plan = LaunchPlan {
        program,
        args: vec![RANK_COMMAND.into(), file.path().as_os_str().to_owned()],
        devices: physical,
        master_port: free_port()?,
    };
    let world = indices.len();
    let mut outcome = None;
    let mut unreadable = None;
    let mut forward = |rank: usize, stream: Stream, line: &str| {
        if rank != 0 || stream != Stream::Stdout {
            return;
        }
        match serde_json::from_str::<RankMessage>(line) {
            Ok(RankMessage::Progress {
                position,
                length,
                message,
            }) => progress.progress(Progress {
                position,
                length,
                unit: "steps",
                message: if world > 1 {
                    format!("{message} · {world} GPUs")
                } else {
                    message
                },
            }),
            Ok(RankMessage::Note(note)) => progress.note(note),
            Ok(RankMessage::Warning(warning)) => progress.warning(warning),
            Ok(RankMessage::Outcome(summary)) => outcome = Some(summary),
            Err(_) => unreadable = Some(line.to_string()),
        }
    };
    launch_with(
        &plan,
        Watch {
            timeout: None,
            cancel: Some(cancel),
            output: Some(&mut forward),
        },
    )
    .map_err(|error| match error {
        LaunchError::Cancelled => StageError::Cancelled,
        other => StageError::User(format!("training on {world} device(s): {other}")),
    })?;
    let mut summary = outcome.ok_or_else(|| {
        StageError::Internal(format!(
            "rank 0 finished without reporting its outcome{}",
            unreadable
                .map(|line| format!(" (it wrote `{line}`)"))
                .unwrap_or_default()
        ))
    })?;
    summary.insert("devices".into(), serde_json::json!(world));
    Ok(summary)
}

/// How many GPUs this process sees (`None` when it cannot tell: a build without CUDA, or no
/// driver).
fn visible_gpus() -> Option<usize> {
    #[cfg(feature = "cuda")]
    {
        candle_core::cuda_backend::cudarc::driver::CudaContext::device_count()
            .ok()
            .and_then(|count| usize::try_from(count).ok())
    }
    #[cfg(not(feature = "cuda"))]
    {
        None
    }
}

/// The `CUDA_VISIBLE_DEVICES` entries of `indices` when this process runs under one (as
/// numbers: a list of GPU UUIDs is not supported), else the indices themselves.
fn physical_devices(indices: &[usize], visible: Option<String>) -> Result<Vec<usize>, String> {
    let Some(visible) = visible.filter(|text| !text.trim().is_empty()) else {
        return Ok(indices.to_vec());
    };
    let listed: Vec<usize> = visible
        .split(',')
        .map(|entry| entry.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| {
            format!(
                "CUDA_VISIBLE_DEVICES={visible:?} is not a list of GPU numbers (write numbers, \
                 or unset it and list the GPUs in `devices`)"
            )
        })?;
    indices
        .iter()
        .map(|&index| {
            listed.get(index).copied().ok_or_else(|| {
                format!(
                    "GPU {index} does not exist: CUDA_VISIBLE_DEVICES={visible:?} shows {} GPU(s)",
                    listed.len()
                )
            })
        })
        .collect()
}

/// A TCP port free on this host for rank 0's rendezvous.
fn free_port() -> Result<u16, StageError> {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .map_err(|error| StageError::Internal(format!("finding a free port: {error}")))
}

/// Rank 0's progress sink: every update and note as a JSON line on stdout.
struct StdoutSink;

impl StdoutSink {
    fn send(message: &RankMessage) {
        if let Ok(line) = serde_json::to_string(message) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}

impl ProgressSink for StdoutSink {
    fn progress(&self, progress: Progress) {
        Self::send(&RankMessage::Progress {
            position: progress.position,
            length: progress.length,
            message: progress.message,
        });
    }
    fn note(&self, message: String) {
        Self::send(&RankMessage::Note(message));
    }
    fn warning(&self, message: String) {
        Self::send(&RankMessage::Warning(message));
    }
}

/// The body of `peftpipe train-rank JOB`: join the world the torchrun variables describe, train
/// this rank's shard and, on rank 0, write the artifact and report the outcome on stdout.
pub fn run_rank(job_path: &Path) -> Result<(), String> {
    let world = World::from_env().map_err(|error| error.to_string())?;
    let text = std::fs::read(job_path)
        .map_err(|error| format!("reading {}: {error}", job_path.display()))?;
    let job: TrainJob = serde_json::from_slice(&text)
        .map_err(|error| format!("{}: not a train job: {error}", job_path.display()))?;
    let (job, comm) = join_world(job, &world)?;
    let cancel = AtomicBool::new(false);
    let progress: &dyn ProgressSink = if world.is_main() {
        &StdoutSink
    } else {
        &NullSink
    };
    let summary =
        train_job(&job, comm.as_ref(), progress, &cancel).map_err(|error| error.to_string())?;
    if world.is_main() {
        StdoutSink::send(&RankMessage::Outcome(summary));
    }
    Ok(())
}

#[cfg(feature = "nccl")]
fn communicator(world: &World, device: &str) -> Result<Box<dyn Communicator>, String> {
    let device = super::select_device(device)?;
    crate::train::distributed::nccl::NcclCommunicator::new(
        world,
        &device,
        crate::train::distributed::DEFAULT_TIMEOUT,
    )
    .map(|comm| Box::new(comm) as Box<dyn Communicator>)
    .map_err(|error| error.to_string())
}

#[cfg(not(feature = "nccl"))]
fn communicator(world: &World, _device: &str) -> Result<Box<dyn Communicator>, String> {
    Err(format!(
        "rank {} of {}: this peftpipe was built without NCCL (`--features nccl`)",
        world.rank, world.world_size
    ))
}

/// How long a follower waits for rank 0's next job (rank 0 may run other stages for hours).
const FOLLOW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);
/// What rank 0 sends its followers: a train job, or the end of the run.
const JOB_TAG: &[u8] = b"job:";
const EXIT_TAG: &[u8] = b"exit";

/// The job as this rank of `world` trains it (on CUDA, on `cuda:LOCAL_RANK`) and the
/// communicator it trains with (none needed in a world of one).
fn join_world(
    mut job: TrainJob,
    world: &World,
) -> Result<(TrainJob, Box<dyn Communicator>), String> {
    if device_kind(&job.device)? == "cuda" {
        job.device = format!("cuda:{}", world.local_rank);
    }
    let comm: Box<dyn Communicator> = if world.world_size == 1 {
        Box::new(Solo)
    } else {
        communicator(world, &job.device)?
    };
    Ok((job, comm))
}

/// Rank 0's rendezvous address of a world of several ranks.
fn master(world: &World) -> Result<(String, u16), String> {
    world
        .master
        .clone()
        .ok_or_else(|| "a world of several ranks without MASTER_ADDR/MASTER_PORT".to_string())
}

/// Rank 0 of an outside launcher's world: hand `job` to the followers and train it as rank 0.
pub fn lead(
    world: &World,
    job: &TrainJob,
    progress: &dyn ProgressSink,
    cancel: &AtomicBool,
) -> Result<BTreeMap<String, serde_json::Value>, StageError> {
    // One train stage at a time talks to the followers (the executor may run stages in parallel).
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME
        .lock()
        .map_err(|_| StageError::Internal("a previous train stage panicked".into()))?;
    let (_, port) = master(world).map_err(StageError::Internal)?;
    let mut payload = JOB_TAG.to_vec();
    payload
        .extend(serde_json::to_vec(job).map_err(|error| StageError::Internal(error.to_string()))?);
    let failed = |error: String| {
        StageError::User(format!(
            "training on {} ranks (torchrun's world): {error}",
            world.world_size
        ))
    };
    crate::train::distributed::rendezvous::serve(
        port,
        world.world_size,
        &payload,
        crate::train::distributed::DEFAULT_TIMEOUT,
    )
    .map_err(|error| failed(error.to_string()))?;
    let (job, comm) = join_world(job.clone(), world).map_err(failed)?;
    let mut summary = train_job(&job, comm.as_ref(), progress, cancel)?;
    summary.insert("devices".into(), serde_json::json!(world.world_size));
    Ok(summary)
}

/// Rank 0 of an outside launcher's world, at the end of its run: tell the followers to exit
/// (bounded: a follower that is gone is not waited for long).
pub fn dismiss(world: &World) -> Result<(), String> {
    let (_, port) = master(world)?;
    crate::train::distributed::rendezvous::serve(
        port,
        world.world_size,
        EXIT_TAG,
        std::time::Duration::from_secs(60),
    )
    .map_err(|error| error.to_string())
}

/// A rank other than 0 of an outside launcher's world: train every job rank 0 hands out until it
/// says the run is over; `on_failure` hears each job that failed here (the run goes on: rank 0's
/// collectives end with the failure, and it still dismisses everyone). Errors when a job failed
/// (after the run ended) or rank 0 could not be reached.
pub fn follow(world: &World, on_failure: &mut dyn FnMut(&str)) -> Result<(), String> {
    let (address, port) = master(world)?;
    let mut failures = Vec::new();
    loop {
        let payload = crate::train::distributed::rendezvous::join(
            &address,
            port,
            world.rank,
            world.world_size,
            FOLLOW_TIMEOUT,
        )
        .map_err(|error| format!("rank {}: waiting for rank 0: {error}", world.rank))?;
        if payload == EXIT_TAG {
            break;
        }
        let Some(text) = payload.strip_prefix(JOB_TAG) else {
            return Err(format!(
                "rank {}: rank 0 sent an unknown message",
                world.rank
            ));
        };
        let result = serde_json::from_slice::<TrainJob>(text)
            .map_err(|error| format!("not a train job: {error}"))
            .and_then(|job| join_world(job, world))
            .and_then(|(job, comm)| {
                train_job(&job, comm.as_ref(), &NullSink, &AtomicBool::new(false))
                    .map_err(|error| error.to_string())
            });
        if let Err(error) = result {
            on_failure(&format!("rank {}: training failed: {error}", world.rank));
            failures.push(error);
        }
    }
    match failures.len() {
        0 => Ok(()),
        count => Err(format!(
            "rank {}: {count} training job(s) failed on this rank",
            world.rank
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_map_through_cuda_visible_devices() {
        assert_eq!(physical_devices(&[0, 1], None).unwrap(), [0, 1]);
        assert_eq!(
            physical_devices(&[0, 1], Some("4,6,7".into())).unwrap(),
            [4, 6]
        );
        assert_eq!(physical_devices(&[1], Some(" 3 , 5".into())).unwrap(), [5]);
        let missing = physical_devices(&[2], Some("4,6".into())).unwrap_err();
        assert!(missing.contains("GPU 2 does not exist"), "{missing}");
        let uuids = physical_devices(&[0], Some("GPU-1234".into())).unwrap_err();
        assert!(uuids.contains("not a list of GPU numbers"), "{uuids}");
    }

    #[test]
    fn rank_messages_round_trip_as_one_line_each() {
        let message = RankMessage::Progress {
            position: 3,
            length: Some(10),
            message: "loss 1.0".into(),
        };
        let line = serde_json::to_string(&message).unwrap();
        assert!(!line.contains('\n'));
        assert!(matches!(
            serde_json::from_str::<RankMessage>(&line).unwrap(),
            RankMessage::Progress {
                position: 3,
                length: Some(10),
                ..
            }
        ));
    }
}
