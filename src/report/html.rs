//! The run report: one self-contained HTML page (no script, no network, no CDN; charts as
//! inline SVG drawn with plotters' SVG backend) showing the stage graph with each stage's
//! status, time and cache use, the training curves, evaluate's metrics as a table and bar
//! charts, the sample generations and the environment. Renders a [`ReportInput`] the command
//! gathered; reads and writes no file.
//!
//! Every chart is a `<figure class="chart ...">` with `data-points` (how many values it
//! draws), so tests can check that no chart is empty.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::format;

/// One stage as the report shows it.
#[derive(Debug, Clone, Default)]
pub struct StageRow {
    pub name: String,
    pub kind: String,
    /// Stages it reads from.
    pub needs: Vec<String>,
    /// `ran`, `fresh`, `failed`, `stale`, `never run`, ...
    pub status: String,
    /// Seconds its last run took, when known.
    pub seconds: Option<f64>,
    /// `hit`, `miss` or `-`.
    pub cache: String,
    pub fingerprint: Option<String>,
    pub outcome: BTreeMap<String, serde_json::Value>,
    /// Why it failed or was not run (shown under its row).
    pub error: Option<String>,
    /// Its figures (curves, metrics) are those of its last successful run, not of the current
    /// inputs: it is stale, or it failed, was skipped or cancelled after an earlier success.
    pub old_figures: bool,
}

/// One training step of metrics.jsonl (fields the page plots; absent ones are `None`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepRow {
    pub step: f64,
    pub loss: Option<f64>,
    pub lr: Option<f64>,
    pub grad_norm: Option<f64>,
    pub eval_loss: Option<f64>,
}

impl StepRow {
    /// Read one JSON line (`{"step": 1, "loss": 2.3, ...}`); `None` without a step.
    pub fn from_json(value: &serde_json::Value) -> Option<StepRow> {
        let field = |name: &str| value.get(name).and_then(serde_json::Value::as_f64);
        Some(StepRow {
            step: field("step")?,
            loss: field("loss"),
            lr: field("lr"),
            grad_norm: field("grad_norm"),
            eval_loss: field("eval_loss"),
        })
    }
}

/// The curves of one train stage.
#[derive(Debug, Clone, Default)]
pub struct TrainCurves {
    pub stage: String,
    pub steps: Vec<StepRow>,
}

/// Everything the page shows.
#[derive(Debug, Clone, Default)]
pub struct ReportInput {
    pub pipeline: String,
    /// The pipeline file as given.
    pub file: String,
    /// In topological order.
    pub stages: Vec<StageRow>,
    pub trains: Vec<TrainCurves>,
    /// Each evaluate stage's metrics.json.
    pub evaluations: Vec<(String, serde_json::Value)>,
    /// `(name, value)` lines: device, dtype, versions, ...
    pub environment: Vec<(String, String)>,
    /// Things the page could not show and why (a missing output, an unreadable file).
    pub notes: Vec<String>,
}

