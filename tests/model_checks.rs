//! `peftpipe validate` on broken model folders (issue 7, items 10, 14 and 15): every way a model
//! directory can be broken that used to validate and then fail in training (or exhaust memory)
//! exits 2 with a message naming the file at fault and the cause. Each case copies the quickstart
//! model into a temp dir and breaks one thing; the safetensors file is rewritten byte by byte so
//! the corruption is exactly the one named.
//!
//! Cases that once made validation allocate gigabytes (`num_hidden_layers: 10^7`, `lora.r:
//! 100000`) run under an address-space limit, so a regression fails instead of swapping.

#![expect(clippy::print_stderr, reason = "tests print skip reasons")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

fn quickstart_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/quickstart/model")
}

/// One tensor of a safetensors file: name, dtype, shape and raw bytes.
#[derive(Clone)]
struct RawTensor {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn read_tensors(path: &Path) -> Vec<RawTensor> {
    let data = std::fs::read(path).unwrap();
    let length = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&data[8..8 + length]).unwrap();
    let body = &data[8 + length..];
    let mut tensors: Vec<RawTensor> = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .map(|(name, entry)| {
            let offsets: Vec<usize> =
                serde_json::from_value(entry["data_offsets"].clone()).unwrap();
            RawTensor {
                name: name.clone(),
                dtype: entry["dtype"].as_str().unwrap().to_string(),
                shape: serde_json::from_value(entry["shape"].clone()).unwrap(),
                bytes: body[offsets[0]..offsets[1]].to_vec(),
            }
        })
        .collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    tensors
}

/// A valid safetensors file of `tensors`, stored back to back in order.
fn safetensors_bytes(tensors: &[RawTensor]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for tensor in tensors {
        header.insert(
            tensor.name.clone(),
            json!({"dtype": tensor.dtype, "shape": tensor.shape,
                "data_offsets": [offset, offset + tensor.bytes.len()]}),
        );
        offset += tensor.bytes.len();
    }
    let header = serde_json::to_vec(&Value::Object(header)).unwrap();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header);
    for tensor in tensors {
        bytes.extend(&tensor.bytes);
    }
    bytes
}

/// A project in a temp dir: a CSV, a pipeline training on `model/` (a copy of the quickstart
/// model), with `train_extra` added to the train stage's mapping.
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new(train_extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        std::fs::create_dir(&model).unwrap();
        for entry in std::fs::read_dir(quickstart_model()).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
        }
        std::fs::write(
            dir.path().join("rows.csv"),
            "text,label\ngreat phone,positive\nbad phone,negative\nfine phone,positive\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("pipeline.yaml"),
            format!(
                "stages:\n  data:\n    ingest: {{path: rows.csv}}\n  prompts:\n    template: {{input: data, prompt: 'review: {{{{ text }}}}', completion: ' {{{{ label }}}}'}}\n  train:\n    train: {{data: prompts, model: model, max_steps: 4{train_extra}}}\n"
            ),
        )
        .unwrap();
        Project { dir }
    }

    fn model(&self, file: &str) -> PathBuf {
        self.dir.path().join("model").join(file)
    }

    fn edit_json(&self, file: &str, edit: impl FnOnce(&mut Value)) {
        let path = self.model(file);
        let mut value: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut value);
        std::fs::write(&path, serde_json::to_string_pretty(&value).unwrap()).unwrap();
    }

    fn edit_tensors(&self, edit: impl FnOnce(&mut Vec<RawTensor>)) {
        let path = self.model("model.safetensors");
        let mut tensors = read_tensors(&path);
        edit(&mut tensors);
        std::fs::write(&path, safetensors_bytes(&tensors)).unwrap();
    }

    fn edit_bytes(&self, file: &str, edit: impl FnOnce(&mut Vec<u8>)) {
        let path = self.model(file);
        let mut bytes = std::fs::read(&path).unwrap();
        edit(&mut bytes);
        std::fs::write(&path, bytes).unwrap();
    }

    /// `peftpipe validate pipeline.yaml`, under an address-space limit of `limit_mb` when given.
    fn validate(&self, limit_mb: Option<u64>) -> Output {
        let binary = env!("CARGO_BIN_EXE_peftpipe");
        let mut command = match limit_mb {
            Some(limit) => {
                let mut command = Command::new("sh");
                command.args([
                    "-c",
                    &format!(
                        "ulimit -v {} && exec \"$0\" validate pipeline.yaml",
                        limit * 1024
                    ),
                    binary,
                ]);
                command
            }
            None => {
                let mut command = Command::new(binary);
                command.args(["validate", "pipeline.yaml"]);
                command
            }
        };
        command
            .current_dir(self.dir.path())
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    }
}

fn tensor<'a>(tensors: &'a mut [RawTensor], name: &str) -> &'a mut RawTensor {
    tensors.iter_mut().find(|t| t.name == name).unwrap()
}

type Break = fn(&Project);

