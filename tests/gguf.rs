//! GGUF export (`export: {gguf: FILE, gguf_type: f16 | q8_0 | q4_k}`): the file written from
//! stories260k + PEFT's reference LoRA loads in candle-transformers' quantized Llama (the GGML
//! reader, llama.cpp's tensor names and interleaved RoPE) and decodes as the unquantized merged
//! model does: the same greedy tokens for f16, logits within a stated tolerance for q8_0, q4_k's
//! deviation measured (on stories260k and on a seeded model whose rows are multiples of q4_k's
//! 256-block); its metadata and vocabulary are what llama.cpp reads (checked against the
//! SentencePiece `tokenizer.model`); writing and publishing are atomic; a bad `gguf_type` is a
//! validation error. Needs `PEFTPIPE_SHARED` for the model tests (skips with a printed reason).
#![expect(
    clippy::print_stderr,
    reason = "tests print skip reasons and the measured deviations"
)]

mod support;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use candle_core::quantized::gguf_file::{self, Value as GgufValue};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use peftpipe::config::export::GgufType;
use peftpipe::config::ExportConfig;
use peftpipe::models::generate::{greedy, GreedyOptions};
use peftpipe::models::gguf::write_gguf;
use peftpipe::models::{CausalLm, FrozenLinearFactory, Hooks, ModelDir};
use peftpipe::stages::export::ExportStage;
use peftpipe::stages::{NullSink, RunOptions, Stage, StageContext};
use support::{shared_dir, TestResult};

/// Prompts (stories260k's vocabulary) and how many tokens each decodes.
const PROMPTS: &[&str] = &["Once upon a time", "The little dog", "Lily and Tom went to"];
const NEW_TOKENS: usize = 24;

/// Max |logit difference| allowed for q8_0 against the merged f32 model, relative to the largest
/// |logit| of the merged model (measured: see the test's printed values). candle's GGML matmul,
/// like llama.cpp's, also quantizes the activations to 8 bits for q8_0 weights.
const Q8_0_RELATIVE_TOLERANCE: f32 = 0.03;

/// A train artifact as the train stage writes it: `adapter/` + `base_model.json`.
fn fake_train_artifact(root: &Path, adapter_source: &Path, base: &Path) -> PathBuf {
    let train = root.join("train-artifact");
    std::fs::create_dir_all(train.join("adapter")).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(adapter_source.join(file), train.join("adapter").join(file)).unwrap();
    }
    let record = serde_json::json!({"model": base.display().to_string(), "path": base.display().to_string()});
    std::fs::write(train.join("base_model.json"), record.to_string()).unwrap();
    train
}

fn export_config(merged: Option<&str>, gguf: &str, gguf_type: Option<GgufType>) -> ExportConfig {
    ExportConfig {
        from: "tune".into(),
        adapter: None,
        merged: merged.map(str::to_string),
        max_shard_size: None,
        dtype: None,
        base_model_name_or_path: None,
        gguf: Some(gguf.to_string()),
        gguf_type,
        quantize: None,
    }
}

/// Run the export stage (run + publish) in `project` with the given train artifact.
fn export(
    project: &Path,
    train: &Path,
    config: ExportConfig,
) -> Result<PathBuf, peftpipe::stages::StageError> {
    let out_dir = project.join(".artifact");
    std::fs::create_dir_all(&out_dir)?;
    let upstream = BTreeMap::from([("tune".to_string(), train.to_path_buf())]);
    let cancel = AtomicBool::new(false);
    let options = RunOptions::default();
    let ctx = StageContext {
        name: "export",
        project_dir: project,
        out_dir: &out_dir,
        upstream: &upstream,
        upstream_outcomes: &Default::default(),
        inputs: &Default::default(),
        seed: 0,
        progress: &NullSink,
        cancel: &cancel,
        options: &options,
        fingerprint: "",
        checkpoint_dir: None,
        resume: true,
    };
    let stage = ExportStage::new(config);
    stage.run(&ctx)?;
    stage.publish(&out_dir, &ctx)?;
    Ok(out_dir)
}

/// stories260k + PEFT's reference LoRA exported as `out/merged` and `out/model.gguf`
/// (`gguf_type`), in a fresh project. None (with a printed reason) without PEFTPIPE_SHARED.
struct Exported {
    project: tempfile::TempDir,
    base: PathBuf,
}

