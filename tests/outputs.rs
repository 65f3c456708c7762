//! `status` never says FRESH over a damaged cache object or a damaged published output, and
//! `run` repairs both (issue 7, item 5): truncated, deleted, extra object files and a garbage
//! manifest make the stage dirty with the reason and are rebuilt; deleted, edited or overwritten
//! copies under `.peftpipe/out/` and export folders make it dirty and are published again (not
//! rerun). Editing a published file never reaches the cache. Exported adapters are the same bytes
//! for the same adapter (item 6) and name this checkout's base model (item 7).

mod exec_support;

use std::path::{Path, PathBuf};

use exec_support::{stderr, stdout, tree, Project};

fn make_writable(path: &Path) {
    let mut permissions = std::fs::metadata(path).expect("metadata").permissions();
    #[expect(
        clippy::permissions_set_readonly_false,
        reason = "the tests damage files as a user or a broken disk would"
    )]
    permissions.set_readonly(false);
    std::fs::set_permissions(path, permissions).expect("make writable");
}

/// The largest file of a directory tree (relative path).
fn largest_file(dir: &Path) -> String {
    tree(dir)
        .into_iter()
        .max_by_key(|(_, bytes)| bytes.len())
        .map(|(name, _)| name)
        .expect("a file")
}

/// `status` for the reviews pipeline: its stdout.
fn status(project: &Project, extra: &[&str]) -> String {
    let mut args = vec!["status", "pipeline.yaml"];
    args.extend_from_slice(extra);
    stdout(&project.run(&args))
}