/// Escape text for HTML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            other => out.push(other),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;\
color:#222;padding:0 1rem}h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;\
border-bottom:1px solid #ddd}table{border-collapse:collapse;margin:.5rem 0}\
td,th{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}\
th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}\
figure.chart{display:inline-block;margin:.5rem}figcaption{font-size:.9rem;color:#555}\
pre{white-space:pre-wrap;margin:0;font-size:.85rem}.note{color:#a60}tr.error td{color:#a00}";

/// The whole page.
pub fn render(input: &ReportInput) -> String {
    let mut page = String::new();
    let title = format!("peftpipe report: {}", escape(&input.pipeline));
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{title}</h1>\n\
         <p>Pipeline file <code>{}</code>.</p>\n",
        escape(&input.file)
    );
    for note in &input.notes {
        let _ = writeln!(page, "<p class=\"note\">{}</p>", escape(note));
    }
    page.push_str(&stages_section(input));
    page.push_str(&training_section(input));
    page.push_str(&evaluation_section(input));
    page.push_str(&environment_section(input));
    page.push_str("</body>\n</html>\n");
    page
}

fn stages_section(input: &ReportInput) -> String {
    let mut html = String::from("<h2 id=\"stages\">Stages</h2>\n");
    if !input.stages.is_empty() {
        html.push_str(&dag_chart(&input.stages));
    }
    html.push_str(
        "<table>\n<tr><th>stage</th><th>kind</th><th>needs</th><th>status</th><th>time</th>\
         <th>cache</th><th>figures</th></tr>\n",
    );
    for stage in &input.stages {
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td>\
             <td>{}</td><td>{}</td></tr>",
            escape(&stage.name),
            escape(&stage.kind),
            escape(&stage.needs.join(", ")),
            escape(&stage.status),
            stage
                .seconds
                .map(format::seconds)
                .unwrap_or_else(|| "-".into()),
            escape(&stage.cache),
            escape(&figures_text(stage)),
        );
        if let Some(error) = &stage.error {
            let _ = writeln!(
                html,
                "<tr class=\"error\"><td colspan=\"7\"><pre>{}</pre></td></tr>",
                escape(error)
            );
        }
    }
    html.push_str("</table>\n");
    html
}

/// A stage's figures for the table, said to be its last successful run's where they are
/// ([`StageRow::old_figures`]: the status column says what happened since).
fn figures_text(stage: &StageRow) -> String {
    let text = super::run::outcome_text(&stage.outcome);
    if stage.old_figures && !text.is_empty() {
        format!("last successful run: {text}")
    } else {
        text
    }
}

/// A note under a section whose figures are not those of the current inputs: the stage is
/// stale, or its latest run failed (was skipped, cancelled) and the figures are its last
/// successful run's.
fn stale_note(input: &ReportInput, stage: &str) -> String {
    let Some(row) = input
        .stages
        .iter()
        .find(|row| row.name == stage && row.old_figures)
    else {
        return String::new();
    };
    if row.status == "stale" {
        return "<p class=\"note\">stale: the figures of the last run, before the changes \
                <code>peftpipe status</code> lists</p>\n"
            .to_string();
    }
    format!(
        "<p class=\"note\">{}: the figures of the last successful run, before the changes \
         <code>peftpipe status</code> lists (the stage table says what happened since)</p>\n",
        escape(&row.status)
    )
}

fn training_section(input: &ReportInput) -> String {
    let mut html = String::new();
    for curves in &input.trains {
        let _ = writeln!(
            html,
            "<h2 id=\"train-{0}\">Training: {0}</h2>",
            escape(&curves.stage)
        );
        html.push_str(&stale_note(input, &curves.stage));
        let series = |pick: fn(&StepRow) -> Option<f64>| -> Vec<(f64, f64)> {
            curves
                .steps
                .iter()
                .filter_map(|row| pick(row).map(|value| (row.step, value)))
                .filter(|(_, value)| value.is_finite())
                .collect()
        };
        let loss = series(|row| row.loss);
        let mut loss_series = vec![("loss", loss.clone())];
        if !loss.is_empty() {
            loss_series.push(("smoothed loss", smooth(&loss, 0.9)));
        }
        let eval = series(|row| row.eval_loss);
        if !eval.is_empty() {
            loss_series.push(("eval loss", eval));
        }
        let charts = [
            ("Loss", loss_series),
            ("Learning rate", vec![("lr", series(|row| row.lr))]),
            (
                "Gradient norm",
                vec![("grad norm", series(|row| row.grad_norm))],
            ),
        ];
        for (title, lines) in charts {
            if lines.iter().all(|(_, points)| points.is_empty()) {
                let _ = writeln!(
                    html,
                    "<p class=\"note\">{title}: not recorded per step by this stage's metrics.jsonl.</p>"
                );
                continue;
            }
            html.push_str(&line_chart(title, &lines));
        }
    }
    html
}