/// (case, train-stage extras, how to break the model, what stderr must contain).
const CASES: &[(&str, &str, Break, &[&str])] = &[
    (
        "missing tensor",
        "",
        |p| p.edit_tensors(|t| t.retain(|t| t.name != "model.layers.1.mlp.up_proj.weight")),
        &["model.safetensors", "tensor `model.layers.1.mlp.up_proj.weight` (shape [172, 64]) is missing"],
    ),
    (
        "wrong shape",
        "",
        |p| {
            p.edit_tensors(|t| {
                let q = tensor(t, "model.layers.0.self_attn.q_proj.weight");
                q.shape = vec![32, 64];
                q.bytes.truncate(32 * 64 * 4);
            })
        },
        &["model.safetensors", "tensor `model.layers.0.self_attn.q_proj.weight` has shape [32, 64], but config.json implies [64, 64]"],
    ),
    (
        "integer dtype",
        "",
        |p| p.edit_tensors(|t| tensor(t, "model.norm.weight").dtype = "I32".into()),
        &["model.safetensors", "tensor `model.norm.weight` is stored as I32; model weights must be floats"],
    ),
    (
        "truncated weights file",
        "",
        |p| p.edit_bytes("model.safetensors", |b| b.truncate(b.len() / 2)),
        &["model.safetensors: invalid safetensors file", "run past the end of the data", "the file is truncated"],
    ),
    (
        "header length past the end of the file",
        "",
        |p| p.edit_bytes("model.safetensors", |b| b[..8].copy_from_slice(&1_000_000u64.to_le_bytes())),
        &["model.safetensors: invalid safetensors file: the header length 1000000 runs past the end of the 411120-byte file"],
    ),
    (
        "file shorter than the header length field",
        "",
        |p| p.edit_bytes("model.safetensors", |b| b.truncate(5)),
        &["model.safetensors: invalid safetensors file: the file is 5 bytes, shorter than the 8-byte header length"],
    ),
    (
        "trailing bytes after the tensors",
        "",
        |p| p.edit_bytes("model.safetensors", |b| b.extend([0u8; 16])),
        &["model.safetensors: invalid safetensors file", "trailing bytes"],
    ),
    (
        "offsets disagree with the shape",
        "",
        |p| {
            p.edit_tensors(|t| {
                tensor(t, "model.norm.weight").shape = vec![65];
            })
        },
        &["model.safetensors: invalid safetensors file: tensor `model.norm.weight`: shape [65] of F32 needs 260 bytes but data_offsets"],
    ),
    (
        "header offsets overflow",
        "",
        |p| {
            p.edit_bytes("model.safetensors", |b| {
                let header = br#"{"x":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,8]}}"#;
                let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
                bytes.extend_from_slice(header);
                bytes.extend([0u8; 8]);
                *b = bytes;
            })
        },
        &["model.safetensors: invalid safetensors file: tensor `x`: shape [4611686018427387904, 8] of F32 needs more than 2^64 bytes"],
    ),
    (
        "tokenizer ids past vocab_size",
        "",
        |p| {
            p.edit_json("tokenizer.json", |t| t["model"]["vocab"]["phablet"] = json!(1130))
        },
        &["tokenizer.json: produces id 1130 (token \"phablet\") ≥ config.json vocab_size 177"],
    ),
    (
        "BOS id past vocab_size",
        "",
        |p| p.edit_json("config.json", |c| c["bos_token_id"] = json!(999)),
        &["config.json: bos_token_id 999 ≥ config.json vocab_size 177"],
    ),
    (
        "EOS token not in the vocabulary",
        "",
        |p| p.edit_json("tokenizer_config.json", |c| c["eos_token"] = json!("</nope>")),
        &["tokenizer_config.json: eos_token `</nope>` is not in the vocabulary"],
    ),
    (
        "BOS wanted but the tokenizer has none",
        "",
        |p| {
            p.edit_json("config.json", |c| {
                c.as_object_mut().unwrap().remove("bos_token_id");
            });
            p.edit_json("tokenizer_config.json", |c| c["bos_token"] = json!("<nobos>"));
        },
        &["tokenizer_config.json: add_bos_token is set but the tokenizer has no bos_token"],
    ),
    (
        "no tokenizer.json",
        "",
        |p| std::fs::remove_file(p.model("tokenizer.json")).unwrap(),
        &["tokenizer.json: not found"],
    ),
    (
        "config.json missing a field",
        "",
        |p| {
            p.edit_json("config.json", |c| {
                c.as_object_mut().unwrap().remove("hidden_size");
            })
        },
        &["config.json: key `hidden_size`: missing"],
    ),
    (
        "negative size",
        "",
        |p| p.edit_json("config.json", |c| c["intermediate_size"] = json!(-1)),
        &["config.json: key `intermediate_size`: expected a non-negative integer, found -1"],
    ),
    (
        "absurd size",
        "",
        |p| p.edit_json("config.json", |c| c["hidden_size"] = json!(1_000_000_000_000u64)),
        &["config.json: key `hidden_size`: 1000000000000 is implausibly large"],
    ),
    (
        "layer count far past the stored layers",
        "",
        |p| p.edit_json("config.json", |c| c["num_hidden_layers"] = json!(4000)),
        &["config.json: key `num_hidden_layers`: 4000 layers, but model.safetensors stores 2 decoder layers (model.layers.0 to model.layers.1)"],
    ),
    (
        "layer count past any real model",
        "",
        |p| p.edit_json("config.json", |c| c["num_hidden_layers"] = json!(10_000_000)),
        &["config.json: key `num_hidden_layers`: 10000000 layers is implausibly many (at most 4096)"],
    ),
    (
        "size that disagrees with the stored tensors",
        "",
        |p| p.edit_json("config.json", |c| c["vocab_size"] = json!(5000)),
        &["model.safetensors: tensor `model.embed_tokens.weight` has shape [177, 64], but config.json implies [5000, 64]"],
    ),
    (
        "negative rms_norm_eps",
        "",
        |p| p.edit_json("config.json", |c| c["rms_norm_eps"] = json!(-1)),
        &["config.json: key `rms_norm_eps`: must be a positive number, found -1"],
    ),
    (
        "odd head_dim",
        "",
        |p| p.edit_json("config.json", |c| c["head_dim"] = json!(15)),
        &["config.json: key `head_dim`: 15 is odd"],
    ),
    (
        "misspelled target module",
        ", method: {lora: {target_modules: [q_prj, v_proj]}}",
        |_| {},
        &["stages.train.train.method.lora.target_modules[0]", "target module `q_prj` matches no linear layer; did you mean `q_proj`?"],
    ),
    (
        "rank larger than the targeted layers",
        ", method: {lora: {r: 100000, target_modules: all-linear}}",
        |_| {},
        &["stages.train.train.method.lora.r", "100000 exceeds the rank of the targeted layer model.layers.0.self_attn.k_proj (64 → 32 features): r must be at most 32"],
    ),
    (
        "negative alpha",
        ", method: {lora: {alpha: -16}}",
        |_| {},
        &["stages.train.train.method.lora.alpha", "must be positive"],
    ),
    (
        "warmup as long as training",
        ", warmup_steps: 4",
        |_| {},
        &["stages.train.train.warmup_steps", "4 warmup steps leave none of the 4 max_steps"],
    ),
    (
        "add_eos without an EOS token",
        "",
        |p| {
            p.edit_json("config.json", |c| {
                c.as_object_mut().unwrap().remove("eos_token_id");
            });
            p.edit_json("tokenizer_config.json", |c| {
                c.as_object_mut().unwrap().remove("eos_token");
            });
        },
        &["stages.train.train.add_eos", "declares no EOS token"],
    ),
];

