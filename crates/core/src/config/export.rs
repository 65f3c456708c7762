//! Config of the `export` stage kind and its semantic checks: which trained adapter to export and
//! where the PEFT adapter folder, the merged model folder (16-bit, or re-quantized in
//! bitsandbytes' 4-bit format) and/or the merged model as one GGUF file are published. Pure data
//! plus checks: whether a destination may leave the project directory depends on the `run` flag
//! `--allow-outside-project`, so that part is enforced when publishing (stages/export.rs), while
//! everything knowable from the file alone is checked here.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::evaluate::check_upstream_kind;
use super::method::{block_size_problem, FourBitSettings};
use super::{CheckContext, InputFile, Problem, StageConfig, StageKind, StageSpec, UpstreamRef};

/// The `export` stage: the trained adapter as a PEFT folder and/or a merged model in Hugging Face
/// layout, built in the artifact and published (copied atomically) to the declared folders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// Upstream `train` stage whose adapter is exported.
    pub from: String,
    /// Folder for the PEFT adapter (adapter_config.json, adapter_model.safetensors, README.md),
    /// relative to the pipeline's directory. Replaced as a whole on each publish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    /// Folder for the merged model in Hugging Face layout (config.json, model.safetensors in the
    /// base model's dtype, tokenizer files, generation_config.json), relative to the pipeline's
    /// directory. Replaced as a whole on each publish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged: Option<String>,
    /// Largest weight file of the merged model, e.g. `5GB` (the default, as transformers'
    /// `save_pretrained`), `500MB`, `2GiB`, `64KB` or `1000B` (GB/MB/KB are powers of 10,
    /// GiB/MiB/KiB of 2). A bigger model is written as `model-0000k-of-0000n.safetensors` with a
    /// `model.safetensors.index.json`; a smaller one as one `model.safetensors`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_shard_size: Option<String>,
    /// dtype of the merged model's floating-point weights: `f32`, `bf16` or `f16` (config.json's
    /// `torch_dtype` follows). Default: the base checkpoint's dtype, tensor by tensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<ExportDtype>,
    /// Write the merged model re-quantized in bitsandbytes' saved 4-bit format, as transformers'
    /// `save_pretrained` writes a model loaded with `BitsAndBytesConfig(load_in_4bit=True)`: the
    /// decoder blocks' linear weights quantized from the merged 16-bit weights (those the plain
    /// merged export writes, in `dtype`), norms, embeddings and `lm_head` left in 16 bits, and
    /// `quantization_config` in config.json. `{}` takes QLoRA's settings (nf4, double
    /// quantization, blocks of 64). The merged weights are quantized a second time, so the
    /// adapter's change survives only to 4-bit resolution: for a faithful model export the 16-bit
    /// merged model, or the adapter (over the original 4-bit base for QLoRA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize: Option<FourBitSettings>,
    /// What the published adapter's `adapter_config.json` and model card name as the base model
    /// (`base_model_name_or_path`), verbatim, e.g. a Hub id `org/name` the model was uploaded as.
    /// Default: the Hub id for an `hf://org/name` model, else the base model folder as resolved
    /// for this checkout when publishing (never the path of the checkout that trained it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model_name_or_path: Option<String>,
    /// File for the merged model in llama.cpp's GGUF format (llama.cpp tensor names, model and
    /// tokenizer metadata), relative to the pipeline's directory, e.g. `out/model.gguf`. Replaced
    /// atomically on each publish. Llama-family models only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gguf: Option<String>,
    /// Weight type of the GGUF file's matrices: `f16` (the default, as llama.cpp's converter),
    /// `q8_0` or `q4_k`. Norms and other 1-D tensors stay f32; a matrix whose rows are not a
    /// multiple of the type's block (32 for q8_0, 256 for q4_k) falls back as llama.cpp's
    /// quantizer does (q4_k → q5_0 → f16; q8_0 → f16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gguf_type: Option<GgufType>,
}