/// Run, then check the project's outputs equal those of a clean run of the same pipeline.
fn run_and_compare_with_clean(project: &Project) -> String {
    let output = project.run(&["run", "pipeline.yaml"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let clean = Project::new();
    assert!(clean.run(&["run", "pipeline.yaml"]).status.success());
    for stage in ["data", "prompts"] {
        let relative = format!(".peftpipe/out/reviews/{stage}");
        assert_eq!(
            tree(&project.path(&relative)),
            tree(&clean.path(&relative)),
            "{stage} differs from a clean run"
        );
        let digest = project.recorded_output(stage).expect("recorded");
        assert_eq!(
            tree(&project.object_data(&digest)),
            tree(&clean.path(&relative))
        );
    }
    assert_eq!(status(project, &[]), "[FRESH] data\n[FRESH] prompts\n");
    stderr(&output)
}

/// A project that has run once, with the `data` object's directory.
fn ran() -> (Project, PathBuf) {
    let project = Project::new();
    let output = project.run(&["run", "pipeline.yaml"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let digest = project.recorded_output("data").expect("recorded");
    let object = project.object_data(&digest);
    (project, object)
}

/// Every file and folder a run leaves (cache objects, manifests, lock files, run records,
/// published copies) is as readable as a plain create makes it: group and others may read
/// where the umask lets them, as with any file the user writes (a cache shared by a group).
/// Before, every file written through a temporary file was owner-only (0600, 0400 read-only).
#[cfg(unix)]
#[test]
#[expect(clippy::print_stderr, reason = "a skipped test says why")]
fn what_a_run_writes_is_readable_as_the_umask_allows() {
    use std::os::unix::fs::PermissionsExt;
    let Some(umask) = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|line| line.starts_with("Umask:"))?;
            u32::from_str_radix(line.trim_start_matches("Umask:").trim(), 8).ok()
        })
    else {
        eprintln!("skipped: the umask is not readable here");
        return;
    };
    let (project, _) = ran();
    let mut pending = vec![project.path(".peftpipe")];
    let mut private = Vec::new();
    let mut seen = 0;
    while let Some(path) = pending.pop() {
        let metadata = std::fs::symlink_metadata(&path).expect("metadata");
        let wanted = if metadata.is_dir() {
            pending.extend(
                std::fs::read_dir(&path)
                    .expect("list")
                    .map(|entry| entry.expect("entry").path()),
            );
            0o055 & !umask
        } else {
            0o044 & !umask
        };
        seen += 1;
        if metadata.permissions().mode() & wanted != wanted {
            private.push(format!(
                "{} {:o}",
                path.strip_prefix(&project.root).unwrap_or(&path).display(),
                metadata.permissions().mode() & 0o777
            ));
        }
    }
    assert!(seen > 10, "{seen} entries");
    assert!(private.is_empty(), "umask {umask:o}: {private:#?}");
}

#[test]
fn truncated_object_file_is_dirty_and_rebuilt() {
    let (project, object) = ran();
    let name = largest_file(&object);
    let file = object.join(&name);
    make_writable(&file);
    let length = std::fs::metadata(&file).expect("metadata").len();
    std::fs::File::options()
        .write(true)
        .open(&file)
        .expect("open")
        .set_len(length / 2)
        .expect("truncate");
    let text = status(&project, &[]);
    assert!(
        text.starts_with(&format!(
            "[DIRTY] data: cached output corrupted ({name} has {} bytes, expected {length}",
            length / 2
        )),
        "{text}"
    );
    assert_eq!(
        project
            .run(&["status", "--check", "pipeline.yaml"])
            .status
            .code(),
        Some(3)
    );
    let log = run_and_compare_with_clean(&project);
    assert!(log.contains("Running data"), "{log}");
}

#[test]
fn deleted_object_file_is_dirty_and_rebuilt() {
    let (project, object) = ran();
    let name = largest_file(&object);
    std::fs::remove_file(object.join(&name)).expect("delete");
    let text = status(&project, &[]);
    assert!(
        text.starts_with(&format!(
            "[DIRTY] data: cached output corrupted ({name} is missing"
        )),
        "{text}"
    );
    run_and_compare_with_clean(&project);
}

#[test]
fn garbage_manifest_is_dirty_and_rebuilt() {
    let (project, object) = ran();
    let manifest = object.parent().expect("object dir").join("manifest.json");
    make_writable(&manifest);
    std::fs::write(&manifest, "\u{0}garbage{").expect("write");
    let text = status(&project, &[]);
    assert!(
        text.starts_with("[DIRTY] data: cached output corrupted (manifest.json of object "),
        "{text}"
    );
    assert!(text.contains("is not valid JSON"), "{text}");
    run_and_compare_with_clean(&project);
}

#[test]
fn extra_object_file_is_dirty_and_rebuilt() {
    let (project, object) = ran();
    std::fs::write(object.join("stray.txt"), "not from the stage").expect("write");
    let text = status(&project, &[]);
    assert!(
        text.starts_with("[DIRTY] data: cached output corrupted (stray.txt is unexpected"),
        "{text}"
    );
    run_and_compare_with_clean(&project);
}

#[test]
fn same_size_edit_inside_an_object_is_found_by_verify() {
    let (project, object) = ran();
    let name = largest_file(&object);
    let file = object.join(&name);
    make_writable(&file);
    let mut bytes = std::fs::read(&file).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&file, &bytes).expect("write");
    let text = status(&project, &["--verify"]);
    assert!(
        text.starts_with(&format!(
            "[DIRTY] data: cached output corrupted ({name} content differs)"
        )),
        "{text}"
    );
    run_and_compare_with_clean(&project);
}

#[test]
fn deleted_published_file_is_dirty_and_republished_without_rerunning() {
    let (project, object) = ran();
    let name = largest_file(&object);
    let published = project.path(".peftpipe/out/reviews/data").join(&name);
    std::fs::remove_file(&published).expect("delete");
    assert_eq!(
        status(&project, &[]),
        format!(
            "[DIRTY] data: published output .peftpipe/out/reviews/data changed ({name} is missing)\n\
             [FRESH] prompts\n"
        )
    );
    let log = run_and_compare_with_clean(&project);
    assert!(!log.contains("Running"), "restored, not rerun: {log}");
    assert!(log.contains("publishing it again"), "{log}");
}

#[test]
fn deleted_published_folder_is_dirty_and_republished() {
    let (project, _object) = ran();
    std::fs::remove_dir_all(project.path(".peftpipe/out")).expect("delete");
    assert_eq!(
        status(&project, &[]),
        "[DIRTY] data: published output .peftpipe/out/reviews/data is missing\n\
         [DIRTY] prompts: published output .peftpipe/out/reviews/prompts is missing\n"
    );
    run_and_compare_with_clean(&project);
}