/// Exponential moving average, bias corrected (TensorBoard's smoothing).
pub fn smooth(points: &[(f64, f64)], beta: f64) -> Vec<(f64, f64)> {
    let mut average = 0.0;
    let mut weight = 0.0;
    points
        .iter()
        .map(|&(x, y)| {
            average = beta * average + (1.0 - beta) * y;
            weight = beta * weight + (1.0 - beta);
            (x, average / weight)
        })
        .collect()
}

const PALETTE: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

fn svg_error(title: &str, error: impl std::fmt::Display) -> String {
    format!(
        "<p class=\"note\">{}: the chart could not be drawn ({})</p>\n",
        escape(title),
        escape(&error.to_string())
    )
}

/// A line chart of one or more series against step; log scale when the values span more than
/// two orders of magnitude and are all positive.
pub fn line_chart(title: &str, lines: &[(&str, Vec<(f64, f64)>)]) -> String {
    let all: Vec<(f64, f64)> = lines
        .iter()
        .flat_map(|(_, points)| points.iter().copied())
        .collect();
    let points = all.len();
    let (mut x_min, mut x_max) = bounds(all.iter().map(|point| point.0));
    let (mut y_min, mut y_max) = bounds(all.iter().map(|point| point.1));
    if x_min == x_max {
        x_min -= 1.0;
        x_max += 1.0;
    }
    let log = y_min > 0.0 && y_max / y_min > 100.0;
    if y_min == y_max {
        let pad = if y_min == 0.0 { 1.0 } else { y_min.abs() * 0.1 };
        y_min -= pad;
        y_max += pad;
    }
    let mut svg = String::new();
    let drawn = (|| -> Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::with_string(&mut svg, (520, 300)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60);
        macro_rules! draw {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc("step")
                    .x_label_formatter(&|value| format::number(*value))
                    .y_label_formatter(&|value| format::number(*value))
                    .light_line_style(WHITE.mix(0.0))
                    .draw()?;
                for (index, (name, series)) in lines.iter().enumerate() {
                    let color = PALETTE[index % PALETTE.len()];
                    let drawn = series
                        .iter()
                        .copied()
                        .filter(|(_, value)| !log || *value > 0.0);
                    chart
                        .draw_series(LineSeries::new(drawn, color.stroke_width(2)))?
                        .label(*name)
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                        });
                }
                if lines.len() > 1 {
                    chart
                        .configure_series_labels()
                        .background_style(WHITE.mix(0.8))
                        .border_style(BLACK.mix(0.3))
                        .draw()?;
                }
            }};
        }
        if log {
            draw!(builder.build_cartesian_2d(x_min..x_max, (y_min..y_max).log_scale())?);
        } else {
            draw!(builder.build_cartesian_2d(x_min..x_max, y_min..y_max)?);
        }
        root.present()?;
        Ok(())
    })();
    if let Err(error) = drawn {
        return svg_error(title, error);
    }
    format!(
        "<figure class=\"chart line\" data-points=\"{points}\">{svg}<figcaption>{}{}</figcaption></figure>\n",
        escape(title),
        if log { " (log scale)" } else { "" }
    )
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values
        .filter(|value| value.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(low, high), value| {
            (low.min(value), high.max(value))
        })
}