impl Exported {
    fn new(gguf_type: Option<GgufType>) -> Result<Option<Self>, Box<dyn std::error::Error>> {
        let Some(shared) = shared_dir() else {
            eprintln!("skipped: PEFTPIPE_SHARED not set");
            return Ok(None);
        };
        let base = shared.join("models/stories260k");
        let reference = base.join("reference/peft_lora");
        let project = tempfile::tempdir()?;
        let train = fake_train_artifact(project.path(), &reference, &base);
        export(
            project.path(),
            &train,
            export_config(Some("out/merged"), "out/model.gguf", gguf_type),
        )?;
        Ok(Some(Exported { project, base }))
    }

    fn gguf(&self) -> PathBuf {
        self.project.path().join("out/model.gguf")
    }

    fn merged(&self) -> PathBuf {
        self.project.path().join("out/merged")
    }
}

fn read_content(path: &Path) -> Result<gguf_file::Content, Box<dyn std::error::Error>> {
    let mut file = File::open(path)?;
    Ok(gguf_file::Content::read(&mut file)?)
}

fn load_gguf(path: &Path) -> Result<ModelWeights, Box<dyn std::error::Error>> {
    let mut file = File::open(path)?;
    let content = gguf_file::Content::read(&mut file)?;
    Ok(ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?)
}

fn encode_prompts(model_dir: &Path) -> Result<Vec<Vec<u32>>, Box<dyn std::error::Error>> {
    let tokenizer = ModelDir::open(model_dir)?.tokenizer()?;
    PROMPTS
        .iter()
        .map(|prompt| Ok(tokenizer.encode(prompt, true)?))
        .collect()
}

/// Greedy decoding with the GGUF model (one token at a time through its KV cache).
fn gguf_greedy(
    model: &mut ModelWeights,
    prompt: &[u32],
    count: usize,
) -> Result<Vec<u32>, Box<dyn std::error::Error>> {
    let mut tokens = Vec::new();
    let mut logits = model.forward(&Tensor::new(prompt, &Device::Cpu)?.unsqueeze(0)?, 0)?;
    for position in prompt.len()..prompt.len() + count {
        let next = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
        tokens.push(next);
        logits = model.forward(&Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?, position)?;
    }
    model.clear_kv_cache();
    Ok(tokens)
}

/// Logits `[T, vocab]` of the GGUF model at every position of `tokens` (fed one at a time).
fn gguf_logits(model: &mut ModelWeights, tokens: &[u32]) -> candle_core::Result<Tensor> {
    let mut rows = Vec::new();
    for (position, token) in tokens.iter().enumerate() {
        let input = Tensor::new(&[*token], &Device::Cpu)?.unsqueeze(0)?;
        rows.push(model.forward(&input, position)?.squeeze(0)?);
    }
    model.clear_kv_cache();
    Tensor::stack(&rows, 0)
}

/// Logits `[T, vocab]` of our (unquantized) model at every position of `tokens`.
fn reference_logits(model: &dyn CausalLm, tokens: &[u32]) -> candle_core::Result<Tensor> {
    let input = Tensor::new(tokens, &Device::Cpu)?.unsqueeze(0)?;
    model
        .forward(&input, None, &Hooks::none())?
        .i(0)?
        .to_dtype(DType::F32)
}

