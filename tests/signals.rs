//! The process against its environment: SIGTERM (what Slurm, Kubernetes and CI send) stops a
//! training run at a step boundary with a checkpoint and the summary, exit 143, and the rerun
//! resumes to the result of a clean run; a closed stdout or stderr pipe (`| head`) never panics
//! (and a `run` whose stderr reader went away finishes its work).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn peftpipe(dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_peftpipe"));
    command
        .args(args)
        .current_dir(dir)
        .env_remove("PEFTPIPE_CACHE_DIR")
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1");
    command
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Training long enough to be caught mid-way, no periodic checkpoint before the signal.
const STEPS: u64 = 300;

fn training_project() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let root = dir.path().canonicalize().expect("canonical path");
    let data = repo().join("datasets/quickstart/reviews.parquet");
    let model = repo().join("datasets/quickstart/model");
    let pipeline = format!(
        r#"name: term
seed: 5
stages:
  data:
    ingest:
      path: {data}
      columns: [text, label]
      drop_nulls: true
  prompts:
    template:
      input: data
      prompt: "review: {{{{ text }}}}\nsentiment:"
      completion: " {{{{ label }}}}"
  train:
    train:
      data: prompts
      model: {model}
      method:
        lora: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}}
      learning_rate: 0.003
      batch_size: 8
      max_steps: {STEPS}
      checkpoint_every: 1000
      max_seq_len: 48
      device: cpu
"#,
        data = data.display(),
        model = model.display()
    );
    std::fs::write(root.join("pipeline.yaml"), pipeline).expect("write pipeline");
    (dir, root)
}

/// The trained adapter's bytes and the summary's final loss.
fn trained(root: &Path) -> (Vec<u8>, serde_json::Value) {
    let out = root.join(".peftpipe/out/term/train");
    let adapter =
        std::fs::read(out.join("adapter/adapter_model.safetensors")).expect("the trained adapter");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).expect("summary.json"))
            .expect("summary JSON");
    (adapter, summary)
}

/// Checkpoint step folders under the cache's `checkpoints/<pipeline>/<stage>/<fingerprint>/`.
fn checkpoints(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![root.join(".peftpipe/cache/checkpoints")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("step-") {
                found.push(name);
            } else if entry.path().is_dir() {
                stack.push(entry.path());
            }
        }
    }
    found
}