#[test]
fn edited_published_file_is_dirty_republished_and_never_reaches_the_cache() {
    let (project, object) = ran();
    let name = largest_file(&object);
    let cached = std::fs::read(object.join(&name)).expect("read");
    let published = project.path(".peftpipe/out/reviews/data").join(&name);
    make_writable(&published);
    // Same size, written in place (same inode), as an editor saving over it would.
    let mut bytes = std::fs::read(&published).expect("read");
    bytes[0] ^= 0x20;
    std::fs::write(&published, &bytes).expect("write");
    assert_eq!(
        std::fs::read(object.join(&name)).expect("read"),
        cached,
        "the cached object is untouched"
    );
    assert_eq!(
        status(&project, &[]),
        format!(
            "[DIRTY] data: published output .peftpipe/out/reviews/data changed ({name} content differs)\n\
             [FRESH] prompts\n"
        )
    );
    let log = run_and_compare_with_clean(&project);
    assert!(!log.contains("Running"), "restored, not rerun: {log}");
}

#[test]
fn extra_file_in_a_published_folder_is_dirty() {
    let (project, _object) = ran();
    project.write(".peftpipe/out/reviews/prompts/notes.txt", "mine");
    assert_eq!(
        status(&project, &[]),
        "[FRESH] data\n\
         [DIRTY] prompts: published output .peftpipe/out/reviews/prompts changed (notes.txt is unexpected)\n"
    );
    run_and_compare_with_clean(&project);
}

/// Regression: `status` named only the first difference of a published folder. It names each
/// (the first five, then how many more), so one look says what was deleted, edited or added.
#[test]
fn status_names_every_difference_of_a_published_folder() {
    let (project, object) = ran();
    let out = project.path(".peftpipe/out/reviews/data");
    let names: Vec<String> = tree(&object).into_keys().collect();
    assert!(names.len() >= 2, "{names:?}");
    std::fs::remove_file(out.join(&names[0])).expect("delete");
    project.write(".peftpipe/out/reviews/data/notes.txt", "mine");
    assert_eq!(
        status(&project, &[]),
        format!(
            "[DIRTY] data: published output .peftpipe/out/reviews/data changed ({} is missing, \
             notes.txt is unexpected)\n[FRESH] prompts\n",
            names[0]
        )
    );
    for name in &names {
        let _ = std::fs::remove_file(out.join(name));
    }
    for index in 0..4 {
        project.write(&format!(".peftpipe/out/reviews/data/extra{index}.txt"), "x");
    }
    let mut expected: Vec<String> = names
        .iter()
        .map(|name| format!("{name} is missing"))
        .collect();
    expected.extend(
        [
            "extra0.txt",
            "extra1.txt",
            "extra2.txt",
            "extra3.txt",
            "notes.txt",
        ]
        .iter()
        .map(|name| format!("{name} is unexpected")),
    );
    let more = expected.len() - 5;
    assert_eq!(
        status(&project, &[]),
        format!(
            "[DIRTY] data: published output .peftpipe/out/reviews/data changed ({}, and {more} \
             more)\n[FRESH] prompts\n",
            expected[..5].join(", ")
        )
    );
    run_and_compare_with_clean(&project);
}

// ---------------------------------------------------------------------------------------------
// A pipeline that trains (a few steps of the quickstart's tiny model), evaluates and exports
// ---------------------------------------------------------------------------------------------

const TINY: &str = r#"name: tiny
seed: 3
stages:
  data:
    ingest:
      path: data/reviews.parquet
      columns: [text, label]
      filters:
        - in_set: {column: label, values: [positive, negative]}
      drop_nulls: true
      limit: 200
      split: {fractions: {train: 0.8, eval: 0.2}}
  prompts:
    template:
      input: data
      prompt: "review: {{ text }}\nsentiment:"
      completion: " {{ label }}"
      label: label
  train:
    train:
      data: prompts
      model: model
      method: {lora: {r: 4, alpha: 8, target_modules: all-linear}}
      learning_rate: 0.003
      batch_size: 8
      max_steps: 3
      max_seq_len: 48
      device: cpu
  evaluate:
    evaluate:
      model: train
      data: prompts
      metrics:
        accuracy:
          choices: [" positive", " negative"]
          labels: [positive, negative]
          label_column: label
      max_rows: 16
      samples: 0
      device: cpu
  export:
    export:
      from: train
      adapter: out/adapter
"#;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create");
    for entry in std::fs::read_dir(from).expect("list") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
            make_writable(&target);
        }
    }
}