fn max_abs(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// Max |logit difference| between the GGUF file and the merged model over every prompt position,
/// absolute and relative to the merged model's largest |logit|.
fn logit_deviation(exported: &Exported) -> Result<(f32, f32), Box<dyn std::error::Error>> {
    let merged =
        ModelDir::open(&exported.merged())?.load(&Device::Cpu, DType::F32, &FrozenLinearFactory)?;
    let mut gguf = load_gguf(&exported.gguf())?;
    let (mut worst, mut scale) = (0f32, 0f32);
    for prompt in encode_prompts(&exported.base)? {
        let expected = reference_logits(merged.as_ref(), &prompt)?;
        let actual = gguf_logits(&mut gguf, &prompt)?;
        worst = worst.max(max_abs(&expected, &actual)?);
        scale = scale.max(expected.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?);
    }
    Ok((worst, worst / scale))
}

#[test]
fn f16_gguf_decodes_the_merged_models_greedy_tokens() -> TestResult {
    let Some(exported) = Exported::new(None)? else {
        return Ok(());
    };
    let merged =
        ModelDir::open(&exported.merged())?.load(&Device::Cpu, DType::F32, &FrozenLinearFactory)?;
    let prompts = encode_prompts(&exported.base)?;
    let options = GreedyOptions {
        max_new_tokens: NEW_TOKENS,
        stop_token_ids: Vec::new(),
        use_cache: true,
        pad_token_id: 0,
    };
    let expected = greedy(merged.as_ref(), &prompts, &Hooks::none(), &options)?;
    let mut gguf = load_gguf(&exported.gguf())?;
    for (prompt, expected) in prompts.iter().zip(&expected) {
        let actual = gguf_greedy(&mut gguf, prompt, NEW_TOKENS)?;
        assert_eq!(actual, expected.tokens, "prompt {prompt:?}");
    }
    // The adapter is in the file: its logits are the merged model's, not the base model's.
    let base =
        ModelDir::open(&exported.base)?.load(&Device::Cpu, DType::F32, &FrozenLinearFactory)?;
    let prompt = &prompts[0];
    let gguf_logits = gguf_logits(&mut gguf, prompt)?;
    let to_merged = max_abs(&gguf_logits, &reference_logits(merged.as_ref(), prompt)?)?;
    let to_base = max_abs(&gguf_logits, &reference_logits(base.as_ref(), prompt)?)?;
    eprintln!(
        "f16 GGUF: {} prompts × {NEW_TOKENS} greedy tokens equal; max |Δlogit| vs merged = \
         {to_merged:.2e}, vs base = {to_base:.2e}",
        prompts.len()
    );
    assert!(to_merged < 0.02, "f16 logits off by {to_merged}");
    assert!(to_base > 10.0 * to_merged, "the LoRA is not in the file");
    Ok(())
}

#[test]
fn q8_0_gguf_logits_stay_within_tolerance_and_q4_k_is_measured() -> TestResult {
    let Some(q8) = Exported::new(Some(GgufType::Q8_0))? else {
        return Ok(());
    };
    let q8_deviation = logit_deviation(&q8)?;
    let content = read_content(&q8.gguf())?;
    let types = tensor_types(&content);
    // stories260k's rows are 64 wide (q8_0 blocks of 32 fit) except ffn_down's 172 (f16).
    assert_eq!(types["blk.0.attn_q.weight"], GgmlDType::Q8_0);
    assert_eq!(types["token_embd.weight"], GgmlDType::Q8_0);
    assert_eq!(types["blk.0.ffn_down.weight"], GgmlDType::F16);
    assert_eq!(types["blk.0.attn_norm.weight"], GgmlDType::F32);

    let Some(q4) = Exported::new(Some(GgufType::Q4K))? else {
        return Ok(());
    };
    let q4_deviation = logit_deviation(&q4)?;
    let types = tensor_types(&read_content(&q4.gguf())?);
    // No stories260k row is a multiple of 256: q4_k falls back as llama.cpp does.
    assert_eq!(types["blk.0.attn_q.weight"], GgmlDType::Q5_0);
    assert_eq!(types["blk.0.ffn_down.weight"], GgmlDType::F16);
    let ((q8_absolute, q8_deviation), (q4_absolute, q4_deviation)) = (q8_deviation, q4_deviation);
    eprintln!(
        "stories260k + LoRA, max |Δlogit| vs the merged f32 model (absolute, relative to max \
         |logit|): q8_0 = {q8_absolute:.3e}, {q8_deviation:.3e} (tolerance \
         {Q8_0_RELATIVE_TOLERANCE}); q4_k (q5_0/f16 fallbacks) = {q4_absolute:.3e}, \
         {q4_deviation:.3e}"
    );
    assert!(
        q8_deviation <= Q8_0_RELATIVE_TOLERANCE,
        "q8_0 relative deviation {q8_deviation}"
    );
    assert!(q8_deviation > 0.0, "q8_0 changed nothing: not quantized?");
    assert!(
        q4_deviation > q8_deviation,
        "q4_k ({q4_deviation}) should deviate more than q8_0 ({q8_deviation})"
    );
    Ok(())
}

fn tensor_types(content: &gguf_file::Content) -> BTreeMap<String, GgmlDType> {
    content
        .tensor_infos
        .iter()
        .map(|(name, info)| (name.clone(), info.ggml_dtype))
        .collect()
}

/// A seeded Llama whose rows are multiples of 256 (so q4_k applies to every matrix) and whose head
/// is untied (q6_k output), with stories260k's tokenizer, written as a model folder.
fn wide_model(root: &Path, shared: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let json = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 512, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2
    });
    let config = peftpipe::models::ModelConfig::from_json(&json)
        .map_err(|error| format!("the wide config is invalid: {error:?}"))?;
    let weights = support::llama_weights(&config, 7, 0.08);
    let dir = root.join("wide");
    support::write_model_dir(&dir, &json, &weights)?;
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(shared.join("models/stories260k").join(file), dir.join(file))?;
    }
    Ok(dir)
}

