//! The cache as a user sees it: where it lives (`--cache-dir`, `PEFTPIPE_CACHE_DIR`, default next
//! to the pipeline), the stable output paths, `--json` summaries, `--stage`, and `gc`.

mod exec_support;

use exec_support::{stderr, stdout, Project};

#[test]
fn outputs_are_materialized_at_the_stable_path() {
    let project = Project::new();
    let output = project.run(&["run", "pipeline.yaml"]);
    assert!(output.status.success(), "{}", stderr(&output));
    for stage in ["data", "prompts"] {
        let dir = project.path(&format!(".peftpipe/out/reviews/{stage}"));
        let files = exec_support::tree(&dir);
        assert!(
            files.keys().any(|name| name.ends_with(".parquet")),
            "{stage}: {:?}",
            files.keys()
        );
        // The materialized tree is the cache object's content.
        let digest = project.recorded_output(stage).expect("recorded");
        assert_eq!(files, exec_support::tree(&project.object_data(&digest)));
    }
}

#[test]
fn the_cache_dir_comes_from_the_flag_or_the_environment() {
    let project = Project::new();
    let flag = project.path("ci-cache");
    let output = project.run(&["--cache-dir", "ci-cache", "run", "pipeline.yaml"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(flag.join("locks/reviews.lock.json").is_file());
    assert!(!project.path(".peftpipe/cache").exists());

    // Restoring the CI cache elsewhere: a fresh checkout with PEFTPIPE_CACHE_DIR pointing at it.
    // Its outputs are cached but not yet published in this checkout: `status` says so, and
    // `run` restores them without running a stage.
    let checkout = Project::new();
    let in_checkout = |args: &[&str]| {
        checkout
            .command(args)
            .env("PEFTPIPE_CACHE_DIR", &flag)
            .output()
            .expect("run peftpipe")
    };
    let output = in_checkout(&["status", "pipeline.yaml"]);
    assert_eq!(
        stdout(&output),
        "[DIRTY] data: published output .peftpipe/out/reviews/data is missing\n\
         [DIRTY] prompts: published output .peftpipe/out/reviews/prompts is missing\n"
    );
    let restored = in_checkout(&["run", "pipeline.yaml"]);
    assert!(restored.status.success(), "{}", stderr(&restored));
    assert!(
        !stderr(&restored).contains("Running"),
        "a copied project with the same inputs is restored, not rerun: {}",
        stderr(&restored)
    );
    let output = in_checkout(&["status", "--check", "pipeline.yaml"]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
}

#[test]
fn json_summary_reports_time_and_cache_use_per_stage() {
    let project = Project::new();
    let first = project.run(&["--json", "run", "pipeline.yaml"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let summary: serde_json::Value = serde_json::from_slice(&first.stdout).expect("JSON on stdout");
    let stages = summary["stages"].as_array().expect("stages");
    assert_eq!(stages.len(), 2);
    for stage in stages {
        assert_eq!(stage["status"], "ran");
        assert_eq!(stage["cache"], "miss");
        assert!(stage["wall_time_seconds"].as_f64().is_some());
        assert_eq!(stage["reasons"][0]["reason"], "never_run");
    }
    let second = project.run(&["--json", "run", "pipeline.yaml"]);
    let summary: serde_json::Value =
        serde_json::from_slice(&second.stdout).expect("JSON on stdout");
    assert!(summary["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .all(|stage| stage["status"] == "fresh" && stage["cache"] == "hit"));
}

#[test]
fn stage_selection_runs_the_stage_and_what_it_needs() {
    let project = Project::new();
    let output = project.run(&["run", "pipeline.yaml", "--stage", "data"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(project.recorded_output("data").is_some());
    assert!(project.recorded_output("prompts").is_none());
    let unknown = project.run(&["run", "pipeline.yaml", "--stage", "prompt"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert_eq!(
        stderr(&unknown),
        "error: no stage named `prompt` (did you mean `prompts`?)\n"
    );
    let forced = project.run(&["run", "pipeline.yaml", "--stage", "data", "--force"]);
    assert!(stderr(&forced).contains("Running data (ingest): forced"));
}

#[test]
fn gc_drops_only_unreferenced_objects() {
    let project = Project::new();
    assert!(project.run(&["run", "pipeline.yaml"]).status.success());
    let set = "stages.prompts.template.few_shot.k=2";
    assert!(project
        .run(&["run", "pipeline.yaml", "--set", set])
        .status
        .success());
    let preview = project.run(&["--json", "gc", "pipeline.yaml", "--dry-run"]);
    let report: serde_json::Value = serde_json::from_slice(&preview.stdout).expect("JSON");
    assert_eq!(report["objects_removed"], 1, "the k = 1 prompts output");
    assert_eq!(report["objects_kept"], 2);

    let output = project.run(&["gc", "pipeline.yaml"]);
    assert!(output.status.success(), "{}", stderr(&output));
    // The current outputs are intact; the k = 1 output is gone, so going back reruns.
    let status = project.run(&["status", "pipeline.yaml", "--set", set]);
    assert_eq!(stdout(&status), "[FRESH] data\n[FRESH] prompts\n");
    let back = project.run(&["status", "pipeline.yaml"]);
    assert_eq!(
        stdout(&back),
        "[FRESH] data\n[DIRTY] prompts: parameter template.few_shot.k changed (2 → 1)\n"
    );
}

#[test]
fn gc_of_a_pipeline_file_that_is_not_there_says_so() {
    let project = Project::new();
    assert!(project.run(&["run", "pipeline.yaml"]).status.success());
    let output = project.run(&["gc", "nonexistent.yaml"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert_eq!(stderr(&output), "error: nonexistent.yaml: no such file\n");
}

/// Regression: two pipeline files of one project with the same `name:` shared the lock file and
/// `.peftpipe/out/<name>/`: running the second replaced the first's published outputs and lock
/// entries, and `status` of either reported the other's outputs as its own. The name belongs to
/// the file that last ran under it while that file still declares it; a rename takes it over.
#[test]
fn a_pipeline_name_belongs_to_one_file_of_the_project() {
    let project = Project::new();
    assert!(project.run(&["run", "pipeline.yaml"]).status.success());
    let variant = exec_support::PIPELINE.replace("few_shot: {k: 1}", "few_shot: {k: 2}");
    project.write("variant.yaml", &variant);
    let published = exec_support::tree(&project.path(".peftpipe/out/reviews"));
    let lock = project.lock_file();
    for command in ["run", "status"] {
        let output = project.run(&[command, "variant.yaml"]);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{command}: {}",
            stderr(&output)
        );
        assert_eq!(
            stderr(&output),
            "error: pipeline name `reviews` belongs to pipeline.yaml, the file of this project \
             that last ran under it: variant.yaml would share its lock file and \
             `.peftpipe/out/reviews/`\n  = hint: give each pipeline its own `name:`\n",
            "{command}"
        );
    }
    assert_eq!(
        exec_support::tree(&project.path(".peftpipe/out/reviews")),
        published
    );
    assert_eq!(project.lock_file(), lock);
    let status = project.run(&["status", "--check", "pipeline.yaml"]);
    assert_eq!(stdout(&status), "[FRESH] data\n[FRESH] prompts\n");

    // With its own name the variant runs beside it.
    project.write(
        "variant.yaml",
        &variant.replace("name: reviews", "name: variant"),
    );
    let output = project.run(&["run", "variant.yaml"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(project.path(".peftpipe/out/variant/prompts").is_dir());

    // A renamed file takes its name over: the old file no longer declares it.
    std::fs::rename(project.path("pipeline.yaml"), project.path("renamed.yaml")).expect("rename");
    let status = project.run(&["status", "--check", "renamed.yaml"]);
    assert_eq!(stdout(&status), "[FRESH] data\n[FRESH] prompts\n");
    assert!(project.run(&["run", "renamed.yaml"]).status.success());
    // And owns it from then on: the old file, brought back, is the second claimant.
    project.write("pipeline.yaml", exec_support::PIPELINE);
    let output = project.run(&["status", "pipeline.yaml"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("belongs to renamed.yaml"),
        "{}",
        stderr(&output)
    );
}

/// Regression: `gc` left `.peftpipe/out/<pipeline>/<stage>/` of renamed and removed stages
/// behind forever. It removes the stage folders of FILE's pipeline that FILE no longer has, and
/// of the project's other pipelines those their lock files no longer name; it lists them.
#[test]
fn gc_removes_published_folders_of_stages_no_pipeline_has() {
    let project = Project::new();
    assert!(project.run(&["run", "pipeline.yaml"]).status.success());
    let other = exec_support::PIPELINE.replace("name: reviews", "name: other");
    project.write("other.yaml", &other);
    assert!(project.run(&["run", "other.yaml"]).status.success());
    project.write(
        "pipeline.yaml",
        &exec_support::PIPELINE.replace("  prompts:\n", "  renamed:\n"),
    );
    assert!(project.run(&["run", "pipeline.yaml"]).status.success());
    // The other pipeline loses a stage but has not run since: its lock file still names it.
    let (data_only, _) = other.split_once("  prompts:\n").expect("prompts stage");
    project.write("other.yaml", data_only);

    let preview = project.run(&["--json", "gc", "pipeline.yaml", "--dry-run"]);
    assert!(preview.status.success(), "{}", stderr(&preview));
    let report: serde_json::Value = serde_json::from_slice(&preview.stdout).expect("JSON");
    assert_eq!(
        report["stale_outputs"],
        serde_json::json!([".peftpipe/out/reviews/prompts"]),
        "{report}"
    );
    assert_eq!(report["stale_outputs_removed"], 1, "{report}");
    assert!(
        report["stale_output_bytes_removed"].as_u64() > Some(0),
        "{report}"
    );
    assert!(
        project.path(".peftpipe/out/reviews/prompts").is_dir(),
        "dry run"
    );

    let output = project.run(&["gc", "pipeline.yaml"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output)
            .contains("removed 1 published folder(s) of stages their pipeline no longer has"),
        "{}",
        stderr(&output)
    );
    assert!(!project.path(".peftpipe/out/reviews/prompts").exists());
    for kept in [
        "reviews/data",
        "reviews/renamed",
        "other/data",
        "other/prompts",
    ] {
        assert!(
            project.path(&format!(".peftpipe/out/{kept}")).is_dir(),
            "{kept} is kept"
        );
    }
    assert!(project.path(".peftpipe/out/reviews/report.html").is_file());
    let status = project.run(&["status", "--check", "pipeline.yaml"]);
    assert_eq!(stdout(&status), "[FRESH] data\n[FRESH] renamed\n");

    // gc of the other file judges it by the file.
    let output = project.run(&["gc", "other.yaml"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(!project.path(".peftpipe/out/other/prompts").exists());
    assert!(project.path(".peftpipe/out/other/data").is_dir());
    assert!(project.path(".peftpipe/out/reviews/renamed").is_dir());
}