/// A project with the quickstart's data and tiny model and `pipeline.yaml` = `yaml`.
fn tiny_project(yaml: &str) -> Project {
    let project = Project::with_pipeline(yaml);
    let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/quickstart");
    copy_dir(&quickstart.join("model"), &project.path("model"));
    std::fs::create_dir_all(project.path("data")).expect("create data/");
    std::fs::copy(
        quickstart.join("reviews.parquet"),
        project.path("data/reviews.parquet"),
    )
    .expect("copy the dataset");
    project
}

/// `peftpipe ARGS` in `root`, environment as `Project::command` sets it.
fn run_in(root: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_peftpipe"))
        .args(args)
        .current_dir(root)
        .env_remove("PEFTPIPE_CACHE_DIR")
        .env_remove("PEFTPIPE_VERSION_OVERRIDE")
        .env_remove("PEFTPIPE_TEST_STAGE_DELAY")
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .output()
        .expect("run peftpipe")
}

fn tiny_status(root: &Path) -> String {
    stdout(&run_in(root, &["status", "pipeline.yaml"]))
}

fn tiny_run(root: &Path, extra: &[&str]) -> String {
    let mut args = vec!["run", "pipeline.yaml"];
    args.extend_from_slice(extra);
    let output = run_in(root, &args);
    assert!(output.status.success(), "{}", stderr(&output));
    stderr(&output)
}

fn tiny_output(root: &Path, stage: &str) -> Option<String> {
    let path = root.join(".peftpipe/cache/locks/tiny.lock.json");
    let lock: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    lock["stages"][stage]["output"].as_str().map(String::from)
}

fn adapter_config(root: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(root.join("out/adapter/adapter_config.json"))
        .expect("published adapter_config.json");
    serde_json::from_str(&text).expect("JSON")
}

#[test]
fn export_folders_are_checked_republished_deterministic_and_name_this_checkout() {
    let project = tiny_project(TINY);
    tiny_run(&project.root, &[]);
    let all_fresh =
        "[FRESH] data\n[FRESH] prompts\n[FRESH] train\n[FRESH] evaluate\n[FRESH] export\n";
    assert_eq!(tiny_status(&project.root), all_fresh);
    let published = tree(&project.path("out/adapter"));
    let model = project.path("model");
    assert_eq!(
        adapter_config(&project.root)["base_model_name_or_path"],
        model.display().to_string()
    );

    // Deleted metrics.json in the evaluate object: dirty, rebuilt to the same metrics.
    let evaluate = project.object_data(&tiny_output(&project.root, "evaluate").expect("evaluate"));
    let metrics = std::fs::read(evaluate.join("metrics.json")).expect("metrics.json");
    std::fs::remove_file(evaluate.join("metrics.json")).expect("delete");
    let text = tiny_status(&project.root);
    assert!(
        text.contains("[DIRTY] evaluate: cached output corrupted (metrics.json is missing"),
        "{text}"
    );
    let log = tiny_run(&project.root, &[]);
    assert!(log.contains("Running evaluate"), "{log}");
    let evaluate = project.object_data(&tiny_output(&project.root, "evaluate").expect("evaluate"));
    assert_eq!(
        std::fs::read(evaluate.join("metrics.json")).expect("read"),
        metrics
    );
    assert_eq!(tiny_status(&project.root), all_fresh);

    // An edited published adapter file: dirty, republished (not rerun), byte for byte.
    let readme = project.path("out/adapter/README.md");
    make_writable(&readme);
    std::fs::write(&readme, "my notes\n").expect("edit");
    let text = tiny_status(&project.root);
    assert!(
        text.contains(
            "[DIRTY] export: published output out/adapter changed (README.md has 9 bytes, expected"
        ),
        "{text}"
    );
    let log = tiny_run(&project.root, &[]);
    assert!(!log.contains("Running export"), "{log}");
    assert_eq!(tree(&project.path("out/adapter")), published);
    assert_eq!(tiny_status(&project.root), all_fresh);

    // Deleted published adapter folder: dirty, republished.
    std::fs::remove_dir_all(project.path("out/adapter")).expect("delete");
    let text = tiny_status(&project.root);
    assert!(
        text.contains("[DIRTY] export: published output out/adapter is missing"),
        "{text}"
    );
    tiny_run(&project.root, &[]);
    assert_eq!(tree(&project.path("out/adapter")), published);

    // Item 6: two forced runs export the same bytes (no timings in the card or config).
    tiny_run(&project.root, &["--force"]);
    let first = tree(&project.path("out/adapter"));
    tiny_run(&project.root, &["--force"]);
    assert_eq!(
        tree(&project.path("out/adapter")),
        first,
        "a forced rerun exports the same adapter folder"
    );
    let card = String::from_utf8(first["README.md"].clone()).expect("UTF-8");
    assert!(!card.contains("wall"), "{card}");

    // Item 7: the project and its cache copied elsewhere: the published adapter names the
    // copy's model, not the first checkout's (which still exists).
    let copy = tempfile::tempdir().expect("temporary directory");
    let copy_root = copy.path().canonicalize().expect("canonical").join("moved");
    copy_dir(&project.root, &copy_root);
    let text = tiny_status(&copy_root);
    assert!(
        text.contains("[DIRTY] export: published output out/adapter was not published from this output in this checkout"),
        "{text}"
    );
    assert!(text.contains("[FRESH] train"), "{text}");
    let log = tiny_run(&copy_root, &[]);
    assert!(!log.contains("Running"), "everything restored: {log}");
    let config = adapter_config(&copy_root);
    assert_eq!(
        config["base_model_name_or_path"],
        copy_root.join("model").display().to_string()
    );
    let card = std::fs::read_to_string(copy_root.join("out/adapter/README.md")).expect("card");
    assert!(
        card.contains(&format!(
            "base_model: {}",
            copy_root.join("model").display()
        )),
        "{card}"
    );
    assert!(
        !card.contains(&project.root.display().to_string()),
        "{card}"
    );
    assert_eq!(tiny_status(&copy_root), all_fresh);
}