#[test]
fn q4_k_applies_to_block_aligned_rows_with_a_measured_deviation() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let root = tempfile::tempdir()?;
    let dir = wide_model(root.path(), &shared)?;
    let model = ModelDir::open(&dir)?.load(&Device::Cpu, DType::F32, &FrozenLinearFactory)?;
    let prompt = encode_prompts(&dir)?.remove(2);
    let expected = reference_logits(model.as_ref(), &prompt)?;
    let scale = expected.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let mut deviations = Vec::new();
    for dtype in [GgmlDType::F16, GgmlDType::Q8_0, GgmlDType::Q4K] {
        let out = root.path().join(format!("wide-{dtype:?}.gguf"));
        let written = write_gguf(&[], &dir, &out, dtype, "wide", &|| false)?;
        assert!(written.fallbacks.is_empty(), "{:?}", written.fallbacks);
        let types = tensor_types(&read_content(&out)?);
        let expected_type = |name: &str| match (dtype, name) {
            (_, n) if n.ends_with("norm.weight") => GgmlDType::F32,
            (GgmlDType::Q4K, "output.weight") => GgmlDType::Q6K,
            _ => dtype,
        };
        for (name, ggml) in &types {
            assert_eq!(*ggml, expected_type(name), "{name} in the {dtype:?} file");
        }
        let actual = gguf_logits(&mut load_gguf(&out)?, &prompt)?;
        deviations.push((dtype, max_abs(&expected, &actual)? / scale));
    }
    eprintln!("seeded 256-wide Llama, max |Δlogit| / max |logit|: {deviations:?}");
    let [(_, f16), (_, q8), (_, q4)] = deviations[..] else {
        unreachable!("three types were written")
    };
    assert!(f16 < 5e-3, "f16 relative deviation {f16}");
    assert!(q8 < Q8_0_RELATIVE_TOLERANCE, "q8_0 relative deviation {q8}");
    assert!(q4 < 0.3, "q4_k relative deviation {q4}");
    assert!(
        f16 < q8 && q8 < q4,
        "expected f16 < q8_0 < q4_k: {deviations:?}"
    );
    Ok(())
}

/// One SentencePiece piece: (piece, score, type).
type Piece = (String, f32, i32);

/// SentencePiece's `tokenizer.model` pieces: (piece, score, type), type 1 (normal) when absent.
fn sentencepiece_pieces(path: &Path) -> Result<Vec<Piece>, Box<dyn std::error::Error>> {
    fn varint(bytes: &[u8], at: &mut usize) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *bytes.get(*at).ok_or("truncated varint")?;
            *at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err("varint too long".into())
    }
    fn fields(bytes: &[u8]) -> Result<Vec<(u64, Vec<u8>, u64)>, String> {
        // (field number, bytes for length-delimited / fixed32, varint value)
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let key = varint(bytes, &mut at)?;
            match key & 7 {
                0 => out.push((key >> 3, Vec::new(), varint(bytes, &mut at)?)),
                1 => at += 8,
                2 => {
                    let length = varint(bytes, &mut at)? as usize;
                    out.push((key >> 3, bytes[at..at + length].to_vec(), 0));
                    at += length;
                }
                5 => {
                    out.push((key >> 3, bytes[at..at + 4].to_vec(), 0));
                    at += 4;
                }
                other => return Err(format!("wire type {other}")),
            }
        }
        Ok(out)
    }
    let bytes = std::fs::read(path)?;
    let mut pieces = Vec::new();
    for (field, data, _) in fields(&bytes)? {
        if field != 1 {
            continue;
        }
        let (mut piece, mut score, mut kind) = (String::new(), 0f32, 1i32);
        for (inner, data, value) in fields(&data)? {
            match inner {
                1 => piece = String::from_utf8(data)?,
                2 => score = f32::from_le_bytes([data[0], data[1], data[2], data[3]]),
                3 => kind = value as i32,
                _ => {}
            }
        }
        pieces.push((piece, score, kind));
    }
    Ok(pieces)
}