impl ExportConfig {
    /// The destinations that hold a merged model (`merged`, `gguf`), as their keys.
    fn merged_destinations(&self) -> Vec<&'static str> {
        [
            ("merged", self.merged.is_some()),
            ("gguf", self.gguf.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect()
    }

    /// The declared destinations: (artifact subfolder `adapter`/`merged`, destination as written).
    pub fn destinations(&self) -> Vec<(&'static str, &str)> {
        let mut out = Vec::new();
        if let Some(adapter) = &self.adapter {
            out.push(("adapter", adapter.as_str()));
        }
        if let Some(merged) = &self.merged {
            out.push(("merged", merged.as_str()));
        }
        if let Some(gguf) = &self.gguf {
            out.push(("gguf", gguf.as_str()));
        }
        out
    }
}

/// The weight type of a GGUF export's matrices (llama.cpp's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum GgufType {
    /// 16-bit floats: lossless for f16/bf16 bases up to f16 rounding.
    #[default]
    #[serde(rename = "f16")]
    F16,
    /// 8-bit blocks of 32 with one f16 scale (8.5 bits per weight).
    #[serde(rename = "q8_0")]
    Q8_0,
    /// 4-bit k-quant super-blocks of 256 (4.5 bits per weight).
    #[serde(rename = "q4_k")]
    Q4K,
}

impl GgufType {
    /// The name as written in the pipeline and in llama.cpp (`f16`, `q8_0`, `q4_k`).
    pub fn name(self) -> &'static str {
        match self {
            GgufType::F16 => "f16",
            GgufType::Q8_0 => "q8_0",
            GgufType::Q4K => "q4_k",
        }
    }
}

/// The file name a GGUF destination must end with.
pub const GGUF_EXTENSION: &str = ".gguf";

/// A floating-point dtype to export the merged model in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExportDtype {
    F32,
    Bf16,
    F16,
}

impl ExportDtype {
    /// The name transformers writes as `torch_dtype`.
    pub fn torch_name(self) -> &'static str {
        match self {
            ExportDtype::F32 => "float32",
            ExportDtype::Bf16 => "bfloat16",
            ExportDtype::F16 => "float16",
        }
    }
}

/// The default `max_shard_size` (transformers' `save_pretrained` default).
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 5_000_000_000;

