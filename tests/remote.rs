//! The remote cache end to end: `push` from one checkout, `pull` into a fresh one with the same
//! pipeline, and `run` restores every stage without running one (the CI recipe in
//! docs/ci/github-actions.yml); a corrupted remote object is refused; concurrent pushes are safe;
//! the remote comes from the flag, the environment or `.peftpipe/config.yaml`. Against a local
//! directory always, and with `--features cloud` against real servers on loopback where they are
//! installed (skipped with the reason otherwise): an S3-compatible server (moto's), a WebDAV
//! server (WsgiDAV), Azure's emulator (Azurite) and a GCS emulator (fake-gcs-server); each is
//! started by tests/python/remote_server.py, within a bounded wait.
#![cfg_attr(
    feature = "cloud",
    expect(clippy::print_stderr, reason = "tests print skip reasons")
)]

mod exec_support;

use std::process::{Child, Output, Stdio};

use exec_support::{stderr, stdout, tree, Project};

/// `peftpipe ARGS` in `project` with the remote variables cleared and `env` set.
fn peftpipe(project: &Project, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = project.command(args);
    command.env_remove("PEFTPIPE_REMOTE");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("run peftpipe")
}

/// Every stage of a `run --json` summary: (name, status, cache).
fn stage_statuses(output: &Output) -> Vec<(String, String, String)> {
    let summary: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("run --json prints JSON");
    summary["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|stage| {
            (
                stage["name"].as_str().unwrap_or_default().to_string(),
                stage["status"].as_str().unwrap_or_default().to_string(),
                stage["cache"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Push from a project that ran, pull into a fresh checkout of the same files, and check the
/// checkout restores everything and runs nothing. `remote` is the `--remote` value; `env` the
/// environment both sides see.
fn round_trip(remote: &str, env: &[(&str, &str)]) {
    let origin = Project::new();
    let ran = peftpipe(&origin, &["run", "pipeline.yaml"], env);
    assert!(ran.status.success(), "{}", stderr(&ran));
    let pushed = peftpipe(
        &origin,
        &["--json", "push", "pipeline.yaml", "--remote", remote],
        env,
    );
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    let report: serde_json::Value = serde_json::from_slice(&pushed.stdout).expect("JSON");
    assert_eq!(report["objects_copied"], 2, "{report}");
    assert_eq!(report["lock_files_written"], 1, "{report}");

    let checkout = Project::new();
    let before = peftpipe(&checkout, &["status", "--check", "pipeline.yaml"], env);
    assert_eq!(before.status.code(), Some(3), "nothing cached yet");
    let pulled = peftpipe(
        &checkout,
        &["pull", "pipeline.yaml", "--remote", remote],
        env,
    );
    assert!(pulled.status.success(), "{}", stderr(&pulled));
    assert!(
        stderr(&pulled).contains("pulled 2 objects"),
        "{}",
        stderr(&pulled)
    );
    // Cached, not yet published in this checkout: `status` says so, and says nothing must run.
    let status = peftpipe(&checkout, &["status", "pipeline.yaml"], env);
    assert_eq!(
        stdout(&status),
        "[DIRTY] data: published output .peftpipe/out/reviews/data is missing\n\
         [DIRTY] prompts: published output .peftpipe/out/reviews/prompts is missing\n"
    );
    let restored = peftpipe(&checkout, &["--json", "run", "pipeline.yaml"], env);
    assert!(restored.status.success(), "{}", stderr(&restored));
    for (name, status, cache) in stage_statuses(&restored) {
        assert_eq!(
            (status.as_str(), cache.as_str()),
            ("fresh", "hit"),
            "stage {name} was restored from the pulled cache, not run"
        );
    }
    let after = peftpipe(&checkout, &["status", "--check", "pipeline.yaml"], env);
    assert_eq!(after.status.code(), Some(0), "{}", stdout(&after));
    for stage in ["data", "prompts"] {
        assert_eq!(
            tree(&checkout.path(&format!(".peftpipe/out/reviews/{stage}"))),
            tree(&origin.path(&format!(".peftpipe/out/reviews/{stage}"))),
            "{stage}: the checkout's output is the origin's"
        );
    }
    // A second push finds everything there.
    let again = peftpipe(
        &origin,
        &["--json", "push", "pipeline.yaml", "--remote", remote],
        env,
    );
    let report: serde_json::Value = serde_json::from_slice(&again.stdout).expect("JSON");
    assert_eq!(
        (&report["objects_copied"], &report["objects_present"]),
        (&serde_json::json!(0), &serde_json::json!(2)),
        "{report}"
    );
}

#[test]
fn a_fresh_checkout_with_a_pulled_cache_runs_no_stage() {
    let remote = tempfile::tempdir().expect("remote directory");
    round_trip(&remote.path().display().to_string(), &[]);
    assert!(remote.path().join("locks/reviews.lock.json").is_file());
}

#[test]
fn a_corrupted_remote_object_is_refused_by_name_and_never_cached() {
    let origin = Project::new();
    assert!(peftpipe(&origin, &["run", "pipeline.yaml"], &[])
        .status
        .success());
    let remote = origin.path("remote");
    let pushed = peftpipe(
        &origin,
        &["push", "pipeline.yaml", "--remote", "remote"],
        &[],
    );
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    // Flip one byte of a file of the `prompts` output on the remote.
    let digest = origin.recorded_output("prompts").expect("recorded");
    let data = remote.join(format!("objects/{}/{digest}/data", &digest[..2]));
    let (name, mut bytes) = tree(&data).into_iter().next().expect("a file");
    let file = data.join(&name);
    bytes[0] ^= 1;
    std::fs::remove_file(&file).expect("remove");
    std::fs::write(&file, &bytes).expect("write");

    let checkout = Project::new();
    let remote_arg = remote.display().to_string();
    let pulled = peftpipe(
        &checkout,
        &["pull", "pipeline.yaml", "--remote", &remote_arg],
        &[],
    );
    assert_eq!(pulled.status.code(), Some(1), "{}", stderr(&pulled));
    assert_eq!(
        checkout.redact(&stderr(&pulled)).trim_end(),
        format!(
            "error: remote `{remote_arg}`: `objects/{}/[HASH]/data/{name}` is corrupted: its \
             content does not match its blake3 in the manifest; it was not placed in the local \
             cache (repair it with `peftpipe push --verify` from a cache that holds it intact)",
            &digest[..2]
        )
    );
    assert!(!checkout.object_data(&digest).exists());
    assert_eq!(
        checkout.lock_file(),
        serde_json::Value::Null,
        "no lock file names what was not pulled"
    );
    // A plain push trusts the remote's copy; `push --verify` repairs it, and the pull works.
    let again = peftpipe(
        &origin,
        &["push", "pipeline.yaml", "--remote", "remote"],
        &[],
    );
    assert!(!stderr(&again).contains("repaired"), "{}", stderr(&again));
    let repaired = peftpipe(
        &origin,
        &["push", "pipeline.yaml", "--remote", "remote", "--verify"],
        &[],
    );
    assert!(
        stderr(&repaired).contains(&format!("repaired on the remote: object {}", &digest[..12])),
        "{}",
        stderr(&repaired)
    );
    let second = Project::new();
    let pulled = peftpipe(
        &second,
        &["pull", "pipeline.yaml", "--remote", &remote_arg],
        &[],
    );
    assert!(pulled.status.success(), "{}", stderr(&pulled));
    assert!(second.object_data(&digest).exists());

    // Nothing refers to the refused object: the run computes what was not pulled.
    let run = peftpipe(&checkout, &["--json", "run", "pipeline.yaml"], &[]);
    assert!(run.status.success(), "{}", stderr(&run));
    let statuses = stage_statuses(&run);
    assert!(
        statuses
            .iter()
            .any(|(name, status, _)| name == "prompts" && status == "ran"),
        "{statuses:?}"
    );
}

#[test]
fn concurrent_pushes_of_one_cache_are_safe() {
    let origin = Project::new();
    assert!(peftpipe(&origin, &["run", "pipeline.yaml"], &[])
        .status
        .success());
    let pushes: Vec<Child> = (0..4)
        .map(|_| {
            let mut command = origin.command(&["push", "pipeline.yaml", "--remote", "remote"]);
            command.env_remove("PEFTPIPE_REMOTE");
            command
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    for push in pushes {
        let output = push.wait_with_output().expect("wait");
        assert!(output.status.success(), "{}", stderr(&output));
    }
    let checkout = Project::new();
    let remote = origin.path("remote").display().to_string();
    let pulled = peftpipe(
        &checkout,
        &["pull", "pipeline.yaml", "--remote", &remote],
        &[],
    );
    assert!(pulled.status.success(), "{}", stderr(&pulled));
    let restored = peftpipe(&checkout, &["--json", "run", "pipeline.yaml"], &[]);
    assert!(stage_statuses(&restored)
        .iter()
        .all(|(_, status, _)| status == "fresh"));
}

#[test]
fn the_remote_comes_from_the_flag_the_environment_or_the_project_config() {
    let origin = Project::new();
    assert!(peftpipe(&origin, &["run", "pipeline.yaml"], &[])
        .status
        .success());
    let none = peftpipe(&origin, &["push", "pipeline.yaml"], &[]);
    assert_eq!(none.status.code(), Some(2));
    assert_eq!(
        origin.redact(&stderr(&none)).trim_end(),
        "error: no remote: pass `--remote URL`, set PEFTPIPE_REMOTE, or add `cache: {remote: \
         URL}` to `[PROJECT]/.peftpipe/config.yaml`"
    );
    // The config file's directory is relative to the project.
    origin.write(".peftpipe/config.yaml", "cache:\n  remote: shared-cache\n");
    let pushed = peftpipe(&origin, &["push", "pipeline.yaml"], &[]);
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    assert!(origin
        .path("shared-cache/locks/reviews.lock.json")
        .is_file());
    // The variable wins over the file, the flag over both.
    let from_env = origin.path("from-env").display().to_string();
    let pushed = peftpipe(
        &origin,
        &["push", "pipeline.yaml"],
        &[("PEFTPIPE_REMOTE", &from_env)],
    );
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    assert!(origin.path("from-env/locks/reviews.lock.json").is_file());
    // Without a pipeline: the whole cache, and a fresh cache pulls all of it.
    let everything = peftpipe(&origin, &["push", "--remote", "all"], &[]);
    assert!(everything.status.success(), "{}", stderr(&everything));
    let checkout = Project::new();
    let all = origin.path("all").display().to_string();
    let pulled = peftpipe(&checkout, &["pull", "--remote", &all], &[]);
    assert!(pulled.status.success(), "{}", stderr(&pulled));
    assert_eq!(checkout.lock_file(), origin.lock_file());
    // A bad config file is an error naming it.
    origin.write(".peftpipe/config.yaml", "cache:\n  remtoe: x\n");
    let bad = peftpipe(&origin, &["push", "pipeline.yaml"], &[]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        origin
            .redact(&stderr(&bad))
            .starts_with("error: [PROJECT]/.peftpipe/config.yaml: cache: unknown field `remtoe`"),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn a_file_url_and_its_plain_path_are_one_remote() {
    // Pushed through `file:///abs/dir`, the cache lands in that directory (not in a copy of its
    // path inside it), so a pull from the plain path finds it.
    let remote = tempfile::tempdir().expect("remote directory");
    let url = format!("file://{}", remote.path().display());
    let origin = Project::new();
    let ran = peftpipe(&origin, &["run", "pipeline.yaml"], &[]);
    assert!(ran.status.success(), "{}", stderr(&ran));
    let pushed = peftpipe(&origin, &["push", "pipeline.yaml", "--remote", &url], &[]);
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    assert!(remote.path().join("locks/reviews.lock.json").is_file());
    let checkout = Project::new();
    let shown = remote.path().display().to_string();
    let pulled = peftpipe(
        &checkout,
        &["pull", "pipeline.yaml", "--remote", &shown],
        &[],
    );
    assert!(pulled.status.success(), "{}", stderr(&pulled));
    assert!(
        stderr(&pulled).contains("pulled 2 objects"),
        "{}",
        stderr(&pulled)
    );
}

#[test]
fn pulling_a_pipeline_never_pushed_names_the_remote_and_key() {
    let checkout = Project::new();
    let remote = tempfile::tempdir().expect("remote directory");
    let shown = remote.path().display().to_string();
    let pulled = peftpipe(
        &checkout,
        &["pull", "pipeline.yaml", "--remote", &shown],
        &[],
    );
    assert_eq!(pulled.status.code(), Some(1));
    assert_eq!(
        stderr(&pulled).trim_end(),
        format!(
            "error: remote `{shown}` has no `locks/reviews.lock.json`: the pipeline `reviews` \
             was never pushed there (run `peftpipe push` where it has run)"
        )
    );
    // The first CI job of a new pipeline: a warning, and the run computes everything.
    let tolerated = peftpipe(
        &checkout,
        &["pull", "pipeline.yaml", "--remote", &shown, "--missing-ok"],
        &[],
    );
    assert_eq!(tolerated.status.code(), Some(0), "{}", stderr(&tolerated));
    assert!(
        stderr(&tolerated).starts_with("warning: nothing pulled: remote "),
        "{}",
        stderr(&tolerated)
    );
}

/// Regression: push and pull shared one set of flags, so `push --missing-ok` and `pull --verify`
/// were accepted and silently did nothing (each flag's help starts "pull:" / "push:"). Each is now
/// refused by the other command as an unknown argument (exit 2), and `--help` lists only its own.
#[test]
fn push_and_pull_refuse_the_other_commands_flag() {
    let project = Project::new();
    assert!(peftpipe(&project, &["run", "pipeline.yaml"], &[])
        .status
        .success());
    let remote = tempfile::tempdir().expect("remote directory");
    let shown = remote.path().display().to_string();
    for (command, flag) in [("push", "--missing-ok"), ("pull", "--verify")] {
        let refused = peftpipe(
            &project,
            &[command, "pipeline.yaml", "--remote", &shown, flag],
            &[],
        );
        assert_eq!(
            refused.status.code(),
            Some(2),
            "{command} {flag}: {}",
            stderr(&refused)
        );
        assert!(stderr(&refused).contains(flag), "{}", stderr(&refused));
        let help = peftpipe(&project, &[command, "--help"], &[]);
        assert!(help.status.success());
        assert!(
            !stdout(&help).contains(flag),
            "{command} --help: {}",
            stdout(&help)
        );
    }
    for (command, flag) in [("push", "--verify"), ("pull", "--missing-ok")] {
        let accepted = peftpipe(
            &project,
            &[command, "pipeline.yaml", "--remote", &shown, flag],
            &[],
        );
        assert_eq!(
            accepted.status.code(),
            Some(0),
            "{command} {flag}: {}",
            stderr(&accepted)
        );
    }
}

/// Regression: `pull --missing-ok --json` from a remote that never saw the pipeline exited 0 with
/// nothing on stdout. It prints `pull --json`'s object (nothing copied), `missing: true` and the
/// warning in `notes`.
#[test]
fn pull_missing_ok_json_says_nothing_was_pulled() {
    let checkout = Project::new();
    let remote = tempfile::tempdir().expect("remote directory");
    let shown = remote.path().display().to_string();
    let tolerated = peftpipe(
        &checkout,
        &[
            "--json",
            "pull",
            "pipeline.yaml",
            "--remote",
            &shown,
            "--missing-ok",
        ],
        &[],
    );
    assert_eq!(tolerated.status.code(), Some(0), "{}", stderr(&tolerated));
    assert!(
        stderr(&tolerated).starts_with("warning: nothing pulled: remote "),
        "{}",
        stderr(&tolerated)
    );
    let json: serde_json::Value = serde_json::from_slice(&tolerated.stdout)
        .unwrap_or_else(|error| panic!("stdout is not JSON ({error}): {:?}", stdout(&tolerated)));
    assert_eq!(json["missing"], true, "{json}");
    assert_eq!(json["remote"], shown.as_str(), "{json}");
    for count in [
        "objects_copied",
        "files_copied",
        "bytes_copied",
        "objects_present",
        "run_records_copied",
        "lock_files_written",
    ] {
        assert_eq!(json[count], 0, "{count}: {json}");
    }
    let notes = json["notes"].as_array().cloned().unwrap_or_default();
    assert!(
        notes.len() == 1
            && notes[0]
                .as_str()
                .is_some_and(|note| note.contains("locks/reviews.lock.json")
                    && stderr(&tolerated).contains(note)),
        "{json}"
    );
}

/// The cloud remotes (`--features cloud`): a real S3-compatible server, WebDAV server, Azure
/// emulator and GCS emulator on loopback.
#[cfg(feature = "cloud")]
mod cloud {
    use super::*;
    use std::io::BufRead;
    use std::path::Path;
    use std::process::Command;

    /// A storage server of `tests/python/remote_server.py` on loopback; stopped when dropped.
    struct Server {
        child: Child,
        port: u16,
    }

    impl Server {
        /// Start one, or None with the reason printed (no python3, or its package missing).
        fn start(kind: &str, argument: &str) -> Option<Server> {
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/remote_server.py");
            let child = Command::new("python3")
                .arg(&script)
                .args([kind, argument])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn();
            let mut child = match child {
                Ok(child) => child,
                Err(error) => {
                    eprintln!("skipped: cannot start python3 for the {kind} server: {error}");
                    return None;
                }
            };
            // The port line, read on a thread so a server that never answers fails the test
            // after a bounded wait instead of hanging it.
            let stdout = child.stdout.take().expect("stdout");
            let (sender, receiver) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut line = String::new();
                let read = std::io::BufReader::new(stdout).read_line(&mut line);
                let _ = sender.send(read.map(|_| line));
            });
            let line = receiver.recv_timeout(STARTUP);
            if let Ok(Ok(line)) = &line {
                if let Ok(port) = line.trim().parse::<u16>() {
                    return Some(Server { child, port });
                }
            }
            if line.is_err() {
                let _ = child.kill();
            }
            let output = child.wait_with_output().expect("wait");
            let reason = String::from_utf8_lossy(&output.stderr).trim().to_string();
            // Exit 3: not installed, a skip; anything else is a server that should have started.
            assert_eq!(
                output.status.code(),
                Some(3),
                "the {kind} server did not start within {STARTUP:?}: {reason}"
            );
            eprintln!("skipped: {reason}");
            None
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            // Closing its stdin stops it; kill it if it does not stop.
            drop(self.child.stdin.take());
            for _ in 0..50 {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Longest wait for a server (and the emulator it starts) to serve.
    const STARTUP: std::time::Duration = std::time::Duration::from_secs(90);

    /// Requests to loopback never go through a proxy of the environment.
    const NO_PROXY: [(&str, &str); 2] = [
        ("NO_PROXY", "127.0.0.1,localhost"),
        ("no_proxy", "127.0.0.1,localhost"),
    ];

    #[test]
    fn round_trip_through_an_s3_compatible_server() {
        let Some(server) = Server::start("s3", "peftpipe-test") else {
            return;
        };
        let endpoint = format!("http://127.0.0.1:{}", server.port);
        let env = [
            ("AWS_ENDPOINT", endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", "test-key"),
            ("AWS_SECRET_ACCESS_KEY", "test-secret-never-shown"),
            ("AWS_REGION", "us-east-1"),
            NO_PROXY[0],
            NO_PROXY[1],
        ];
        round_trip("s3://peftpipe-test/team/cache", &env);

        // A bucket that does not exist: an error naming the remote and the key, without secrets.
        let project = Project::new();
        assert!(peftpipe(&project, &["run", "pipeline.yaml"], &env)
            .status
            .success());
        let failed = peftpipe(
            &project,
            &["push", "pipeline.yaml", "--remote", "s3://no-such-bucket/x"],
            &env,
        );
        assert_eq!(failed.status.code(), Some(1));
        let message = stderr(&failed);
        assert!(
            message.starts_with("error: remote `s3://no-such-bucket/x`: cannot "),
            "{message}"
        );
        assert!(!message.contains("test-secret-never-shown"), "{message}");
    }

    /// Azure Blob Storage through Azurite's blob service (the emulator Microsoft ships), as a
    /// user points peftpipe at it: `az://CONTAINER/PREFIX` with `AZURE_STORAGE_USE_EMULATOR` and
    /// `AZURITE_BLOB_STORAGE_URL`; `azure://` names the same store; a missing container is an
    /// error naming the remote, without the account key.
    #[test]
    fn round_trip_through_azurite() {
        let Some(server) = Server::start("azure", "peftpipe-test") else {
            return;
        };
        let endpoint = format!("http://127.0.0.1:{}", server.port);
        let env = [
            ("AZURE_STORAGE_USE_EMULATOR", "true"),
            ("AZURITE_BLOB_STORAGE_URL", endpoint.as_str()),
            // Azurite's well-known development key, given as a user gives theirs.
            ("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY),
            NO_PROXY[0],
            NO_PROXY[1],
        ];
        round_trip("az://peftpipe-test/team/cache", &env);

        // `azure://` is the same container: what it pushes, an `az://` pull restores.
        let origin = Project::new();
        assert!(peftpipe(&origin, &["run", "pipeline.yaml"], &env)
            .status
            .success());
        let pushed = peftpipe(
            &origin,
            &[
                "push",
                "pipeline.yaml",
                "--remote",
                "azure://peftpipe-test/other",
            ],
            &env,
        );
        assert!(pushed.status.success(), "{}", stderr(&pushed));
        let checkout = Project::new();
        let pulled = peftpipe(
            &checkout,
            &[
                "pull",
                "pipeline.yaml",
                "--remote",
                "az://peftpipe-test/other",
            ],
            &env,
        );
        assert!(pulled.status.success(), "{}", stderr(&pulled));
        assert!(
            stderr(&pulled).contains("pulled 2 objects"),
            "{}",
            stderr(&pulled)
        );

        let failed = peftpipe(
            &origin,
            &[
                "push",
                "pipeline.yaml",
                "--remote",
                "az://no-such-container/x",
            ],
            &env,
        );
        assert_eq!(failed.status.code(), Some(1), "{}", stderr(&failed));
        let message = stderr(&failed);
        assert!(
            message.starts_with("error: remote `az://no-such-container/x`: cannot "),
            "{message}"
        );
        assert!(!message.contains(AZURITE_KEY), "{message}");
    }

    /// An `az://` remote with no account is a setup error (exit 2) that says what to set.
    #[test]
    fn an_azure_remote_without_an_account_says_what_to_set() {
        let project = Project::new();
        let mut command = project.command(&["push", "pipeline.yaml", "--remote", "az://c/x"]);
        for key in [
            "PEFTPIPE_REMOTE",
            "AZURE_STORAGE_ACCOUNT_NAME",
            "AZURE_STORAGE_USE_EMULATOR",
        ] {
            command.env_remove(key);
        }
        assert!(peftpipe(&project, &["run", "pipeline.yaml"], &[])
            .status
            .success());
        let failed = command.output().expect("run peftpipe");
        assert_eq!(failed.status.code(), Some(2), "{}", stderr(&failed));
        let message = stderr(&failed);
        assert!(
            message.starts_with("error: remote `az://c/x`: "),
            "{message}"
        );
        assert!(
            message.contains("set AZURE_STORAGE_ACCOUNT_NAME")
                && message.contains("AZURE_STORAGE_USE_EMULATOR=true"),
            "{message}"
        );
    }

    /// Azurite's development account key (public: the same in every Azurite).
    const AZURITE_KEY: &str =
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

    /// Google Cloud Storage through fake-gcs-server, configured as object_store's own CI talks
    /// to it: `gs://BUCKET/PREFIX` with `GOOGLE_SERVICE_ACCOUNT` naming a key file whose
    /// `gcs_base_url` is the emulator and `disable_oauth` is true, and `GOOGLE_ALLOW_HTTP` for its
    /// plain-HTTP endpoint. (fake-gcs-server lacks the XML API's object PUT, which
    /// tests/python/remote_server.py's proxy supplies; every other request reaches it unchanged.)
    #[test]
    fn round_trip_through_fake_gcs_server() {
        let Some(server) = Server::start("gcs", "peftpipe-test") else {
            return;
        };
        let credentials = tempfile::tempdir().expect("credentials directory");
        let key_file = credentials.path().join("service-account.json");
        let key = serde_json::json!({
            "gcs_base_url": format!("http://127.0.0.1:{}", server.port),
            "disable_oauth": true,
            "client_email": "",
            "private_key": "",
            "private_key_id": "",
        });
        std::fs::write(&key_file, key.to_string()).expect("write the key file");
        let key_path = key_file.display().to_string();
        let env = [
            ("GOOGLE_SERVICE_ACCOUNT", key_path.as_str()),
            ("GOOGLE_ALLOW_HTTP", "true"),
            NO_PROXY[0],
            NO_PROXY[1],
        ];
        round_trip("gs://peftpipe-test/team/cache", &env);

        let project = Project::new();
        assert!(peftpipe(&project, &["run", "pipeline.yaml"], &env)
            .status
            .success());
        let failed = peftpipe(
            &project,
            &["push", "pipeline.yaml", "--remote", "gs://no-such-bucket/x"],
            &env,
        );
        assert_eq!(failed.status.code(), Some(1), "{}", stderr(&failed));
        let message = stderr(&failed);
        assert!(
            message.starts_with("error: remote `gs://no-such-bucket/x`: cannot "),
            "{message}"
        );
    }

    /// `http://` remotes through object_store's HTTP store against a WebDAV server: pushes create
    /// the collections they need (MKCOL) and PUT the objects, which land as plain files in the
    /// server's directory; a pull lists them (PROPFIND) and restores everything.
    #[test]
    fn round_trip_through_a_webdav_server() {
        let root = tempfile::tempdir().expect("server directory");
        let Some(server) = Server::start("webdav", &root.path().display().to_string()) else {
            return;
        };
        let remote = format!("http://127.0.0.1:{}/team/cache", server.port);
        round_trip(&remote, &NO_PROXY);
        let served = root.path().join("team/cache");
        assert!(
            served.join("locks/reviews.lock.json").is_file(),
            "the lock file is a file of the WebDAV share: {:?}",
            tree(&served).keys().collect::<Vec<_>>()
        );

        // A server that refuses writes (a path under a file): the error names the remote.
        let project = Project::new();
        assert!(peftpipe(&project, &["run", "pipeline.yaml"], &NO_PROXY)
            .status
            .success());
        std::fs::write(root.path().join("a-file"), b"not a collection").expect("write");
        let blocked = format!("http://127.0.0.1:{}/a-file/cache", server.port);
        let failed = peftpipe(
            &project,
            &["push", "pipeline.yaml", "--remote", &blocked],
            &NO_PROXY,
        );
        assert_eq!(failed.status.code(), Some(1), "{}", stderr(&failed));
        let message = stderr(&failed);
        assert!(
            message.starts_with(&format!("error: remote `{blocked}`: cannot ")),
            "{message}"
        );
    }
}

/// Without the `cloud` feature a cloud URL is refused at once, saying which build reads it.
#[test]
#[cfg(not(feature = "cloud"))]
fn a_cloud_remote_without_the_cloud_feature_says_how_to_get_it() {
    let project = Project::new();
    assert!(peftpipe(&project, &["run", "pipeline.yaml"], &[])
        .status
        .success());
    let failed = peftpipe(
        &project,
        &["push", "pipeline.yaml", "--remote", "s3://bucket/cache"],
        &[],
    );
    // A remote this build cannot open is a setup error (exit 2), like a malformed URL.
    assert_eq!(failed.status.code(), Some(2));
    let message = stderr(&failed);
    assert!(
        message.contains("`s3://` remotes need a build with the `cloud` feature"),
        "{message}"
    );
}
