//! The run report (issue 11, item 1): `run` writes one self-contained HTML page and names it in
//! its summary; `peftpipe report` writes it where asked. Checked offline (structure: every
//! section, every chart with data, nothing loaded from the network) and, where a Chromium is
//! installed, in a real headless browser (skipped with the reason otherwise).
#![expect(clippy::print_stderr, reason = "a skipped check says why")]

mod report_support;

use std::path::{Path, PathBuf};

use report_support::{stderr, stdout, Project};

/// The charts of a page: (class, data-points, the figure's markup).
fn charts(page: &str) -> Vec<(String, usize, String)> {
    page.split("<figure class=\"chart ")
        .skip(1)
        .map(|rest| {
            let figure = rest.split("</figure>").next().unwrap_or("").to_string();
            let class = figure.split('"').next().unwrap_or("").to_string();
            let points = figure
                .split("data-points=\"")
                .nth(1)
                .and_then(|tail| tail.split('"').next())
                .and_then(|number| number.parse().ok())
                .unwrap_or(0);
            (class, points, figure)
        })
        .collect()
}

/// Points of every `<polyline points="x,y x,y ...">` in `svg`.
fn polyline_points(svg: &str) -> Vec<usize> {
    svg.split("<polyline")
        .skip(1)
        .map(|rest| {
            rest.split("points=\"")
                .nth(1)
                .and_then(|tail| tail.split('"').next())
                .map_or(0, |points| points.split_whitespace().count())
        })
        .collect()
}

fn check_page(page: &str) {
    assert!(page.starts_with("<!DOCTYPE html>"), "{}", &page[..100]);
    assert!(page.trim_end().ends_with("</html>"));
    // Self-contained: no script, stylesheet link, image or frame to fetch; the only URL is
    // SVG's XML namespace.
    for banned in [
        "<script", "<link", "<img", "<iframe", "src=", "@import", "url(",
    ] {
        assert!(!page.contains(banned), "the page loads something: {banned}");
    }
    let without_namespace = page.replace("http://www.w3.org/2000/svg", "");
    assert!(
        !without_namespace.contains("http://") && !without_namespace.contains("https://"),
        "the page names a URL"
    );
    for section in [
        "id=\"stages\"",
        "id=\"train-train\"",
        "id=\"evaluate-evaluate\"",
        "<h3>Samples</h3>",
        "id=\"environment\"",
    ] {
        assert!(page.contains(section), "section {section} missing");
    }
    let charts = charts(page);
    let classes: Vec<&str> = charts.iter().map(|(class, _, _)| class.as_str()).collect();
    assert_eq!(
        classes.iter().filter(|class| **class == "line").count(),
        3,
        "loss, learning rate, gradient norm: {classes:?}"
    );
    assert_eq!(classes.iter().filter(|class| **class == "dag").count(), 1);
    assert!(
        classes.iter().filter(|class| **class == "bars").count() >= 3,
        "accuracy, loss, perplexity: {classes:?}"
    );
    for (class, points, figure) in &charts {
        assert!(*points > 0, "an empty {class} chart");
        assert!(figure.contains("<svg"), "{class} chart without SVG");
        match class.as_str() {
            "line" => {
                let lines = polyline_points(figure);
                assert!(
                    lines.iter().any(|count| *count >= 2),
                    "a line chart without a drawn line: {lines:?}"
                );
            }
            "bars" => assert!(
                figure.matches("<rect").count() > *points,
                "a bar chart without its bars"
            ),
            _ => {}
        }
    }
    // Three training steps: the loss chart draws loss and smoothed loss, 3 points each.
    assert_eq!(charts[1].1, 6, "loss chart: {:?}", charts[1].0);
    // Stage table: every stage with its status and cache use.
    for stage in ["data", "prompts", "train", "evaluate", "export"] {
        assert!(
            page.contains(&format!("<tr><td>{stage}</td>")),
            "{stage} row"
        );
    }
    assert!(page.contains("<th>fingerprint of train</th>"));
    assert!(page.contains("train: device</th><td><code>cpu</code>"));
}

#[test]
fn run_writes_a_self_contained_report_and_names_it() {
    let project = Project::tiny();
    let output = project.ok(&["run", "pipeline.yaml"]);
    let log = stderr(&output);
    let path = project.path(".peftpipe/out/tiny/report.html");
    assert!(
        log.contains(&format!("Report {}", path.display())),
        "the summary names the report:\n{log}"
    );
    let page = std::fs::read_to_string(&path).expect("the report");
    check_page(&page);
    assert!(page.contains("<td>ran</td>"), "statuses of this run");

    // `--no-report` writes none.
    std::fs::remove_file(&path).expect("remove");
    let output = project.ok(&["run", "pipeline.yaml", "--no-report"]);
    assert!(!path.exists());
    assert!(!stderr(&output).contains("Report"));
}