#[test]
fn export_folder_overwritten_by_another_pipeline_is_dirty_and_republished() {
    let project = tiny_project(TINY);
    // A second pipeline (another name, seed and rank) exporting to the same folder.
    let other = TINY
        .replace("name: tiny", "name: other")
        .replace("seed: 3", "seed: 4")
        .replace("r: 4, alpha: 8", "r: 2, alpha: 4");
    project.write("other.yaml", &other);
    tiny_run(&project.root, &[]);
    let ours = tree(&project.path("out/adapter"));
    let output = project.run(&["run", "other.yaml"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_ne!(tree(&project.path("out/adapter")), ours);
    let text = tiny_status(&project.root);
    assert!(
        text.contains("[DIRTY] export: published output out/adapter changed ("),
        "{text}"
    );
    let log = tiny_run(&project.root, &[]);
    assert!(!log.contains("Running"), "republished, not rerun: {log}");
    assert_eq!(tree(&project.path("out/adapter")), ours);
}

#[test]
fn a_set_base_model_name_is_published_verbatim() {
    let yaml = TINY.replace(
        "      adapter: out/adapter\n",
        "      adapter: out/adapter\n      base_model_name_or_path: org/tiny-llama\n",
    );
    let project = tiny_project(&yaml);
    tiny_run(&project.root, &[]);
    assert_eq!(
        adapter_config(&project.root)["base_model_name_or_path"],
        "org/tiny-llama"
    );
    let card = std::fs::read_to_string(project.path("out/adapter/README.md")).expect("card");
    assert!(card.contains("base_model: org/tiny-llama"), "{card}");
}

#[test]
fn an_export_that_cannot_publish_one_destination_publishes_none() {
    // Every destination is checked before any is written: a foreign folder at `merged` leaves
    // `adapter` unpublished too, never a half-done export.
    let project = tiny_project(train_export_pipeline());
    let root = project.path("");
    let root = root.as_path();
    std::fs::create_dir_all(root.join("exported/merged")).expect("merged");
    std::fs::write(root.join("exported/merged/notes.txt"), "mine").expect("notes");
    let output = run_in(root, &["run", "pipeline.yaml"]);
    assert!(!output.status.success(), "{}", stderr(&output));
    let text = stderr(&output);
    assert!(
        text.contains("was not written by peftpipe export"),
        "{text}"
    );
    assert!(
        !root.join("exported/adapter").exists(),
        "the adapter was published before the export failed:\n{text}"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("exported/merged/notes.txt")).expect("notes"),
        "mine"
    );
}

/// A small train → export pipeline over the quickstart model (adapter and merged exports).
fn train_export_pipeline() -> &'static str {
    r#"name: halfway
seed: 3
stages:
  data:
    ingest:
      path: data/reviews.parquet
      columns: [text, label]
      drop_nulls: true
      limit: 64
  prompts:
    template:
      input: data
      prompt: "review: {{ text }}\nsentiment:"
      completion: " {{ label }}"
  train:
    train:
      data: prompts
      model: model
      method:
        lora: {r: 2}
      batch_size: 8
      max_steps: 2
      max_seq_len: 48
      device: cpu
  export:
    export:
      from: train
      adapter: exported/adapter
      merged: exported/merged
"#
}