#[test]
fn sigterm_mid_training_checkpoints_exits_143_and_the_rerun_resumes_to_the_clean_result() {
    let (_clean_dir, clean) = training_project();
    let reference = peftpipe(&clean, &["run", "pipeline.yaml"])
        .output()
        .expect("run peftpipe");
    assert!(reference.status.success(), "{}", text(&reference.stderr));
    let (clean_adapter, clean_summary) = trained(&clean);

    let (_dir, root) = training_project();
    let mut child = peftpipe(&root, &["run", "pipeline.yaml"])
        .env("RUST_LOG", "peftpipe::report::run=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn peftpipe");
    let stderr = child.stderr.take().expect("stderr");
    let (lines, received) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            all.push_str(&line);
            all.push('\n');
            let _ = lines.send(line);
        }
        all
    });
    // Wait for the third training step to be reported, then SIGTERM.
    let deadline = Instant::now() + Duration::from_secs(60);
    let step = regex::Regex::new(r"train: (\d+)/(\d+) steps").expect("regex");
    loop {
        let line = received
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("training reported its steps before the deadline");
        if let Some(captures) = step.captures(&line) {
            if captures[1].parse::<u64>().expect("step") >= 3 {
                break;
            }
        }
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(killed.success());
    let status = wait_at_most(&mut child, Duration::from_secs(60), "run after SIGTERM");
    let stderr = reader.join().expect("stderr reader");
    assert_eq!(status.code(), Some(143), "{stderr}");
    assert!(stderr.contains("Interrupted pipeline term"), "{stderr}");
    assert!(stderr.contains("Cancelled train"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let saved = checkpoints(&root);
    assert_eq!(
        saved.len(),
        1,
        "one checkpoint, written on SIGTERM: {saved:?}"
    );
    let stopped_at: u64 = saved[0]
        .trim_start_matches("step-")
        .parse()
        .expect("step number");
    assert!(
        (3..STEPS).contains(&stopped_at),
        "stopped at step {stopped_at}"
    );

    let rerun = peftpipe(&root, &["run", "pipeline.yaml"])
        .output()
        .expect("rerun peftpipe");
    let rerun_stderr = text(&rerun.stderr);
    assert!(rerun.status.success(), "{rerun_stderr}");
    assert!(
        rerun_stderr.contains(&format!("resumed from the checkpoint at step {stopped_at}")),
        "{rerun_stderr}"
    );
    let (adapter, summary) = trained(&root);
    assert!(
        adapter == clean_adapter,
        "the resumed adapter differs from a clean run's"
    );
    assert_eq!(summary["final_loss"], clean_summary["final_loss"]);
    assert_eq!(summary["steps"], serde_json::json!(STEPS));
}

/// Wait for `child`, killing it (and failing) after `limit`.
fn wait_at_most(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("poll") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("peftpipe {what} did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Everything a stream yields, on a thread.
fn read_all(mut stream: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stream.read_to_end(&mut bytes);
        bytes
    })
}

/// Run `peftpipe ARGS` with the read end of its stdout (or stderr) closed before it writes:
/// `sh` waits 0.3 s before exec'ing peftpipe, the pipe is dropped at once.
fn with_closed_pipe(dir: &Path, args: &[&str], close_stderr: bool) -> Output {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg("sleep 0.3; exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_peftpipe"))
        .args(args)
        .current_dir(dir)
        .env_remove("PEFTPIPE_CACHE_DIR")
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1");
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn peftpipe");
    // The other stream is read on a thread; a child that hangs is killed after 60 s.
    let reader = if close_stderr {
        drop(child.stderr.take());
        child.stdout.take().map(read_all)
    } else {
        drop(child.stdout.take());
        child.stderr.take().map(read_all)
    };
    let status = wait_at_most(&mut child, Duration::from_secs(60), &format!("{args:?}"));
    let other = reader
        .map(|reader| reader.join().unwrap_or_default())
        .unwrap_or_default();
    Output {
        status,
        stdout: if close_stderr {
            other.clone()
        } else {
            Vec::new()
        },
        stderr: if close_stderr { Vec::new() } else { other },
    }
}

#[test]
fn a_closed_stdout_is_not_a_crash() {
    let (_dir, root) = training_project();
    let model = repo().join("datasets/quickstart/model");
    let model = model.to_string_lossy();
    for args in [
        vec!["inspect", &*model],
        vec!["inspect", &*model, "--json", "--target", "all-linear"],
        vec!["validate", "pipeline.yaml", "--json"],
        vec!["status", "pipeline.yaml"],
        vec!["dag", "pipeline.yaml"],
        vec!["schema"],
        vec![
            "generate",
            &*model,
            "--prompt",
            "great album",
            "--max-new-tokens",
            "3",
            "--device",
            "cpu",
        ],
        vec!["--help"],
    ] {
        let output = with_closed_pipe(&root, &args, false);
        let stderr = text(&output.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(output.status.code(), Some(0), "{args:?}: {stderr}");
    }
}

#[test]
fn a_closed_stderr_does_not_stop_a_run() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let root = dir.path().canonicalize().expect("canonical path");
    let pipeline = format!(
        "name: pipe\nseed: 1\nstages:\n  data:\n    ingest:\n      path: {}\n      columns: [text, label]\n      drop_nulls: true\n  \
         prompts:\n    template:\n      input: data\n      prompt: \"review: {{{{ text }}}}\"\n      \
         completion: \" {{{{ label }}}}\"\n",
        repo().join("datasets/quickstart/reviews.parquet").display()
    );
    std::fs::write(root.join("pipeline.yaml"), pipeline).expect("write pipeline");
    let output = with_closed_pipe(&root, &["run", "pipeline.yaml"], true);
    assert_eq!(output.status.code(), Some(0));
    let status = peftpipe(&root, &["status", "pipeline.yaml"])
        .output()
        .expect("status");
    assert_eq!(
        text(&status.stdout),
        "[FRESH] data\n[FRESH] prompts\n",
        "{}",
        text(&status.stderr)
    );
}