#[test]
fn gguf_metadata_is_what_llama_cpp_reads() -> TestResult {
    let Some(exported) = Exported::new(Some(GgufType::F16))? else {
        return Ok(());
    };
    let content = read_content(&exported.gguf())?;
    let meta = &content.metadata;
    let u32_of = |key: &str| meta.get(key).map(|v| v.to_u32()).transpose();
    let f32_of = |key: &str| meta.get(key).map(|v| v.to_f32()).transpose();
    let text = |key: &str| meta.get(key).map(|v| v.to_string().cloned()).transpose();
    assert_eq!(text("general.architecture")?.as_deref(), Some("llama"));
    assert_eq!(text("general.name")?.as_deref(), Some("stories260k"));
    assert_eq!(u32_of("general.file_type")?, Some(1));
    for (key, value) in [
        ("llama.context_length", 512),
        ("llama.embedding_length", 64),
        ("llama.block_count", 5),
        ("llama.feed_forward_length", 172),
        ("llama.rope.dimension_count", 8),
        ("llama.attention.head_count", 8),
        ("llama.attention.head_count_kv", 4),
        ("llama.attention.key_length", 8),
        ("llama.attention.value_length", 8),
        ("llama.vocab_size", 512),
        ("tokenizer.ggml.bos_token_id", 1),
        ("tokenizer.ggml.eos_token_id", 2),
        ("tokenizer.ggml.unknown_token_id", 0),
    ] {
        assert_eq!(u32_of(key)?, Some(value), "{key}");
    }
    assert!(!meta.contains_key("tokenizer.ggml.padding_token_id"));
    assert_eq!(
        f32_of("llama.attention.layer_norm_rms_epsilon")?,
        Some(1e-5)
    );
    assert_eq!(f32_of("llama.rope.freq_base")?, Some(10000.0));
    assert_eq!(text("tokenizer.ggml.model")?.as_deref(), Some("llama"));

    // The vocabulary is SentencePiece's: every piece, score and type as tokenizer.model has it.
    let array = |key: &str| -> Result<Vec<GgufValue>, Box<dyn std::error::Error>> {
        Ok(meta.get(key).ok_or(format!("no {key}"))?.to_vec()?.clone())
    };
    let tokens = array("tokenizer.ggml.tokens")?;
    let scores = array("tokenizer.ggml.scores")?;
    let types = array("tokenizer.ggml.token_type")?;
    let pieces = sentencepiece_pieces(&exported.base.join("tokenizer.model"))?;
    assert_eq!(pieces.len(), 512);
    assert_eq!((tokens.len(), scores.len(), types.len()), (512, 512, 512));
    for (id, (piece, score, kind)) in pieces.iter().enumerate() {
        assert_eq!(tokens[id].to_string()?, piece, "token {id}");
        assert_eq!(scores[id].to_f32()?, *score, "score of {id} `{piece}`");
        assert_eq!(types[id].to_i32()?, *kind, "type of {id} `{piece}`");
    }

    // llama.cpp's tensor names, every one present; 2-D f16, 1-D f32; tied head: no output.weight.
    let names = tensor_types(&content);
    let mut expected: Vec<String> = vec!["token_embd.weight".into(), "output_norm.weight".into()];
    for layer in 0..5 {
        for module in [
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
            "attn_norm",
            "ffn_norm",
        ] {
            expected.push(format!("blk.{layer}.{module}.weight"));
        }
    }
    expected.sort();
    assert_eq!(names.keys().cloned().collect::<Vec<_>>(), expected);
    for (name, info) in &content.tensor_infos {
        let expected = if info.shape.rank() == 1 {
            GgmlDType::F32
        } else {
            GgmlDType::F16
        };
        assert_eq!(info.ggml_dtype, expected, "{name}");
    }
    Ok(())
}

#[test]
fn a_failed_gguf_write_leaves_no_file_and_publish_refuses_foreign_files() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let base = shared.join("models/stories260k");
    let root = tempfile::tempdir()?;
    let out = root.path().join("model.gguf");
    // Cancelled after a few tensors: an error, no file, no temporary left.
    let calls = std::cell::Cell::new(0);
    let cancelled = || {
        calls.set(calls.get() + 1);
        calls.get() > 5
    };
    let error = write_gguf(&[], &base, &out, GgmlDType::Q8_0, "x", &cancelled).unwrap_err();
    assert!(error.to_string().contains("cancelled"), "{error}");
    let left: Vec<_> = std::fs::read_dir(root.path())?.collect::<Result<_, _>>()?;
    assert!(left.is_empty(), "left behind: {left:?}");
    // An earlier file at the destination survives a failed write untouched.
    std::fs::write(&out, b"earlier")?;
    write_gguf(&[], &base, &out, GgmlDType::Q8_0, "x", &|| true).unwrap_err();
    assert_eq!(std::fs::read(&out)?, b"earlier");
    assert_eq!(std::fs::read_dir(root.path())?.count(), 1);
    // A successful write replaces it.
    write_gguf(&[], &base, &out, GgmlDType::F16, "x", &|| false)?;
    assert!(read_content(&out)?
        .metadata
        .contains_key("peftpipe.version"));

    // Publishing never replaces a file peftpipe did not write; it replaces its own.
    let source = out;
    let foreign = root.path().join("project/mine.gguf");
    std::fs::create_dir_all(foreign.parent().unwrap_or(root.path()))?;
    std::fs::write(&foreign, b"my own model")?;
    let error = peftpipe::stages::export::publish_gguf(&source, &foreign).unwrap_err();
    assert!(
        error.to_string().contains("not a GGUF file written by"),
        "{error}"
    );
    assert_eq!(std::fs::read(&foreign)?, b"my own model");
    let ours = root.path().join("project/out/model.gguf");
    peftpipe::stages::export::publish_gguf(&source, &ours)?;
    peftpipe::stages::export::publish_gguf(&source, &ours)?;
    assert_eq!(std::fs::read(&ours)?, std::fs::read(&source)?);
    let siblings: Vec<_> = std::fs::read_dir(root.path().join("project/out"))?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    assert_eq!(siblings, ["model.gguf"]);
    Ok(())
}