#[test]
fn the_intact_model_validates() {
    let project = Project::new("");
    let output = project.validate(None);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn every_broken_model_folder_is_refused_naming_the_file_and_the_cause() {
    let mut failures = Vec::new();
    for (case, extra, break_it, expected) in CASES {
        let project = Project::new(extra);
        break_it(&project);
        // 2 GiB of address space: far above what validating a 400 KB model needs, far below
        // what `num_hidden_layers: 10^7` or `r: 100000` used to allocate.
        let output = project.validate(Some(2048));
        let stderr = String::from_utf8_lossy(&output.stderr);
        let missing: Vec<&&str> = expected.iter().filter(|e| !stderr.contains(**e)).collect();
        if output.status.code() != Some(2) || !missing.is_empty() || stderr.contains("panicked") {
            failures.push(format!(
                "{case}: exit {:?}, missing {missing:?} in:\n{stderr}",
                output.status.code()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn an_over_long_stage_name_is_refused() {
    let project = Project::new("");
    let long = "s".repeat(300);
    let path = project.dir.path().join("pipeline.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("  data:\n", &format!("  {long}:\n"))
        .replace("input: data", &format!("input: {long}"));
    std::fs::write(&path, text).unwrap();
    let output = project.validate(None);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("is 300 characters long; at most 64 are allowed"),
        "{stderr}"
    );
}

/// Real checkpoints (GPT-2's Conv1D layout and tensor names, a pre-trained Llama) pass the checks.
#[test]
fn shared_reference_models_are_described_without_problems() {
    use peftpipe::config::Probe;
    let Some(shared) = std::env::var_os("PEFTPIPE_SHARED") else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return;
    };
    for name in ["stories260k", "tiny-gpt2-random"] {
        let facts = peftpipe::probe::StandardProbe
            .check_model(&Path::new(&shared).join("models").join(name));
        assert_eq!(facts.problems, Vec::<String>::new(), "{name}");
        assert!(
            facts.linear_layers.is_some_and(|layers| !layers.is_empty()),
            "{name}"
        );
    }
}