/// Parse a size as transformers' `convert_file_size_to_int` does: `5GB` = 5·10⁹, `2GiB` = 2·2³⁰,
/// also MB/MiB, KB/KiB and plain bytes (`1000B` or `1000`).
pub fn parse_size(written: &str) -> Result<u64, String> {
    let text = written.trim();
    let units: [(&str, u64); 7] = [
        ("GIB", 1 << 30),
        ("MIB", 1 << 20),
        ("KIB", 1 << 10),
        ("GB", 1_000_000_000),
        ("MB", 1_000_000),
        ("KB", 1_000),
        ("B", 1),
    ];
    let upper = text.to_ascii_uppercase();
    let (number, factor) = units
        .iter()
        .find_map(|(unit, factor)| upper.strip_suffix(unit).map(|n| (n.trim(), *factor)))
        .unwrap_or((upper.as_str(), 1));
    let bad =
        || format!("`{written}` is not a size (write e.g. `5GB`, `500MB`, `2GiB` or `1000B`)");
    let value: f64 = number.parse().map_err(|_| bad())?;
    if !value.is_finite() || value <= 0.0 {
        return Err(bad());
    }
    let bytes = value * factor as f64;
    if bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// Why a destination as written is not acceptable inside the project (None: it is fine).
/// `..` components and absolute paths leave the project directory.
pub fn escape_reason(written: &str) -> Option<String> {
    let path = Path::new(written);
    if path.is_absolute() || written.starts_with('~') {
        return Some(format!("`{written}` is an absolute path"));
    }
    for component in path.components() {
        match component {
            Component::ParentDir => return Some(format!("`{written}` goes up with `..`")),
            Component::Prefix(_) | Component::RootDir => {
                return Some(format!("`{written}` is an absolute path"))
            }
            Component::CurDir | Component::Normal(_) => {}
        }
    }
    if path.components().all(|c| matches!(c, Component::CurDir)) {
        return Some(format!("`{written}` is the project directory itself"));
    }
    None
}

impl StageSpec for ExportConfig {
    fn upstream(&self) -> Vec<UpstreamRef> {
        vec![UpstreamRef {
            key: "from",
            stage: self.from.clone(),
        }]
    }

    fn input_files(&self, _project_dir: &Path) -> Result<Vec<InputFile>, String> {
        // The adapter and the base model come through the upstream train artifact.
        Ok(Vec::new())
    }

    fn output_columns(&self, _cx: &CheckContext<'_>, _stage: &str) -> Option<Vec<String>> {
        None
    }

    fn published_paths(&self, project_dir: &Path) -> Result<Vec<PathBuf>, String> {
        self.destinations()
            .into_iter()
            .map(|(_, written)| {
                let expanded = super::expand_env(written)?;
                Ok(if Path::new(&expanded).is_absolute() {
                    PathBuf::from(expanded)
                } else {
                    project_dir.join(expanded)
                })
            })
            .collect()
    }

    fn check(&self, cx: &CheckContext<'_>, at: &str, problems: &mut Vec<Problem>) {
        self.check_export(cx, at, problems);
    }

    fn publish_context(&self, pipeline: &super::Pipeline) -> BTreeMap<String, String> {
        let Some(StageConfig::Train(train)) = pipeline.stages.get(&self.from) else {
            return BTreeMap::new();
        };
        if self.adapter.is_none() {
            return BTreeMap::new();
        }
        BTreeMap::from([(
            "base_model_name_or_path".to_string(),
            self.published_base_name(&pipeline.project_dir, &train.model),
        )])
    }
}

impl ExportConfig {
    /// `base_model_name_or_path` in a published adapter, decided when publishing (never
    /// cached): the user's setting, the Hub id of a Hub model, else the base model folder
    /// `model` (as written in the train stage) resolved for this checkout, canonical, falling
    /// back to the model as written when it is not on this machine.
    pub fn published_base_name(&self, project_dir: &Path, model: &str) -> String {
        if let Some(name) = &self.base_model_name_or_path {
            return name.clone();
        }
        if let Some(id) = super::hub::repo_id_of(model) {
            return id;
        }
        super::resolve_path(project_dir, model)
            .ok()
            .filter(|path| path.join("config.json").is_file())
            .map(|path| path.canonicalize().unwrap_or(path))
            .map_or_else(|| model.to_string(), |path| path.display().to_string())
    }

    fn check_export(&self, cx: &CheckContext<'_>, at: &str, problems: &mut Vec<Problem>) {
        check_upstream_kind(
            cx,
            &self.from,
            StageKind::Train,
            format!("{at}.from"),
            problems,
        );
        // Methods that add virtual tokens, prefixes or gated attention have no weight update to
        // merge: refused here, before training, rather than by the export after it.
        if let Some(StageConfig::Train(train)) = cx.pipeline.stages.get(&self.from) {
            if !train.method.has_weight_update() {
                let method = train.method.name();
                for key in self.merged_destinations() {
                    problems.push(
                        Problem::new(
                            format!("{at}.{key}"),
                            format!(
                                "stage `{}` trains {method}, which adds to the model's inputs or attention instead of changing its weights: there is nothing to merge into a `{key}` model",
                                self.from
                            ),
                        )
                        .with_hint("export `adapter: DIR` only (PEFT loads it over the base)"),
                    );
                }
            }
        }
        if let (Some(StageConfig::Train(train)), Some(_)) =
            (cx.pipeline.stages.get(&self.from), &self.gguf)
        {
            if let (true, Ok(dir)) = (
                train.method.has_weight_update(),
                super::hub::resolve_model_dir(cx.project_dir, &train.model),
            ) {
                if let Some(reason) = cx.probe.gguf_problem(&dir) {
                    problems.push(
                        Problem::new(format!("{at}.gguf"), reason)
                            .about_value()
                            .with_hint("export `merged: DIR` and convert it with llama.cpp's convert_hf_to_gguf.py"),
                    );
                }
            }
        }
        if self.adapter.is_none() && self.merged.is_none() && self.gguf.is_none() {
            problems.push(Problem::new(at.to_string(), "nothing to export").with_hint(
                "add `adapter: DIR` (PEFT adapter), `merged: DIR` (merged model) and/or \
                 `gguf: FILE.gguf` (merged model for llama.cpp)",
            ));
        }
        if self.gguf.is_none() && self.gguf_type.is_some() {
            problems.push(
                Problem::new(
                    at.to_string(),
                    "`gguf_type` applies to the GGUF file, but there is no `gguf` destination",
                )
                .with_hint("add `gguf: out/model.gguf`, or drop it"),
            );
        }
        if let Some(name) = &self.base_model_name_or_path {
            if name.trim().is_empty() {
                problems.push(
                    Problem::new(format!("{at}.base_model_name_or_path"), "is empty")
                        .about_value()
                        .with_hint("leave it out to name the base model the pipeline trained on"),
                );
            }
            if self.adapter.is_none() {
                problems.push(
                    Problem::new(
                        at.to_string(),
                        "`base_model_name_or_path` applies to the adapter, but there is no `adapter` destination",
                    )
                    .with_hint("add `adapter: DIR`, or drop it"),
                );
            }
        }
        if let Some(size) = &self.max_shard_size {
            if let Err(message) = parse_size(size) {
                problems.push(Problem::new(format!("{at}.max_shard_size"), message));
            }
        }
        if self.merged.is_none() && (self.max_shard_size.is_some() || self.dtype.is_some()) {
            problems.push(
                Problem::new(
                    at.to_string(),
                    "`max_shard_size` and `dtype` apply to the merged model, but there is no `merged` destination",
                )
                .with_hint("add `merged: DIR`, or drop them"),
            );
        }
        if let Some(quantize) = &self.quantize {
            if self.merged.is_none() {
                problems.push(
                    Problem::new(
                        at.to_string(),
                        "`quantize` applies to the merged model, but there is no `merged` destination",
                    )
                    .with_hint("add `merged: DIR`, or drop it"),
                );
            }
            if let Some(message) = block_size_problem(quantize.block_size) {
                problems
                    .push(Problem::new(format!("{at}.quantize.block_size"), message).about_value());
            }
            // The 4-bit writer takes Llama-family models (as the loader reads no GPT-2 in 4 bits).
            if let Some(StageConfig::Train(train)) = cx.pipeline.stages.get(&self.from) {
                if cx.model_type(&train.model).as_deref() == Some("gpt2") {
                    problems.push(
                        Problem::new(
                            format!("{at}.quantize"),
                            format!(
                                "stage `{}` trains `{}`, a gpt2 model: a merged model in bitsandbytes 4-bit is written for Llama-family models only",
                                self.from, train.model
                            ),
                        )
                        .with_hint("drop `quantize` to export the 16-bit merged model"),
                    );
                }
            }
        }
        let mut expanded = Vec::new();
        for (key, value) in [
            ("adapter", &self.adapter),
            ("merged", &self.merged),
            ("gguf", &self.gguf),
        ] {
            let Some(written) = value else { continue };
            let path = format!("{at}.{key}");
            if written.trim().is_empty() {
                problems.push(Problem::new(path, "the destination is empty").about_value());
                continue;
            }
            match super::expand_env(written) {
                Ok(text) => {
                    if Path::new(&text)
                        .components()
                        .all(|c| c == Component::CurDir)
                    {
                        // Publishing replaces the destination as a whole: never the project.
                        problems.push(
                            Problem::new(
                                path,
                                format!("`{written}` is the project directory itself"),
                            )
                            .about_value(),
                        );
                        continue;
                    }
                    if key == "gguf" && !text.to_ascii_lowercase().ends_with(GGUF_EXTENSION) {
                        problems.push(
                            Problem::new(path, format!("`{written}` is not a `.gguf` file name"))
                                .about_value()
                                .with_hint("`gguf` names the file to write, e.g. `out/model.gguf`"),
                        );
                        continue;
                    }
                    expanded.push((key, path, text));
                }
                Err(message) => problems.push(Problem::new(path, message).about_value()),
            }
        }
        for (index, (first_key, _, first)) in expanded.iter().enumerate() {
            for (second_key, second_path, second) in &expanded[index + 1..] {
                let first = Path::new(first);
                let second = Path::new(second);
                if first.starts_with(second) || second.starts_with(first) {
                    problems.push(
                        Problem::new(
                            second_path.clone(),
                            format!(
                                "the {first_key} and {second_key} destinations overlap: \
                                 publishing one would replace the other"
                            ),
                        )
                        .about_value()
                        .with_hint(
                            "use separate places, e.g. `out/adapter`, `out/merged` and \
                             `out/model.gguf`",
                        ),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::{RawPipeline, StageConfig};

    fn problems_of(export: &str) -> Vec<Problem> {
        problems_with_method("lora: {}", export)
    }

    /// The problems of export stage `out` (`export`) from train stage `tune` (`method`).
    fn problems_with_method(method: &str, export: &str) -> Vec<Problem> {
        let text = format!(
            "
stages:
  data: {{ ingest: {{ path: x.parquet }} }}
  prompts: {{ template: {{ input: data }} }}
  tune: {{ train: {{ data: prompts, model: base-model, method: {{ {method} }} }} }}
  out: {{ export: {export} }}
"
        );
        let raw: RawPipeline = crate::config::evaluate::tests::from_yaml(&text).unwrap();
        let columns = BTreeMap::new();
        let cx = CheckContext {
            pipeline: &raw,
            project_dir: Path::new("."),
            columns: &columns,
            probe: &crate::config::probe::TestProbe,
        };
        let StageConfig::Export(config) = &raw.stages["out"] else {
            panic!("not an export stage");
        };
        let mut problems = Vec::new();
        config.check(&cx, "stages.out.export", &mut problems);
        problems
    }

    #[test]
    fn a_valid_export_has_no_problems() {
        assert!(problems_of("{ from: tune, adapter: out/adapter, merged: out/merged }").is_empty());
        assert!(problems_of("{ from: tune, merged: merged }").is_empty());
    }

    #[test]
    fn at_least_one_destination_is_required() {
        let problems = problems_of("{ from: tune }");
        assert_eq!(problems.len(), 1);
        assert!(problems[0].message.contains("nothing to export"));
    }

    #[test]
    fn the_project_directory_itself_is_refused() {
        let problems = problems_of("{ from: tune, adapter: . }");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "stages.out.export.adapter");
    }

    #[test]
    fn overlapping_destinations_are_refused() {
        let problems = problems_of("{ from: tune, adapter: out, merged: out/merged }");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].message.contains("overlap"));
    }

    #[test]
    fn from_must_be_a_train_stage() {
        let problems = problems_of("{ from: prompts, adapter: a }");
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].path, "stages.out.export.from");
    }

    #[test]
    fn shard_size_and_dtype_are_checked() {
        assert!(
            problems_of("{ from: tune, merged: m, max_shard_size: 2GiB, dtype: bf16 }").is_empty()
        );
        let problems = problems_of("{ from: tune, merged: m, max_shard_size: lots }");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "stages.out.export.max_shard_size");
        let problems = problems_of("{ from: tune, adapter: a, dtype: f16 }");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].message.contains("no `merged` destination"));
    }

    #[test]
    fn a_gguf_destination_is_checked() {
        assert!(problems_of("{ from: tune, gguf: out/model.gguf }").is_empty());
        assert!(problems_of("{ from: tune, gguf: m.GGUF, gguf_type: q4_k }").is_empty());
        assert!(problems_of(
            "{ from: tune, adapter: out/a, merged: out/m, gguf: out/m.gguf, gguf_type: q8_0 }"
        )
        .is_empty());
        let problems = problems_of("{ from: tune, gguf: out/model.bin }");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "stages.out.export.gguf");
        assert!(problems[0].message.contains("not a `.gguf` file name"));
        let problems = problems_of("{ from: tune, merged: m, gguf_type: f16 }");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].message.contains("no `gguf` destination"));
        // A GGUF file inside the merged folder would be replaced by the folder's publish.
        let problems = problems_of("{ from: tune, merged: out, gguf: out/model.gguf }");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "stages.out.export.gguf");
        assert!(problems[0]
            .message
            .contains("merged and gguf destinations overlap"));
    }

    #[test]
    fn a_prompt_method_has_nothing_to_merge() {
        let problems = problems_with_method(
            "prompt_tuning: {}",
            "{ from: tune, adapter: a, merged: m, gguf: m.gguf }",
        );
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            ["stages.out.export.merged", "stages.out.export.gguf"],
            "{problems:?}"
        );
        assert!(
            problems[0].message.contains("prompt_tuning"),
            "{problems:?}"
        );
        // LoRA (the default method) merges.
        assert!(problems_of("{ from: tune, merged: m }").is_empty());
    }

    #[test]
    fn quantize_settings_are_checked() {
        assert!(problems_of("{ from: tune, merged: m, quantize: {} }").is_empty());
        assert!(problems_of(
            "{ from: tune, merged: m, dtype: bf16, quantize: { quant_type: fp4, double_quant: false, \
             block_size: 4096, compute_dtype: bf16 } }"
        )
        .is_empty());
        let problems = problems_of("{ from: tune, merged: m, quantize: { block_size: 32 } }");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "stages.out.export.quantize.block_size");
        assert!(
            problems[0].message.contains("from 64 to 4096"),
            "{problems:?}"
        );
        let problems = problems_of("{ from: tune, adapter: a, gguf: m.gguf, quantize: {} }");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "stages.out.export");
        assert!(problems[0].message.contains("no `merged` destination"));
        // Defaults are QLoRA's, and a written default hashes like an omitted one.
        let parsed: FourBitSettings = serde_json::from_str("{}").unwrap();
        assert_eq!(parsed, FourBitSettings::default());
        assert_eq!(
            serde_json::to_value(&parsed).unwrap(),
            serde_json::json!({"quant_type": "nf4", "double_quant": true, "block_size": 64})
        );
    }

    #[test]
    fn gguf_types_use_llama_cpp_names() {
        for (written, expected) in [
            ("f16", GgufType::F16),
            ("q8_0", GgufType::Q8_0),
            ("q4_k", GgufType::Q4K),
        ] {
            let parsed: GgufType = serde_json::from_value(written.into()).unwrap();
            assert_eq!(parsed, expected);
            assert_eq!(parsed.name(), written);
        }
        assert!(serde_json::from_value::<GgufType>("q4_0".into()).is_err());
        assert_eq!(GgufType::default(), GgufType::F16);
    }

    #[test]
    fn base_model_name_needs_an_adapter_and_a_value() {
        assert!(
            problems_of("{ from: tune, adapter: a, base_model_name_or_path: org/tiny }").is_empty()
        );
        let problems = problems_of("{ from: tune, merged: m, base_model_name_or_path: org/x }");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].message.contains("no `adapter` destination"));
        let problems = problems_of("{ from: tune, adapter: a, base_model_name_or_path: ' ' }");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            problems[0].path,
            "stages.out.export.base_model_name_or_path"
        );
    }

    #[test]
    fn published_paths_resolve_against_the_project() {
        let StageConfig::Export(config) =
            crate::config::evaluate::tests::from_yaml::<BTreeMap<String, StageConfig>>(
                "out: { export: { from: tune, adapter: out/a, merged: /abs/m } }",
            )
            .unwrap()
            .remove("out")
            .unwrap()
        else {
            panic!("not an export stage");
        };
        assert_eq!(
            config.published_paths(Path::new("/project")).unwrap(),
            [PathBuf::from("/project/out/a"), PathBuf::from("/abs/m")]
        );
    }

    #[test]
    fn sizes_parse_like_transformers() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("500mb"), Ok(500_000_000));
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
        assert_eq!(parse_size("1000B"), Ok(1000));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "GB", "-1GB", "0", "five", "1TB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn escape_reasons() {
        assert_eq!(escape_reason("out/adapter"), None);
        assert_eq!(escape_reason("./out"), None);
        assert!(escape_reason("../elsewhere").unwrap().contains(".."));
        assert!(escape_reason("out/../../x").unwrap().contains(".."));
        assert!(escape_reason("/tmp/x").unwrap().contains("absolute"));
        assert!(escape_reason("~/x").unwrap().contains("absolute"));
        assert!(escape_reason(".").unwrap().contains("project directory"));
    }
}