#[test]
fn gpt2_gguf_export_is_refused_with_the_reason() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let root = tempfile::tempdir()?;
    let out = root.path().join("gpt2.gguf");
    let error = write_gguf(
        &[],
        &shared.join("models/tiny-gpt2-random"),
        &out,
        GgmlDType::F16,
        "gpt2",
        &|| false,
    )
    .unwrap_err();
    assert!(error.to_string().contains("GPT-2"), "{error}");
    assert!(!out.exists());
    Ok(())
}

/// A pipeline with an export stage `export` (YAML flow mapping), validated by the binary.
fn validate_export(export: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(dir.path().join("rows.csv"), "text,label\na,b\n").expect("a data file");
    let pipeline = format!(
        "stages:\n  data: {{ ingest: {{ path: rows.csv }} }}\n  prompts: {{ template: {{ input: data, \
         prompt: '{{{{ text }}}}', completion: '{{{{ label }}}}' }} }}\n  tune: {{ train: {{ data: \
         prompts, model: base-model, method: {{ lora: {{ r: 2 }} }} }} }}\n  out: {{ export: {export} }}\n"
    );
    std::fs::write(dir.path().join("pipeline.yaml"), pipeline).expect("a pipeline");
    let output = support::peftpipe()
        .args(["validate", "pipeline.yaml"])
        .current_dir(dir.path())
        .env("NO_COLOR", "1")
        .output()
        .expect("peftpipe runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_bad_gguf_type_is_a_validation_error() {
    let (code, stderr) = validate_export("{ from: tune, gguf: out/model.gguf, gguf_type: q4 }");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("stages.out.export.gguf_type: unknown value `q4`"),
        "{stderr}"
    );
    assert!(stderr.contains("did you mean `q4_k`?"), "{stderr}");
    let (code, stderr) = validate_export("{ from: tune, gguf: out/model.bin }");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("not a `.gguf` file name"), "{stderr}");
    let (code, stderr) = validate_export("{ from: tune, merged: out/m, gguf_type: q8_0 }");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("no `gguf` destination"), "{stderr}");
}