/// A bar chart of labelled values (one bar each); log scale when they span more than two
/// orders of magnitude and are all positive.
pub fn bar_chart(title: &str, bars: &[(String, f64)]) -> String {
    let finite: Vec<&(String, f64)> = bars.iter().filter(|(_, value)| value.is_finite()).collect();
    let (low, high) = bounds(finite.iter().map(|(_, value)| *value));
    let log = low > 0.0 && high / low > 100.0;
    let (y_min, y_max) = if log {
        (low / 2.0, high * 20.0)
    } else {
        (low.min(0.0), if high <= 0.0 { 1.0 } else { high * 1.15 })
    };
    let count = finite.len();
    let mut svg = String::new();
    let drawn = (|| -> Result<(), Box<dyn std::error::Error>> {
        // Wider for many bars (a comparison of every method), at least the pair's 300 px.
        let width = u32::try_from((90 * count).clamp(300, 1100)).unwrap_or(300);
        let root = SVGBackend::with_string(&mut svg, (width, 260)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60);
        let names: Vec<String> = finite.iter().map(|(name, _)| name.clone()).collect();
        macro_rules! draw {
            ($chart:expr, $base:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .disable_x_mesh()
                    .x_labels(count.max(1))
                    .x_label_formatter(&|x: &SegmentValue<i32>| match x {
                        SegmentValue::CenterOf(index) => usize::try_from(*index)
                            .ok()
                            .and_then(|index| names.get(index).cloned())
                            .unwrap_or_default(),
                        _ => String::new(),
                    })
                    .y_label_formatter(&|value| format::number(*value))
                    .draw()?;
                chart.draw_series(finite.iter().enumerate().map(|(index, (_, value))| {
                    let color = PALETTE[index % PALETTE.len()];
                    let at = index as i32;
                    let mut bar = Rectangle::new(
                        [
                            (SegmentValue::Exact(at), $base),
                            (SegmentValue::Exact(at + 1), *value),
                        ],
                        color.filled(),
                    );
                    bar.set_margin(0, 0, 12, 12);
                    bar
                }))?;
                chart.draw_series(finite.iter().enumerate().map(|(index, (_, value))| {
                    Text::new(
                        format::number(*value),
                        (SegmentValue::CenterOf(index as i32), *value),
                        ("sans-serif", 12)
                            .into_font()
                            .color(&BLACK)
                            .pos(Pos::new(HPos::Center, VPos::Bottom)),
                    )
                }))?;
            }};
        }
        // A segmented range of 0..n has n + 1 segments.
        let x_range = (0..count.max(1) as i32 - 1).into_segmented();
        if log {
            draw!(
                builder.build_cartesian_2d(x_range, (y_min..y_max).log_scale())?,
                y_min
            );
        } else {
            draw!(builder.build_cartesian_2d(x_range, y_min..y_max)?, 0.0);
        }
        root.present()?;
        Ok(())
    })();
    if let Err(error) = drawn {
        return svg_error(title, error);
    }
    format!(
        "<figure class=\"chart bars\" data-points=\"{count}\">{svg}<figcaption>{}{}</figcaption></figure>\n",
        escape(title),
        if log { " (log scale)" } else { "" }
    )
}