#[test]
fn report_command_writes_where_asked_and_prints_the_path() {
    let project = Project::tiny();
    project.ok(&["run", "pipeline.yaml", "--no-report"]);
    let output = project.ok(&["report", "pipeline.yaml", "-o", "pages/tiny.html"]);
    assert_eq!(stdout(&output).trim(), "pages/tiny.html");
    let page = std::fs::read_to_string(project.path("pages/tiny.html")).expect("the report");
    check_page(&page);
    // Without a run, the statuses come from the plan: everything is fresh.
    assert!(
        page.contains("<td>fresh</td><td class=\"num\">"),
        "fresh rows"
    );
    assert!(!page.contains("<td>ran</td>"));
}

fn browser() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ]
    .iter()
    .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
    .find(|candidate| candidate.is_file())
}

#[test]
fn report_loads_in_a_headless_browser_without_console_errors() {
    let Some(browser) = browser() else {
        eprintln!(
            "skipped: no chromium, chromium-browser or google-chrome on PATH (Debian: apt-get \
             install chromium)"
        );
        return;
    };
    let project = Project::tiny();
    project.ok(&["run", "pipeline.yaml"]);
    let page = project.path(".peftpipe/out/tiny/report.html");
    let profile = project.path("browser-profile");
    let output = std::process::Command::new(&browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", Path::new(&page).display()))
        .output()
        .expect("run the browser");
    let dom = stdout(&output);
    let log = stderr(&output);
    assert!(output.status.success(), "{}: {log}", browser.display());
    let console: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("CONSOLE") || line.contains("Uncaught"))
        .collect();
    assert!(console.is_empty(), "console messages: {console:?}");
    // The browser parsed every chart with its drawn data.
    let parsed = charts(&dom);
    assert!(parsed.len() >= 7, "{} charts in the DOM", parsed.len());
    for (class, points, figure) in parsed {
        assert!(points > 0 && figure.contains("<svg"), "{class} chart");
    }
}

#[test]
fn a_failed_stage_shows_its_error_in_status_and_the_report_until_it_succeeds() {
    let project = Project::tiny();
    // A folder peftpipe did not publish where the export writes: the export fails at run time.
    project.write("out/tiny/adapter/notes.txt", "mine");
    let output = project.peftpipe(&["run", "pipeline.yaml", "--no-report"]);
    assert!(!output.status.success(), "{}", stderr(&output));

    let status = stdout(&project.peftpipe(&["status", "pipeline.yaml"]));
    let line = status
        .lines()
        .find(|line| line.contains("export"))
        .expect("the export's line");
    assert!(
        line.starts_with("[DIRTY] export: never run (the last run with these inputs failed: ")
            && line.contains("out/tiny/adapter"),
        "{status}"
    );
    let json: serde_json::Value = serde_json::from_str(&stdout(&project.peftpipe(&[
        "status",
        "pipeline.yaml",
        "--json",
    ])))
    .expect("JSON");
    let export = &json["stages"][4];
    assert_eq!(export["name"], "export");
    assert!(export["last_failure"]["error"]
        .as_str()
        .is_some_and(|error| error.contains("out/tiny/adapter")));
    assert!(json["stages"][3]["last_failure"].is_null());

    project.ok(&["report", "pipeline.yaml", "-o", "page.html"]);
    let page = std::fs::read_to_string(project.path("page.html")).expect("the report");
    let export_row = page
        .split("<tr><td>export</td>")
        .nth(1)
        .expect("the export's row");
    assert!(export_row.contains("<td>failed</td>"), "{export_row}");
    let error_row = export_row
        .split("<tr class=\"error\">")
        .nth(1)
        .and_then(|rest| rest.split("</tr>").next())
        .expect("the error under the export's row");
    assert!(error_row.contains("out/tiny/adapter"), "{error_row}");

    // Out of the way: the export runs, and the failure is forgotten.
    std::fs::remove_dir_all(project.path("out/tiny/adapter")).expect("remove");
    project.ok(&["run", "pipeline.yaml", "--no-report"]);
    let status = stdout(&project.peftpipe(&["status", "pipeline.yaml"]));
    assert!(!status.contains("failed"), "{status}");
    project.ok(&["report", "pipeline.yaml", "-o", "page.html"]);
    let page = std::fs::read_to_string(project.path("page.html")).expect("the report");
    assert!(!page.contains("<tr class=\"error\">"));
}