/// tests/python/check_gguf.py reads the file with the `gguf` Python package (llama.cpp's own
/// reader) when `PEFTPIPE_GGUF_PYTHON` (default `python3`) can import it; skipped otherwise.
#[test]
fn the_gguf_python_package_reads_the_export() -> TestResult {
    let python = std::env::var("PEFTPIPE_GGUF_PYTHON").unwrap_or_else(|_| "python3".into());
    let importable = std::process::Command::new(&python)
        .args(["-c", "import gguf"])
        .output()
        .is_ok_and(|output| output.status.success());
    if !importable {
        eprintln!(
            "skipped: `{python} -c 'import gguf'` fails (pip install gguf, or set \
             PEFTPIPE_GGUF_PYTHON to a Python that has it)"
        );
        return Ok(());
    }
    let Some(exported) = Exported::new(Some(GgufType::Q8_0))? else {
        return Ok(());
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/check_gguf.py");
    let output = std::process::Command::new(&python)
        .arg(script)
        .arg(exported.gguf())
        .args(["--base", &exported.base.display().to_string()])
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(
        output.status.success(),
        "check_gguf.py failed:\n{stdout}{stderr}"
    );
    assert!(stdout.contains("ok:"), "{stdout}");
    Ok(())
}

/// `peftpipe` in `dir` with `args`: (exit code, stdout and stderr).
fn run_in(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let output = support::peftpipe()
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env_remove("PEFTPIPE_CACHE_DIR")
        .output()
        .expect("peftpipe runs");
    (
        output.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[test]
fn a_published_gguf_file_is_tracked_like_a_published_folder() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let project = tempfile::tempdir()?;
    let dir = project.path();
    std::fs::write(
        dir.join("rows.csv"),
        "text\nOnce upon a time there was a cat.\nThe dog ran to the park.\nLily had a red ball.\n\
         Tom and Sue went home.\n",
    )?;
    let model = shared.join("models/stories260k");
    std::fs::write(
        dir.join("pipeline.yaml"),
        format!(
            "name: gguf-fresh\nseed: 1\nstages:\n  data: {{ ingest: {{ path: rows.csv, split: {{ counts: {{ eval: 1 }} }} }} }}\n  \
             prompts: {{ template: {{ input: data, prompt: '', completion: '{{{{ text }}}}' }} }}\n  \
             train: {{ train: {{ data: prompts, model: '{}', method: {{ lora: {{ r: 2, alpha: 4, \
             target_modules: all-linear }} }}, max_steps: 2, batch_size: 2 }} }}\n  \
             out: {{ export: {{ from: train, gguf: out/model.gguf, gguf_type: q8_0 }} }}\n",
            model.display()
        ),
    )?;
    let (code, stderr) = run_in(dir, &["run", "pipeline.yaml"]);
    assert_eq!(code, Some(0), "{stderr}");
    let published = dir.join("out/model.gguf");
    let first = std::fs::read(&published)?;
    let content = read_content(&published)?;
    assert_eq!(
        tensor_types(&content)["blk.0.attn_q.weight"],
        GgmlDType::Q8_0
    );

    // A rerun restores nothing and republishes nothing.
    let (code, stderr) = run_in(dir, &["run", "pipeline.yaml"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("0 ran, 4 fresh"), "{stderr}");
    // A changed file is stale, and the next run publishes it again from the cache.
    std::fs::write(&published, b"edited by hand")?;
    let (code, stderr) = run_in(dir, &["status", "pipeline.yaml"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("[DIRTY] out: published output out/model.gguf changed"),
        "{stderr}"
    );
    // The hand-edited file is not a GGUF file peftpipe wrote: publishing refuses to replace it.
    let (code, stderr) = run_in(dir, &["run", "pipeline.yaml"]);
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("not a GGUF file written by"), "{stderr}");
    assert_eq!(std::fs::read(&published)?, b"edited by hand");
    // Removed, it is published again (restored from the cache, not rebuilt).
    std::fs::remove_file(&published)?;
    let (code, stderr) = run_in(dir, &["run", "pipeline.yaml"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("0 ran"), "{stderr}");
    assert_eq!(std::fs::read(&published)?, first);
    Ok(())
}

/// stories260k's files copied into `dir` (so a test may add or edit tokenizer files).
fn stories_copy(dir: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let base = shared_dir().ok_or("PEFTPIPE_SHARED not set")?;
    let base = base.join("models/stories260k");
    let copy = dir.join("stories260k");
    std::fs::create_dir_all(&copy)?;
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(base.join(file), copy.join(file))?;
    }
    Ok(copy)
}

/// The chat template llama.cpp gets is the one the model's tokenizer renders (peftpipe's rule,
/// transformers'): a chat_template.jinja beside tokenizer_config.json wins; the named-list form
/// of `chat_template` gives the `default` one as `tokenizer.chat_template` and the others as
/// `tokenizer.chat_template.<name>` with their names in `tokenizer.chat_templates`, as
/// llama.cpp's gguf writer stores them.
#[test]
fn the_chat_template_is_the_one_the_tokenizer_renders() -> TestResult {
    if shared_dir().is_none() {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    }
    let root = tempfile::tempdir()?;
    let model = stories_copy(root.path())?;
    let config_path = model.join("tokenizer_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path)?)?;
    let text = |content: &gguf_file::Content, key: &str| {
        content
            .metadata
            .get(key)
            .map(|value| value.to_string().cloned())
            .transpose()
    };

    // transformers ≥ 4.47 saves the template as chat_template.jinja, not in the config.
    std::fs::write(
        model.join("chat_template.jinja"),
        "{{ messages }} from the file",
    )?;
    let out = root.path().join("a.gguf");
    write_gguf(&[], &model, &out, GgmlDType::F16, "x", &|| false)?;
    assert_eq!(
        text(&read_content(&out)?, "tokenizer.chat_template")?.as_deref(),
        Some("{{ messages }} from the file")
    );
    // The file wins over the config's own template, as in transformers.
    config["chat_template"] = serde_json::json!("from the config");
    std::fs::write(&config_path, config.to_string())?;
    write_gguf(&[], &model, &out, GgmlDType::F16, "x", &|| false)?;
    assert_eq!(
        text(&read_content(&out)?, "tokenizer.chat_template")?.as_deref(),
        Some("{{ messages }} from the file")
    );

    // The named-list form.
    std::fs::remove_file(model.join("chat_template.jinja"))?;
    config["chat_template"] = serde_json::json!([
        {"name": "default", "template": "the default"},
        {"name": "tool_use", "template": "with tools"},
    ]);
    std::fs::write(&config_path, config.to_string())?;
    write_gguf(&[], &model, &out, GgmlDType::F16, "x", &|| false)?;
    let content = read_content(&out)?;
    assert_eq!(
        text(&content, "tokenizer.chat_template")?.as_deref(),
        Some("the default")
    );
    assert_eq!(
        text(&content, "tokenizer.chat_template.tool_use")?.as_deref(),
        Some("with tools")
    );
    let names = content
        .metadata
        .get("tokenizer.chat_templates")
        .ok_or("no tokenizer.chat_templates")?
        .to_vec()?
        .iter()
        .map(|name| name.to_string().cloned())
        .collect::<Result<Vec<_>, _>>()?;
    assert_eq!(names, ["tool_use"]);
    Ok(())
}

/// llama.cpp adds BOS/EOS as `tokenizer.ggml.add_bos_token` / `add_eos_token` say, and adds BOS
/// to a `llama` vocabulary when the key is absent: the file says what peftpipe's tokenizer does
/// (tokenizer_config.json's flag, else what tokenizer.json's post-processor adds), so a model
/// trained without BOS is not run with one.
#[test]
fn bos_and_eos_flags_are_what_the_tokenizer_adds() -> TestResult {
    if shared_dir().is_none() {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    }
    let root = tempfile::tempdir()?;
    let model = stories_copy(root.path())?;
    let edit = |file: &str, change: &dyn Fn(&mut serde_json::Value)| -> TestResult {
        let path = model.join(file);
        let mut value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        change(&mut value);
        std::fs::write(&path, value.to_string())?;
        Ok(())
    };
    let flags = || -> Result<(Option<bool>, Option<bool>), Box<dyn std::error::Error>> {
        let out = root.path().join("model.gguf");
        write_gguf(&[], &model, &out, GgmlDType::F16, "x", &|| false)?;
        let content = read_content(&out)?;
        let flag = |key: &str| content.metadata.get(key).map(|v| v.to_bool()).transpose();
        Ok((
            flag("tokenizer.ggml.add_bos_token")?,
            flag("tokenizer.ggml.add_eos_token")?,
        ))
    };
    assert_eq!(flags()?, (Some(true), Some(false)));
    // No flags in tokenizer_config.json: the post-processor adds BOS.
    edit("tokenizer_config.json", &|config| {
        if let Some(map) = config.as_object_mut() {
            map.remove("add_bos_token");
            map.remove("add_eos_token");
        }
    })?;
    assert_eq!(flags()?, (Some(true), Some(false)));
    // ... and without a post-processor nothing is added.
    edit("tokenizer.json", &|tokenizer| {
        tokenizer["post_processor"] = serde_json::Value::Null;
    })?;
    assert_eq!(flags()?, (Some(false), Some(false)));
    Ok(())
}

/// llama.cpp puts a space before the text of a `llama` vocabulary unless
/// `tokenizer.ggml.add_space_prefix` is false: the file says whether the tokenizer does (its
/// Metaspace `prepend_scheme`, or a `Prepend("▁")` normalizer), so "Once" is not tokenized as
/// "▁Once" by a model trained on "Once".
#[test]
fn the_space_prefix_flag_is_what_the_tokenizer_does() -> TestResult {
    if shared_dir().is_none() {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    }
    let root = tempfile::tempdir()?;
    let model = stories_copy(root.path())?;
    let prefix = || -> Result<Option<bool>, Box<dyn std::error::Error>> {
        let out = root.path().join("model.gguf");
        write_gguf(&[], &model, &out, GgmlDType::F16, "x", &|| false)?;
        let content = read_content(&out)?;
        Ok(content
            .metadata
            .get("tokenizer.ggml.add_space_prefix")
            .map(|v| v.to_bool())
            .transpose()?)
    };
    // stories260k: Metaspace with prepend_scheme "first".
    assert_eq!(prefix()?, Some(true));
    let path = model.join("tokenizer.json");
    let mut tokenizer: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    tokenizer["pre_tokenizer"]["prepend_scheme"] = serde_json::json!("never");
    std::fs::write(&path, tokenizer.to_string())?;
    assert_eq!(prefix()?, Some(false));
    Ok(())
}