#[test]
fn a_changed_base_model_path_republishes_the_adapter_that_names_it() {
    // `model: ${TINY_MODEL}` pointed at an identical copy: nothing reruns (same inputs), but the
    // published adapter names the base model folder of this checkout, so it is published again.
    let yaml = TINY.replace("      model: model\n", "      model: ${TINY_MODEL}\n");
    let project = tiny_project(&yaml);
    copy_dir(&project.path("model"), &project.path("model2"));
    let with_model = |folder: &str, args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_peftpipe"))
            .args(args)
            .current_dir(&project.root)
            .env_remove("PEFTPIPE_CACHE_DIR")
            .env_remove("PEFTPIPE_VERSION_OVERRIDE")
            .env("TINY_MODEL", project.path(folder))
            .env("NO_COLOR", "1")
            .output()
            .expect("run peftpipe")
    };
    let first = with_model("model", &["run", "pipeline.yaml"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let status = stdout(&with_model("model2", &["status", "pipeline.yaml"]));
    assert!(status.contains("[FRESH] train"), "{status}");
    assert!(
        status.contains("[DIRTY] export: published with base_model_name_or_path "),
        "{status}"
    );
    let second = with_model("model2", &["run", "pipeline.yaml"]);
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(!stderr(&second).contains("Running"), "{}", stderr(&second));
    assert_eq!(
        adapter_config(&project.root)["base_model_name_or_path"],
        project.path("model2").display().to_string()
    );
    let status = stdout(&with_model("model2", &["status", "pipeline.yaml"]));
    assert!(status.contains("[FRESH] export"), "{status}");
}

#[test]
fn republishing_never_deletes_a_file_peftpipe_did_not_write() {
    let project = tiny_project(TINY);
    tiny_run(&project.root, &[]);
    project.write("out/adapter/notes.txt", "mine");
    let status = tiny_status(&project.root);
    assert!(status.contains("(notes.txt is unexpected)"), "{status}");
    let output = run_in(&project.root, &["run", "pipeline.yaml"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let log = stderr(&output);
    assert!(
        log.contains("out/adapter holds notes.txt, which peftpipe did not write"),
        "{log}"
    );
    assert_eq!(
        std::fs::read_to_string(project.path("out/adapter/notes.txt")).expect("kept"),
        "mine"
    );
    // Moved away, the folder is as published again.
    std::fs::remove_file(project.path("out/adapter/notes.txt")).expect("remove");
    assert!(tiny_status(&project.root).contains("[FRESH] export"));
}

#[test]
fn a_base_model_name_with_yaml_characters_stays_whole_in_the_card() {
    // `#` starts a comment and `: ` a mapping in YAML: the front matter must quote the name.
    // The loading snippet's Python string must hold a `"` and a `\` too.
    let name = r#"models/run #2: "final" \ v"#;
    let yaml = TINY.replace(
        "      adapter: out/adapter\n",
        &format!(
            "      adapter: out/adapter\n      base_model_name_or_path: '{}'\n",
            name.replace('\'', "''")
        ),
    );
    let project = tiny_project(&yaml);
    tiny_run(&project.root, &[]);
    let card = std::fs::read_to_string(project.path("out/adapter/README.md")).expect("card");
    let front = card
        .strip_prefix("---\n")
        .and_then(|rest| rest.split_once("\n---\n"))
        .map(|(front, _)| front)
        .expect("front matter");
    let meta: serde_json::Value = serde_norway::from_str(front).expect("valid YAML front matter");
    assert_eq!(meta["base_model"], name, "{card}");
    // Python's string literal of the name (JSON's escapes are Python's).
    let literal = serde_json::Value::from(name).to_string();
    assert!(
        card.contains(&format!("from_pretrained({literal})")),
        "{card}"
    );
}