#[test]
fn the_page_always_shows_the_whole_pipeline_from_the_cache_and_marks_stale_figures() {
    let project = Project::tiny();
    project.ok(&["run", "pipeline.yaml", "--no-report"]);
    // A run of one stage still writes the whole page.
    project.ok(&["run", "pipeline.yaml", "--stage", "data"]);
    let page = std::fs::read_to_string(project.path(".peftpipe/out/tiny/report.html"))
        .expect("the report");
    check_page(&page);

    // The published copies gone (a fresh checkout after `pull`): the figures come from the
    // cache, and the rows say the copies are not published.
    std::fs::remove_dir_all(project.path(".peftpipe/out/tiny/train")).expect("remove");
    std::fs::remove_dir_all(project.path(".peftpipe/out/tiny/evaluate")).expect("remove");
    project.ok(&["report", "pipeline.yaml", "-o", "page.html"]);
    let page = std::fs::read_to_string(project.path("page.html")).expect("the report");
    check_page(&page);
    let train_row = page
        .split("<tr><td>train</td>")
        .nth(1)
        .and_then(|rest| rest.split("</tr>").next())
        .expect("the train row");
    assert!(train_row.contains("<td>not published</td>"), "{train_row}");
    assert!(!page.contains("stale: the figures of the last run"));

    // A changed parameter: the train and evaluate sections are the last run's, and say so.
    project.ok(&["run", "pipeline.yaml", "--no-report"]);
    project.ok(&[
        "report",
        "pipeline.yaml",
        "-o",
        "page.html",
        "--set",
        "stages.train.train.max_steps=2",
    ]);
    let page = std::fs::read_to_string(project.path("page.html")).expect("the report");
    for heading in ["Training: train", "Evaluation: evaluate"] {
        let section = page
            .split(&format!("{heading}</h2>"))
            .nth(1)
            .expect("the section");
        assert!(
            section
                .trim_start()
                .starts_with("<p class=\"note\">stale: the figures of the last run"),
            "{heading}: {}",
            &section[..200.min(section.len())]
        );
    }
}

/// The section of `heading` (`Training: train`) up to the next `<h2`.
fn section<'a>(page: &'a str, heading: &str) -> &'a str {
    let rest = page
        .split(&format!("{heading}</h2>"))
        .nth(1)
        .unwrap_or_else(|| panic!("no section {heading}"));
    rest.split("<h2").next().unwrap_or(rest)
}

#[test]
fn figures_of_a_stage_that_failed_or_was_skipped_are_said_to_be_the_last_successful_runs() {
    let project = Project::tiny();
    project.ok(&["run", "pipeline.yaml", "--no-report"]);
    // Training changes and the evaluate stage fails before it starts: no stage below the
    // template has figures of this run, the page shows the last successful run's.
    let yaml = report_support::tiny_yaml("tiny", 4)
        .replace("max_steps: 3", "max_steps: 2")
        .replace("labels: [positive, negative]", "labels: [pos, neg]");
    project.write("pipeline.yaml", &yaml);
    let output = project.peftpipe(&["run", "pipeline.yaml"]);
    assert!(!output.status.success(), "{}", stderr(&output));
    let from_run = std::fs::read_to_string(project.path(".peftpipe/out/tiny/report.html"))
        .expect("the report of the failed run");
    project.ok(&["report", "pipeline.yaml", "-o", "page.html"]);
    let from_report = std::fs::read_to_string(project.path("page.html")).expect("the report");
    for (which, page) in [("run", &from_run), ("report", &from_report)] {
        // The stage table's figures cell says so too.
        for stage in ["train", "evaluate"] {
            let row = page
                .split(&format!("<tr><td>{stage}</td>"))
                .nth(1)
                .and_then(|rest| rest.split("</tr>").next())
                .expect("the stage's row");
            assert!(
                row.contains("last successful run: "),
                "{which}: the {stage} row shows old figures as this run's: {row}"
            );
            // train was skipped: no time of its own.
            if which == "run" && stage == "train" {
                assert!(row.contains("<td class=\"num\">-</td>"), "{row}");
            }
        }
        for heading in ["Training: train", "Evaluation: evaluate"] {
            let shown = section(page, heading);
            assert!(
                shown.trim_start().starts_with("<p class=\"note\">")
                    && shown.contains("the figures of the last"),
                "{which}: {heading} shows old figures as this run's: {}",
                &shown[..300.min(shown.len())]
            );
        }
    }
}

#[test]
fn a_pipeline_never_run_on_this_cache_shows_no_figures_from_published_copies() {
    let project = Project::tiny();
    project.ok(&["run", "pipeline.yaml", "--no-report"]);
    // Another cache: nothing ran on it. The published copies under .peftpipe/out are another
    // cache's runs, which this page cannot vouch for.
    project.ok(&[
        "--cache-dir",
        "other-cache",
        "report",
        "pipeline.yaml",
        "-o",
        "page.html",
    ]);
    let page = std::fs::read_to_string(project.path("page.html")).expect("the report");
    let evaluate_row = page
        .split("<tr><td>evaluate</td>")
        .nth(1)
        .and_then(|rest| rest.split("</tr>").next())
        .expect("the evaluate row");
    assert!(
        evaluate_row.contains("<td>never run</td>"),
        "{evaluate_row}"
    );
    for heading in ["Training: train", "Evaluation: evaluate"] {
        assert!(
            !page.contains(heading),
            "a never-run stage shows figures: {heading}"
        );
    }
}