/// The stage graph: one column per depth, boxes colored by status, arrows from what a stage
/// reads.
pub fn dag_chart(stages: &[StageRow]) -> String {
    let mut depth: BTreeMap<&str, usize> = BTreeMap::new();
    for stage in stages {
        let level = stage
            .needs
            .iter()
            .filter_map(|need| depth.get(need.as_str()))
            .map(|level| level + 1)
            .max()
            .unwrap_or(0);
        depth.insert(&stage.name, level);
    }
    let columns = depth.values().max().map_or(1, |level| level + 1);
    let mut rows_in: Vec<usize> = vec![0; columns];
    let mut place: BTreeMap<&str, (i32, i32)> = BTreeMap::new();
    let (box_width, box_height, gap_x, gap_y) = (150i32, 46i32, 60i32, 20i32);
    for stage in stages {
        let level = depth[stage.name.as_str()];
        let row = rows_in[level];
        rows_in[level] += 1;
        let x = 10 + level as i32 * (box_width + gap_x);
        let y = 10 + row as i32 * (box_height + gap_y);
        place.insert(&stage.name, (x, y));
    }
    let tallest = rows_in.iter().copied().max().unwrap_or(1) as i32;
    let width = (20 + columns as i32 * (box_width + gap_x) - gap_x) as u32;
    let height = (20 + tallest * (box_height + gap_y)) as u32;
    let mut svg = String::new();
    let drawn = (|| -> Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE)?;
        for stage in stages {
            let (x, y) = place[stage.name.as_str()];
            for need in &stage.needs {
                if let Some(&(from_x, from_y)) = place.get(need.as_str()) {
                    let start = (from_x + box_width, from_y + box_height / 2);
                    let end = (x, y + box_height / 2);
                    // An edge past a column runs through the gap under its source's row, not
                    // behind the boxes between.
                    let path = if x - from_x > box_width + gap_x {
                        let lane = from_y + box_height + gap_y / 2;
                        vec![start, (start.0 + 12, lane), (end.0 - 20, lane), end]
                    } else {
                        vec![start, end]
                    };
                    root.draw(&PathElement::new(path, BLACK.mix(0.5)))?;
                    root.draw(&Polygon::new(
                        vec![end, (end.0 - 8, end.1 - 4), (end.0 - 8, end.1 + 4)],
                        BLACK.mix(0.5).filled(),
                    ))?;
                }
            }
        }
        for stage in stages {
            let (x, y) = place[stage.name.as_str()];
            let fill = match stage.status.as_str() {
                "ran" => RGBColor(198, 219, 239),
                "fresh" => RGBColor(199, 233, 192),
                "failed" => RGBColor(252, 187, 161),
                _ => RGBColor(230, 230, 230),
            };
            root.draw(&Rectangle::new(
                [(x, y), (x + box_width, y + box_height)],
                fill.filled(),
            ))?;
            root.draw(&Rectangle::new(
                [(x, y), (x + box_width, y + box_height)],
                BLACK.mix(0.6),
            ))?;
            root.draw(&Text::new(
                format!("{} ({})", stage.name, stage.kind),
                (x + 6, y + 6),
                ("sans-serif", 14).into_font(),
            ))?;
            let time = stage
                .seconds
                .map(|seconds| format!(" · {}", format::seconds(seconds)))
                .unwrap_or_default();
            root.draw(&Text::new(
                format!("{}{time} · cache {}", stage.status, stage.cache),
                (x + 6, y + 26),
                ("sans-serif", 12).into_font(),
            ))?;
        }
        root.present()?;
        Ok(())
    })();
    if let Err(error) = drawn {
        return svg_error("stage graph", error);
    }
    format!(
        "<figure class=\"chart dag\" data-points=\"{}\">{svg}<figcaption>stage graph \
         (blue: ran, green: fresh from the cache, red: failed, grey: other)</figcaption></figure>\n",
        stages.len()
    )
}

fn evaluation_section(input: &ReportInput) -> String {
    let mut html = String::new();
    for (stage, metrics) in &input.evaluations {
        let _ = writeln!(
            html,
            "<h2 id=\"evaluate-{0}\">Evaluation: {0}</h2>",
            escape(stage)
        );
        html.push_str(&stale_note(input, stage));
        let split = metrics.get("split").and_then(|v| v.as_str()).unwrap_or("?");
        let rows = metrics.get("rows").and_then(|v| v.as_u64()).unwrap_or(0);
        let _ = writeln!(
            html,
            "<p>Split <code>{}</code>, {} rows.</p>",
            escape(split),
            format::count(rows)
        );
        if let Some(comparison) = metrics.get("comparison") {
            html.push_str(&comparison_table(comparison));
            if metrics.get("adapted").is_none() {
                // No single base-vs-adapted pair: the comparison and the samples are the
                // whole story.
                html.push_str(&samples_table(metrics));
                continue;
            }
        }
        // Models compared: base and adapted (or whatever model objects the file holds).
        let models: Vec<&str> = ["base", "adapted"]
            .into_iter()
            .filter(|name| metrics.get(*name).is_some_and(|v| v.is_object()))
            .collect();
        let figures: Vec<(&str, Vec<Option<f64>>)> =
            ["accuracy", "exact_match", "loss", "perplexity"]
                .into_iter()
                .map(|figure| {
                    let values = models
                        .iter()
                        .map(|model| headline(&metrics[*model], figure))
                        .collect::<Vec<_>>();
                    (figure, values)
                })
                .filter(|(_, values)| values.iter().any(Option::is_some))
                .collect();
        html.push_str("<table>\n<tr><th>metric</th>");
        for model in &models {
            let _ = write!(html, "<th>{model}</th>");
        }
        html.push_str("<th>change</th></tr>\n");
        for (figure, values) in &figures {
            let _ = write!(html, "<tr><td>{figure}</td>");
            for value in values {
                let _ = write!(
                    html,
                    "<td class=\"num\">{}</td>",
                    value.map(format::number).unwrap_or_else(|| "-".into())
                );
            }
            let change = match (
                values.first().copied().flatten(),
                values.last().copied().flatten(),
            ) {
                (Some(before), Some(after)) if values.len() > 1 => format!(
                    "{} {}",
                    format::signed(after - before),
                    format::percent_change(before, after)
                ),
                _ => "-".into(),
            };
            let _ = writeln!(
                html,
                "<td class=\"num\">{}</td></tr>",
                escape(change.trim())
            );
        }
        html.push_str("</table>\n");
        for (figure, values) in &figures {
            let bars: Vec<(String, f64)> = models
                .iter()
                .zip(values)
                .filter_map(|(model, value)| value.map(|value| (model.to_string(), value)))
                .collect();
            if !bars.is_empty() {
                html.push_str(&bar_chart(figure, &bars));
            }
        }
        html.push_str(&samples_table(metrics));
    }
    html
}

/// The sample generations of metrics.json: `prompt`, `reference` and `base`/`adapted` per row,
/// or (an evaluate stage without one `model`) `outputs` by model name, base first.
fn samples_table(metrics: &serde_json::Value) -> String {
    let Some(samples) = metrics
        .get("samples")
        .and_then(|v| v.as_array())
        .filter(|samples| !samples.is_empty())
    else {
        return String::new();
    };
    let models: Vec<String> = match samples[0].get("outputs").and_then(|v| v.as_object()) {
        Some(outputs) => {
            let mut names: Vec<String> = outputs.keys().cloned().collect();
            names.sort_by_key(|name| name != "base");
            names
        }
        None => vec!["base".into(), "adapted".into()],
    };
    let mut html = String::from("<h3>Samples</h3>\n<table>\n<tr><th>prompt</th><th>reference</th>");
    for model in &models {
        let _ = write!(html, "<th>{}</th>", escape(model));
    }
    html.push_str("</tr>\n");
    for sample in samples {
        let text = |value: Option<&serde_json::Value>| {
            escape(value.and_then(|v| v.as_str()).unwrap_or(""))
        };
        let _ = write!(
            html,
            "<tr><td><pre>{}</pre></td><td><pre>{}</pre></td>",
            text(sample.get("prompt")),
            text(sample.get("reference"))
        );
        for model in &models {
            let value = match sample.get("outputs") {
                Some(outputs) => outputs.get(model),
                None => sample.get(model),
            };
            let _ = write!(html, "<td><pre>{}</pre></td>", text(value));
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</table>\n");
    html
}

/// The evaluate stage's comparison.json (with the train stages' recorded train time, tokens/s and
/// peak memory joined in): one row per candidate, and a bar chart per figure.
fn comparison_table(comparison: &serde_json::Value) -> String {
    let parsed: Result<crate::stages::comparison::Comparison, _> =
        serde_json::from_value(comparison.clone());
    let comparison = match parsed {
        Ok(comparison) => comparison,
        Err(error) => {
            return format!(
                "<p class=\"note\">comparison.json cannot be read: {}</p>\n",
                escape(&error.to_string())
            )
        }
    };
    let mut html = String::from("<h3>Comparison</h3>\n<table class=\"comparison\">\n");
    for (index, line) in crate::stages::comparison::table(&comparison)
        .iter()
        .enumerate()
    {
        html.push_str("<tr>");
        for (column, cell) in line.iter().enumerate() {
            let tag = if index == 0 { "th" } else { "td" };
            let class = if index > 0 && column >= 2 {
                " class=\"num\""
            } else {
                ""
            };
            let _ = write!(html, "<{tag}{class}>{}</{tag}>", escape(cell));
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</table>\n");
    let trained = comparison.candidates.iter().any(|row| {
        row.train_seconds.is_some()
            || row.tokens_per_second.is_some()
            || row.peak_memory_bytes.is_some()
    });
    if trained {
        html.push_str(
            "<p class=\"note\">Train time, tokens/s and peak memory: as recorded by the run of \
             each train stage that produced its adapter (the stage table above says whether that \
             was this run); they vary between runs, so comparison.json does not hold them.</p>\n",
        );
    }
    type Pick = fn(&crate::stages::comparison::ComparisonRow) -> Option<f64>;
    let figures: [(&str, Pick); 3] = [
        ("perplexity", |row| row.perplexity),
        ("accuracy", |row| row.accuracy),
        ("exact_match", |row| row.exact_match),
    ];
    for (figure, pick) in figures {
        let bars: Vec<(String, f64)> = comparison
            .candidates
            .iter()
            .filter_map(|row| pick(row).map(|value| (row.candidate.clone(), value)))
            .collect();
        if !bars.is_empty() {
            html.push_str(&bar_chart(figure, &bars));
        }
    }
    html
}

/// A headline figure of one model's metrics (`accuracy` may be an object with `accuracy`).
fn headline(model: &serde_json::Value, figure: &str) -> Option<f64> {
    let value = model.get(figure)?;
    value
        .as_f64()
        .or_else(|| value.get(figure).and_then(serde_json::Value::as_f64))
}

fn environment_section(input: &ReportInput) -> String {
    let mut html = String::from("<h2 id=\"environment\">Environment</h2>\n<table>\n");
    for (name, value) in &input.environment {
        let _ = writeln!(
            html,
            "<tr><th>{}</th><td><code>{}</code></td></tr>",
            escape(name),
            escape(value)
        );
    }
    for stage in &input.stages {
        if let Some(fingerprint) = &stage.fingerprint {
            let _ = writeln!(
                html,
                "<tr><th>fingerprint of {}</th><td><code>{}</code></td></tr>",
                escape(&stage.name),
                escape(fingerprint)
            );
        }
    }
    html.push_str("</table>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_starts_at_the_first_value() {
        let points = smooth(&[(1.0, 10.0), (2.0, 0.0)], 0.9);
        assert!((points[0].1 - 10.0).abs() < 1e-12);
        assert!(points[1].1 < 10.0 && points[1].1 > 0.0);
    }

    #[test]
    fn escaping() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn the_eval_loss_of_a_train_stage_joins_the_loss_chart() {
        // metrics.jsonl lines as the train stage writes them with `eval_steps: 2`.
        let lines = [
            serde_json::json!({"step": 1, "loss": 2.0, "lr": 0.01, "grad_norm": 1.0}),
            serde_json::json!({"step": 2, "loss": 1.5, "lr": 0.01, "grad_norm": 0.8,
                "eval_loss": 1.7, "eval_perplexity": 5.47, "eval_scored_tokens": 12}),
        ];
        let steps: Vec<StepRow> = lines.iter().filter_map(StepRow::from_json).collect();
        assert_eq!(steps[1].eval_loss, Some(1.7));
        let input = ReportInput {
            trains: vec![TrainCurves {
                stage: "train".into(),
                steps,
            }],
            ..ReportInput::default()
        };
        let html = training_section(&input);
        // Loss: 2 raw + 2 smoothed + 1 evaluation.
        let loss_chart = html.split("<figure").nth(1).unwrap_or_default();
        assert!(loss_chart.contains("data-points=\"5\""), "{loss_chart}");
        assert!(loss_chart.contains("eval loss"), "{loss_chart}");
    }

    #[test]
    fn charts_draw_their_points() {
        let chart = line_chart(
            "Loss",
            &[("loss", vec![(1.0, 70.0), (2.0, 3.0), (3.0, 0.01)])],
        );
        assert!(chart.contains("data-points=\"3\""), "{chart}");
        assert!(chart.contains("<polyline"), "{chart}");
        assert!(chart.contains("(log scale)"));
        let bars = bar_chart(
            "accuracy",
            &[("base".into(), 0.5), ("adapted".into(), 0.98)],
        );
        assert!(bars.contains("data-points=\"2\""), "{bars}");
        assert!(bars.matches("<rect").count() >= 3, "{bars}");
    }
}
