//! The one writer of merged models as llama.cpp GGUF files: a Hugging Face Llama-family folder with
//! per-tensor [`WeightPatch`]es applied (through `checkpoint::visit_merged_tensors`, the same
//! merge the safetensors export writes), renamed to llama.cpp's tensor names (`token_embd`,
//! `blk.N.attn_q`, …, `output_norm`, `output`), with the query/key rows permuted from Hugging
//! Face's rotate-half layout to GGML's interleaved RoPE pairs (as llama.cpp's
//! `convert_hf_to_gguf.py` does), the `llama.*` hyperparameters and the `tokenizer.ggml.*`
//! vocabulary from `tokenizer.json`, quantized with candle's GGML quantizers and written with
//! candle-core's GGUF writer.
//!
//! Weight types follow llama.cpp: 1-D tensors (norms) stay f32; a matrix whose rows are not a
//! multiple of the asked type's block falls back as llama.cpp's quantizer does (q4_k → q5_0 →
//! f16; q8_0 → f16); with q4_k the output head is q6_k, as llama.cpp's Q4_K_S/M mixes have it.
//! The whole quantized model is held in memory while the file is written (candle's writer takes
//! every tensor at once); the file is written beside its destination and renamed into place, so a
//! failed export never leaves a half-written file.
//!
//! Must not: read pipeline configs, know PEFT methods, or print.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value as GgufValue};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde_json::Value;

use super::checkpoint::{visit_merged_tensors, CheckpointError, MergedTensor, WeightPatch};
use super::tokenizer::ModelTokenizer;
use super::{LlamaConfig, ModelConfig, ModelDir};
use crate::ops::{RopeScaling, RotaryEmbedding};

/// The metadata key that marks a GGUF file as written by peftpipe's export (its value is the
/// peftpipe version); only such files are replaced when publishing.
pub const WRITER_KEY: &str = "peftpipe.version";

/// What writing a GGUF file did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufFile {
    /// Tensors written.
    pub tensors: usize,
    /// Tensors a patch changed.
    pub merged_tensors: usize,
    /// Size of the file in bytes.
    pub bytes: u64,
    /// Per weight type (llama.cpp's name), how many tensors have it.
    pub types: BTreeMap<String, usize>,
    /// Matrices written in another type than asked, with the type they got (row size not a
    /// multiple of the asked type's block).
    pub fallbacks: Vec<(String, String)>,
}

/// llama.cpp's name of a GGML type (`f32`, `f16`, `q8_0`, `q4_k`, …).
pub fn type_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "f32",
        GgmlDType::F16 => "f16",
        GgmlDType::BF16 => "bf16",
        GgmlDType::Q4_0 => "q4_0",
        GgmlDType::Q4_1 => "q4_1",
        GgmlDType::Q5_0 => "q5_0",
        GgmlDType::Q5_1 => "q5_1",
        GgmlDType::Q8_0 => "q8_0",
        GgmlDType::Q8_1 => "q8_1",
        GgmlDType::Q2K => "q2_k",
        GgmlDType::Q3K => "q3_k",
        GgmlDType::Q4K => "q4_k",
        GgmlDType::Q5K => "q5_k",
        GgmlDType::Q6K => "q6_k",
        GgmlDType::Q8K => "q8_k",
    }
}

/// llama.cpp's `general.file_type` (`llama_ftype`) of a file whose matrices are mostly `dtype`.
fn file_type(dtype: GgmlDType) -> Result<u32, CheckpointError> {
    Ok(match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q8_0 => 7,
        // LLAMA_FTYPE_MOSTLY_Q4_K_S: q4_k matrices, q6_k output head.
        GgmlDType::Q4K => 14,
        other => {
            return Err(CheckpointError::invalid(format!(
                "GGUF export writes f16, q8_0 or q4_k matrices, not {}",
                type_name(other)
            )))
        }
    })
}

/// The type one tensor gets: 1-D tensors f32; a matrix `wanted` (q6_k for the output head under
/// q4_k), or llama.cpp's fallback when its row length is not a multiple of the block size.
fn tensor_type(gguf_name: &str, shape: &[usize], wanted: GgmlDType) -> GgmlDType {
    if shape.len() < 2 {
        return GgmlDType::F32;
    }
    let wanted = if wanted == GgmlDType::Q4K && gguf_name == "output.weight" {
        GgmlDType::Q6K
    } else {
        wanted
    };
    let row = shape[shape.len() - 1];
    let fits = |dtype: GgmlDType| row % dtype.block_size() == 0;
    if fits(wanted) {
        return wanted;
    }
    // llama.cpp (llama_tensor_get_type): k-quants fall back to a 32-block type of similar size,
    // then to f16 when even that does not fit.
    let fallback = match wanted {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        _ => GgmlDType::F16,
    };
    if fits(fallback) {
        fallback
    } else {
        GgmlDType::F16
    }
}

/// llama.cpp's name of a Hugging Face Llama tensor (None: a tensor llama.cpp does not store,
/// like `rotary_emb.inv_freq`).
fn llama_tensor_name(name: &str) -> Result<Option<String>, CheckpointError> {
    let unknown = || {
        CheckpointError::invalid(format!(
            "tensor `{name}` has no llama.cpp GGUF name (not a Llama tensor llama.cpp knows)"
        ))
    };
    if name.ends_with("rotary_emb.inv_freq") {
        return Ok(None);
    }
    let global = match name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(global) = global {
        return Ok(Some(global.to_string()));
    }
    let rest = name.strip_prefix("model.layers.").ok_or_else(unknown)?;
    let (layer, module) = rest.split_once('.').ok_or_else(unknown)?;
    let layer: usize = layer.parse().map_err(|_| unknown())?;
    let target = match module {
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        _ => return Err(unknown()),
    };
    Ok(Some(format!("blk.{layer}.{target}")))
}

/// Reorder the rows of a query/key projection `[heads·head_dim, in]` from Hugging Face's
/// rotate-half RoPE layout (within a head: first halves, then second halves) to GGML's
/// interleaved pairs (row `2i` ← `i`, row `2i+1` ← `i + head_dim/2`), as llama.cpp's converter
/// does; GGML's Llama then rotates pairs of neighbours.
pub fn permute_rotary_rows(
    values: &[f32],
    rows: usize,
    columns: usize,
    heads: usize,
) -> Result<Vec<f32>, CheckpointError> {
    if heads == 0 || rows % heads != 0 || (rows / heads) % 2 != 0 || values.len() != rows * columns
    {
        return Err(CheckpointError::invalid(format!(
            "cannot permute a [{rows}, {columns}] projection for {heads} heads: the head size must \
             be even"
        )));
    }
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = Vec::with_capacity(values.len());
    for head in 0..heads {
        for pair in 0..half {
            for source in [pair, pair + half] {
                let row = head * head_dim + source;
                out.extend_from_slice(&values[row * columns..(row + 1) * columns]);
            }
        }
    }
    Ok(out)
}

/// Why a model cannot be written as GGUF (None: it can).
/// Why a GGUF export of the model in `model_dir` would fail, found from its config.json and
/// tokenizer files alone (what `validate` asks before training): an architecture or vocabulary
/// the writer does not handle.
pub fn export_problem(model_dir: &Path) -> Option<String> {
    let base = ModelDir::open(model_dir).ok()?;
    if let Some(reason) = unsupported_reason(base.config()) {
        return Some(reason);
    }
    Vocabulary::read(model_dir, base.config().vocab_size())
        .err()
        .map(|error| error.to_string())
}

fn unsupported_reason(config: &ModelConfig) -> Option<String> {
    match config {
        ModelConfig::Gpt2(_) => Some(
            "GGUF export supports Llama-family models; GPT-2 (llama.cpp's `gpt2` architecture, \
             with fused qkv and a byte-level BPE vocabulary that needs llama.cpp's pre-tokenizer \
             name) is not written yet: export `merged:` and convert it with llama.cpp's \
             convert_hf_to_gguf.py"
                .to_string(),
        ),
        ModelConfig::Llama(llama) => {
            if llama.qkv_bias || llama.output_bias || llama.mlp_bias {
                return Some(format!(
                    "GGUF export writes the `llama` architecture, which has no projection biases; \
                     this `{}` model has them (llama.cpp stores such models as another \
                     architecture, e.g. `qwen2`)",
                    llama.model_type
                ));
            }
            if !matches!(llama.model_type.as_str(), "llama" | "mistral") {
                return Some(format!(
                    "GGUF export writes the `llama` architecture; model_type `{}` needs its own \
                     llama.cpp architecture",
                    llama.model_type
                ));
            }
            None
        }
    }
}

/// Write the merged model as one GGUF file at `out`: every base tensor with its patch applied,
/// renamed and permuted for llama.cpp, matrices as `weight_type` (f16, q8_0 or q4_k, with
/// llama.cpp's fallbacks), 1-D tensors f32, with the model's hyperparameters and tokenizer as
/// metadata. `name` becomes `general.name`.
pub fn write_gguf(
    patches: &[WeightPatch],
    base_dir: &Path,
    out: &Path,
    weight_type: GgmlDType,
    name: &str,
    cancelled: &dyn Fn() -> bool,
) -> Result<GgufFile, CheckpointError> {
    let base =
        ModelDir::open(base_dir).map_err(|error| CheckpointError::invalid(error.to_string()))?;
    if let Some(reason) = unsupported_reason(base.config()) {
        return Err(CheckpointError::invalid(format!(
            "{}: {reason}",
            base_dir.display()
        )));
    }
    let ModelConfig::Llama(llama) = base.config() else {
        return Err(CheckpointError::Internal("not a Llama config".into()));
    };
    let llama = llama.clone();
    let file_type = file_type(weight_type)?;
    // Read the vocabulary first: a tokenizer llama.cpp cannot use fails before any weight work.
    let mut vocabulary = Vocabulary::read(base_dir, llama.vocab_size)?;
    let tokenizer = base
        .tokenizer()
        .map_err(|error| CheckpointError::invalid(error.to_string()))?;
    vocabulary.follow_tokenizer(&tokenizer);

    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut summary = GgufFile {
        tensors: 0,
        merged_tensors: 0,
        bytes: 0,
        types: BTreeMap::new(),
        fallbacks: Vec::new(),
    };
    visit_merged_tensors(patches, base_dir, cancelled, |tensor| {
        let Some(gguf_name) = llama_tensor_name(&tensor.name)? else {
            return Ok(());
        };
        // A tied head is the embedding (as transformers loads it, whatever copy the checkpoint
        // stores): llama.cpp reads `token_embd` when `output` is absent. A patched head is untied.
        if gguf_name == "output.weight" && llama.tie_word_embeddings && !tensor.patched {
            return Ok(());
        }
        let quantized = quantize(
            &gguf_name,
            tensor.clone(),
            &llama,
            weight_type,
            &mut summary,
        )?;
        summary.merged_tensors += usize::from(tensor.patched);
        tensors.push((gguf_name, quantized));
        Ok(())
    })?;
    if let Some(rope) = rope_factors(&llama)? {
        summary
            .types
            .entry(type_name(GgmlDType::F32).into())
            .and_modify(|count| *count += 1)
            .or_insert(1);
        tensors.push(("rope_freqs.weight".into(), rope));
    }
    // llama.cpp's order: token embedding, then blocks in order, then the output tensors.
    tensors.sort_by_key(|(name, _)| tensor_order(name));
    summary.tensors = tensors.len();

    let metadata = metadata(&llama, &vocabulary, file_type, weight_type, name)?;
    write_file(out, &metadata, &tensors)?;
    summary.bytes = fs::metadata(out)?.len();
    Ok(summary)
}

/// Sort key putting tensors in llama.cpp's order: `token_embd`, `rope_freqs`, `blk.0.*`, …,
/// `output_norm`, `output`.
fn tensor_order(name: &str) -> (usize, usize, String) {
    if let Some(rest) = name.strip_prefix("blk.") {
        if let Some((layer, module)) = rest.split_once('.') {
            if let Ok(layer) = layer.parse::<usize>() {
                return (1, layer, module.to_string());
            }
        }
    }
    let group = match name {
        "token_embd.weight" => 0,
        "rope_freqs.weight" => 0,
        "output_norm.weight" => 2,
        _ => 3,
    };
    (group, 0, name.to_string())
}

/// One merged tensor as a GGML tensor of the right type (query/key rows permuted).
fn quantize(
    gguf_name: &str,
    tensor: MergedTensor,
    llama: &LlamaConfig,
    weight_type: GgmlDType,
    summary: &mut GgufFile,
) -> Result<QTensor, CheckpointError> {
    let MergedTensor {
        name,
        shape,
        values,
        ..
    } = tensor;
    let heads = if gguf_name.ends_with(".attn_q.weight") {
        Some(llama.num_attention_heads)
    } else if gguf_name.ends_with(".attn_k.weight") {
        Some(llama.num_key_value_heads)
    } else {
        None
    };
    let values = match (heads, shape.as_slice()) {
        (Some(heads), [rows, columns]) => permute_rotary_rows(&values, *rows, *columns, heads)
            .map_err(|error| CheckpointError::invalid(format!("`{name}`: {error}")))?,
        _ => values,
    };
    let dtype = tensor_type(gguf_name, &shape, weight_type);
    let asked = if gguf_name == "output.weight" && weight_type == GgmlDType::Q4K {
        GgmlDType::Q6K
    } else {
        weight_type
    };
    if shape.len() >= 2 && dtype != asked {
        summary
            .fallbacks
            .push((gguf_name.to_string(), type_name(dtype).to_string()));
    }
    *summary.types.entry(type_name(dtype).into()).or_insert(0) += 1;
    let tensor = Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)
        .map_err(|error| CheckpointError::Internal(format!("`{name}`: {error}")))?;
    QTensor::quantize(&tensor, dtype).map_err(|error| {
        CheckpointError::invalid(format!(
            "cannot quantize `{name}` {shape:?} to {}: {error}",
            type_name(dtype)
        ))
    })
}

/// llama.cpp's `rope_freqs.weight` for Llama 3 RoPE scaling: per frequency, the divisor the
/// scaling applies (unscaled / scaled inverse frequency). None without such scaling.
fn rope_factors(llama: &LlamaConfig) -> Result<Option<QTensor>, CheckpointError> {
    let Some(scaling @ RopeScaling::Llama3 { .. }) = &llama.rope_scaling else {
        return Ok(None);
    };
    let internal = |error: candle_core::Error| CheckpointError::Internal(error.to_string());
    let plain = RotaryEmbedding::new(llama.head_dim, llama.rope_theta, None).map_err(internal)?;
    let scaled =
        RotaryEmbedding::new(llama.head_dim, llama.rope_theta, Some(scaling)).map_err(internal)?;
    let factors: Vec<f32> = plain
        .inverse_frequencies()
        .iter()
        .zip(scaled.inverse_frequencies())
        .map(|(plain, scaled)| plain / scaled)
        .collect();
    let length = factors.len();
    let tensor = Tensor::from_vec(factors, length, &Device::Cpu).map_err(internal)?;
    QTensor::quantize(&tensor, GgmlDType::F32)
        .map(Some)
        .map_err(internal)
}

fn u32_value(value: usize, key: &str) -> Result<GgufValue, CheckpointError> {
    u32::try_from(value)
        .map(GgufValue::U32)
        .map_err(|_| CheckpointError::invalid(format!("{key} = {value} does not fit GGUF's u32")))
}

/// The GGUF metadata llama.cpp reads for a Llama model (the keys its converter writes).
fn metadata(
    llama: &LlamaConfig,
    vocabulary: &Vocabulary,
    file_type: u32,
    weight_type: GgmlDType,
    name: &str,
) -> Result<Vec<(String, GgufValue)>, CheckpointError> {
    let text = |value: &str| GgufValue::String(value.to_string());
    let mut entries: Vec<(String, GgufValue)> = vec![
        ("general.architecture".into(), text("llama")),
        ("general.name".into(), text(name)),
        ("general.file_type".into(), GgufValue::U32(file_type)),
    ];
    if weight_type != GgmlDType::F16 && weight_type != GgmlDType::F32 {
        entries.push(("general.quantization_version".into(), GgufValue::U32(2)));
    }
    entries.push((WRITER_KEY.into(), text(crate::TOOL_BUILD)));
    for (key, value) in [
        ("llama.context_length", llama.max_position_embeddings),
        ("llama.embedding_length", llama.hidden_size),
        ("llama.block_count", llama.num_hidden_layers),
        ("llama.feed_forward_length", llama.intermediate_size),
        ("llama.rope.dimension_count", llama.head_dim),
        ("llama.attention.head_count", llama.num_attention_heads),
        ("llama.attention.head_count_kv", llama.num_key_value_heads),
        ("llama.attention.key_length", llama.head_dim),
        ("llama.attention.value_length", llama.head_dim),
        ("llama.vocab_size", llama.vocab_size),
    ] {
        entries.push((key.into(), u32_value(value, key)?));
    }
    entries.push((
        "llama.attention.layer_norm_rms_epsilon".into(),
        GgufValue::F32(llama.rms_norm_eps as f32),
    ));
    entries.push((
        "llama.rope.freq_base".into(),
        GgufValue::F32(llama.rope_theta as f32),
    ));
    if let Some(RopeScaling::Linear { factor }) = &llama.rope_scaling {
        entries.push(("llama.rope.scaling.type".into(), text("linear")));
        entries.push((
            "llama.rope.scaling.factor".into(),
            GgufValue::F32(*factor as f32),
        ));
    }
    vocabulary.push_metadata(&mut entries);
    Ok(entries)
}

/// Write `tensors` with `metadata` to a temporary file beside `out`, then rename it into place.
fn write_file(
    out: &Path,
    metadata: &[(String, GgufValue)],
    tensors: &[(String, QTensor)],
) -> Result<(), CheckpointError> {
    let parent = match out.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    fs::create_dir_all(parent)?;
    let temporary = crate::files::file_builder()
        .prefix(".model.gguf.peftpipe-tmp-")
        .tempfile_in(parent)
        .map_err(|error| {
            CheckpointError::invalid(format!(
                "cannot create a temporary file in {}: {error}",
                parent.display()
            ))
        })?;
    let metadata: Vec<(&str, &GgufValue)> = metadata
        .iter()
        .map(|(key, value)| (key.as_str(), value))
        .collect();
    let tensors: Vec<(&str, &QTensor)> = tensors
        .iter()
        .map(|(name, tensor)| (name.as_str(), tensor))
        .collect();
    let mut writer = BufWriter::new(temporary.as_file());
    gguf_file::write(&mut writer, &metadata, &tensors).map_err(|error| {
        CheckpointError::invalid(format!("cannot write {}: {error}", out.display()))
    })?;
    writer.flush()?;
    drop(writer);
    temporary.as_file().sync_all()?;
    temporary.persist(out).map_err(|error| {
        CheckpointError::invalid(format!(
            "cannot move the GGUF file to {}: {error}",
            out.display()
        ))
    })?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The vocabulary, as llama.cpp's `llama` (SentencePiece) tokenizer reads it
// ---------------------------------------------------------------------------------------------

/// SentencePiece token types as llama.cpp stores them (`tokenizer.ggml.token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum TokenType {
    Normal = 1,
    Unknown = 2,
    Control = 3,
    UserDefined = 4,
    Unused = 5,
    Byte = 6,
}

/// The `tokenizer.ggml.*` metadata of a SentencePiece-style tokenizer.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocabulary {
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    pub types: Vec<TokenType>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unknown: Option<u32>,
    pub padding: Option<u32>,
    /// Whether the tokenizer adds BOS / EOS (`tokenizer.ggml.add_bos_token`, …; llama.cpp adds
    /// BOS to a `llama` vocabulary when the key is absent).
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    /// Whether the tokenizer puts `▁` before the text (`tokenizer.ggml.add_space_prefix`; llama.cpp
    /// adds the space to a `llama` vocabulary when the key is absent).
    pub add_space_prefix: Option<bool>,
    /// The chat template the tokenizer renders (`tokenizer.chat_template`).
    pub chat_template: Option<String>,
    /// The other templates of tokenizer_config.json's named-list `chat_template`, by name
    /// (`tokenizer.chat_template.<name>`, names listed in `tokenizer.chat_templates`).
    pub named_chat_templates: Vec<(String, String)>,
}

impl Vocabulary {
    /// Read `tokenizer.json` (and `tokenizer_config.json`, `config.json` for special ids) of a
    /// model folder. Supports SentencePiece-style vocabularies: BPE with byte fallback (scores by
    /// merge rank: a piece's id order, as SentencePiece's BPE scores are) and Unigram (its own
    /// scores). The vocabulary is padded to `vocab_size` with unused `[PAD{id}]` tokens, as
    /// llama.cpp's converter does.
    pub fn read(model_dir: &Path, vocab_size: usize) -> Result<Self, CheckpointError> {
        let file = model_dir.join("tokenizer.json");
        let read_json = |path: &Path| -> Result<Option<Value>, CheckpointError> {
            if !path.is_file() {
                return Ok(None);
            }
            let text = fs::read_to_string(path).map_err(|error| {
                CheckpointError::invalid(format!("cannot read {}: {error}", path.display()))
            })?;
            serde_json::from_str(&text).map(Some).map_err(|error| {
                CheckpointError::invalid(format!("{} is not valid JSON: {error}", path.display()))
            })
        };
        let tokenizer = read_json(&file)?.ok_or_else(|| {
            CheckpointError::invalid(format!(
                "{}: GGUF export needs the tokenizer.json of the base model",
                file.display()
            ))
        })?;
        let tokenizer_config = read_json(&model_dir.join("tokenizer_config.json"))?;
        let config = read_json(&model_dir.join("config.json"))?.unwrap_or(Value::Null);
        let bad =
            |message: &str| CheckpointError::invalid(format!("{}: {message}", file.display()));
        let model = tokenizer
            .get("model")
            .ok_or_else(|| bad("has no `model`"))?;
        let kind = model.get("type").and_then(Value::as_str).unwrap_or("");

        // id → (piece, score) of the model's own vocabulary.
        let mut pieces: BTreeMap<u32, (String, Option<f32>)> = BTreeMap::new();
        match kind {
            "BPE" => {
                if model.get("byte_fallback").and_then(Value::as_bool) != Some(true) {
                    return Err(bad(
                        "its BPE vocabulary is byte-level (GPT-2/Llama 3 style); GGUF export \
                         writes SentencePiece-style vocabularies (BPE with byte_fallback, or \
                         Unigram), as llama.cpp's `llama` tokenizer reads them",
                    ));
                }
                let vocab = model
                    .get("vocab")
                    .and_then(Value::as_object)
                    .ok_or_else(|| bad("`model.vocab` is not a map"))?;
                for (piece, id) in vocab {
                    let id = id
                        .as_u64()
                        .and_then(|id| u32::try_from(id).ok())
                        .ok_or_else(|| bad(&format!("token `{piece}` has no valid id")))?;
                    pieces.insert(id, (piece.clone(), None));
                }
            }
            "Unigram" => {
                let vocab = model
                    .get("vocab")
                    .and_then(Value::as_array)
                    .ok_or_else(|| bad("`model.vocab` is not a list"))?;
                for (id, entry) in vocab.iter().enumerate() {
                    let piece = entry.get(0).and_then(Value::as_str);
                    let score = entry.get(1).and_then(Value::as_f64);
                    let (Some(piece), Some(score)) = (piece, score) else {
                        return Err(bad(&format!("vocabulary entry {id} is not [piece, score]")));
                    };
                    pieces.insert(id as u32, (piece.to_string(), Some(score as f32)));
                }
            }
            other => {
                return Err(bad(&format!(
                    "GGUF export writes SentencePiece-style vocabularies (BPE with \
                     byte_fallback, or Unigram), not a `{other}` model"
                )))
            }
        }
        // Added tokens: (id → (content, special)).
        let mut added: BTreeMap<u32, (String, bool)> = BTreeMap::new();
        for entry in tokenizer
            .get("added_tokens")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let id = entry.get("id").and_then(Value::as_u64);
            let content = entry.get("content").and_then(Value::as_str);
            if let (Some(id), Some(content)) = (id, content) {
                let special = entry
                    .get("special")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                added.insert(id as u32, (content.to_string(), special));
            }
        }
        let count = pieces
            .keys()
            .chain(added.keys())
            .max()
            .map_or(0, |last| *last as usize + 1);
        if count > vocab_size {
            return Err(bad(&format!(
                "has {count} tokens, more than the model's vocab_size {vocab_size}"
            )));
        }
        let token_id = |content: &str| -> Option<u32> {
            pieces
                .iter()
                .find(|(_, (piece, _))| piece == content)
                .map(|(id, _)| *id)
                .or_else(|| {
                    added
                        .iter()
                        .find(|(_, (text, _))| text == content)
                        .map(|(id, _)| *id)
                })
        };
        let named = |key: &str| -> Option<String> {
            let value = tokenizer_config.as_ref()?.get(key)?;
            value
                .as_str()
                .or_else(|| value.get("content").and_then(Value::as_str))
                .map(str::to_string)
        };
        let config_id = |key: &str| -> Option<u32> {
            config
                .get(key)
                .and_then(Value::as_u64)
                .and_then(|id| u32::try_from(id).ok())
        };
        let special_id = |key: &str, config_key: &str| {
            named(key)
                .and_then(|text| token_id(&text))
                .or_else(|| config_id(config_key))
        };
        let unknown = model
            .get("unk_token")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| named("unk_token"))
            .and_then(|text| token_id(&text));

        let byte_piece = regex::Regex::new(r"^<0x[0-9A-Fa-f]{2}>$")
            .map_err(|error| CheckpointError::Internal(error.to_string()))?;
        let mut tokens = Vec::with_capacity(vocab_size);
        let mut scores = Vec::with_capacity(vocab_size);
        let mut types = Vec::with_capacity(vocab_size);
        // SentencePiece BPE scores pieces by merge order, which is their id order: the first
        // normal piece scores 0, the next -1, and so on (special and byte pieces score 0).
        let mut normal_rank = 0f32;
        for id in 0..vocab_size as u32 {
            let (token, score, kind) = if let Some((content, special)) = added.get(&id) {
                let kind = if Some(id) == unknown {
                    TokenType::Unknown
                } else if *special {
                    TokenType::Control
                } else {
                    TokenType::UserDefined
                };
                let score = pieces.get(&id).and_then(|(_, score)| *score).unwrap_or(0.0);
                (content.clone(), score, kind)
            } else if let Some((piece, score)) = pieces.get(&id) {
                let (kind, derived) = if Some(id) == unknown {
                    (TokenType::Unknown, 0.0)
                } else if byte_piece.is_match(piece) {
                    (TokenType::Byte, 0.0)
                } else {
                    let rank = -normal_rank;
                    normal_rank += 1.0;
                    (TokenType::Normal, rank)
                };
                (piece.clone(), score.unwrap_or(derived), kind)
            } else {
                (format!("[PAD{id}]"), -1000.0, TokenType::Unused)
            };
            tokens.push(token);
            scores.push(score);
            types.push(kind);
        }
        let named_chat_templates = tokenizer_config
            .as_ref()
            .and_then(|config| config.get("chat_template"))
            .map_or_else(Vec::new, named_chat_templates);
        Ok(Vocabulary {
            tokens,
            scores,
            types,
            bos: special_id("bos_token", "bos_token_id"),
            eos: special_id("eos_token", "eos_token_id"),
            unknown,
            padding: special_id("pad_token", "pad_token_id"),
            // What the tokenizer adds and renders is the model tokenizer's rule
            // ([`Vocabulary::follow_tokenizer`]).
            add_bos: None,
            add_eos: None,
            add_space_prefix: None,
            chat_template: None,
            named_chat_templates,
        })
    }

    /// Take what peftpipe's tokenizer of the model does (the one that tokenized the training
    /// data): whether it adds BOS and EOS (tokenizer_config.json's flags, else what tokenizer.json's
    /// post-processor adds) and the chat template it renders (chat_template.jinja, else
    /// tokenizer_config.json's `chat_template`, of the list form the `default` one), so llama.cpp
    /// tokenizes and formats prompts as training did. Whether it puts a space before the text is
    /// seen by encoding "a" (`▁a` with the prefix: a Metaspace pre-tokenizer prepending, or a
    /// `Prepend` normalizer).
    pub fn follow_tokenizer(&mut self, tokenizer: &ModelTokenizer) {
        self.add_bos = Some(tokenizer.add_bos_token);
        self.add_eos = Some(tokenizer.add_eos_token);
        self.add_space_prefix = tokenizer
            .encode("a", false)
            .ok()
            .and_then(|ids| ids.first().copied())
            .and_then(|id| tokenizer.inner().id_to_token(id))
            .map(|piece| piece.starts_with('\u{2581}'));
        self.chat_template = tokenizer.chat_template.clone();
    }

    fn push_metadata(&self, entries: &mut Vec<(String, GgufValue)>) {
        let text = |value: &str| GgufValue::String(value.to_string());
        entries.push(("tokenizer.ggml.model".into(), text("llama")));
        entries.push(("tokenizer.ggml.pre".into(), text("default")));
        entries.push((
            "tokenizer.ggml.tokens".into(),
            GgufValue::Array(self.tokens.iter().map(|token| text(token)).collect()),
        ));
        entries.push((
            "tokenizer.ggml.scores".into(),
            GgufValue::Array(self.scores.iter().map(|s| GgufValue::F32(*s)).collect()),
        ));
        entries.push((
            "tokenizer.ggml.token_type".into(),
            GgufValue::Array(
                self.types
                    .iter()
                    .map(|kind| GgufValue::I32(*kind as i32))
                    .collect(),
            ),
        ));
        for (key, id) in [
            ("tokenizer.ggml.bos_token_id", self.bos),
            ("tokenizer.ggml.eos_token_id", self.eos),
            ("tokenizer.ggml.unknown_token_id", self.unknown),
            ("tokenizer.ggml.padding_token_id", self.padding),
        ] {
            if let Some(id) = id {
                entries.push((key.into(), GgufValue::U32(id)));
            }
        }
        for (key, flag) in [
            ("tokenizer.ggml.add_bos_token", self.add_bos),
            ("tokenizer.ggml.add_eos_token", self.add_eos),
            ("tokenizer.ggml.add_space_prefix", self.add_space_prefix),
        ] {
            if let Some(flag) = flag {
                entries.push((key.into(), GgufValue::Bool(flag)));
            }
        }
        if let Some(template) = &self.chat_template {
            entries.push(("tokenizer.chat_template".into(), text(template)));
        }
        for (name, template) in &self.named_chat_templates {
            entries.push((format!("tokenizer.chat_template.{name}"), text(template)));
        }
        if !self.named_chat_templates.is_empty() {
            let names = self
                .named_chat_templates
                .iter()
                .map(|(name, _)| text(name))
                .collect();
            entries.push(("tokenizer.chat_templates".into(), GgufValue::Array(names)));
        }
    }
}

/// The named templates of a `chat_template` list (`[{"name": …, "template": …}, …]`) other than
/// `default`, as llama.cpp's gguf writer keeps them: names with characters other than ASCII
/// letters and digits replaced by `_`, the first of a repeated name kept.
fn named_chat_templates(value: &Value) -> Vec<(String, String)> {
    let mut named: Vec<(String, String)> = Vec::new();
    for entry in value.as_array().into_iter().flatten() {
        let name = entry.get("name").and_then(Value::as_str).unwrap_or("");
        let Some(template) = entry.get("template").and_then(Value::as_str) else {
            continue;
        };
        let name: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        if name.is_empty() || name == "default" || named.iter().any(|(n, _)| *n == name) {
            continue;
        }
        named.push((name, template.to_string()));
    }
    named
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotary_rows_interleave_each_head_halves() {
        // 2 heads of 4 rows, 1 column: rows 0..8 → per head [0, 2, 1, 3].
        let values: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let permuted = permute_rotary_rows(&values, 8, 1, 2).unwrap();
        assert_eq!(permuted, [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
        // Columns move with their row.
        let values: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let permuted = permute_rotary_rows(&values, 4, 2, 1).unwrap();
        assert_eq!(permuted, [0.0, 1.0, 4.0, 5.0, 2.0, 3.0, 6.0, 7.0]);
        assert!(permute_rotary_rows(&values, 4, 2, 3).is_err());
    }

    #[test]
    fn tensor_types_fall_back_like_llama_cpp() {
        assert_eq!(
            tensor_type("blk.0.attn_norm.weight", &[64], GgmlDType::Q4K),
            GgmlDType::F32
        );
        assert_eq!(
            tensor_type("blk.0.attn_q.weight", &[8, 256], GgmlDType::Q4K),
            GgmlDType::Q4K
        );
        assert_eq!(
            tensor_type("blk.0.attn_q.weight", &[8, 64], GgmlDType::Q4K),
            GgmlDType::Q5_0
        );
        assert_eq!(
            tensor_type("blk.0.ffn_down.weight", &[8, 172], GgmlDType::Q4K),
            GgmlDType::F16
        );
        assert_eq!(
            tensor_type("output.weight", &[8, 256], GgmlDType::Q4K),
            GgmlDType::Q6K
        );
        assert_eq!(
            tensor_type("output.weight", &[8, 64], GgmlDType::Q4K),
            GgmlDType::Q8_0
        );
        assert_eq!(
            tensor_type("blk.0.attn_q.weight", &[8, 64], GgmlDType::Q8_0),
            GgmlDType::Q8_0
        );
        assert_eq!(
            tensor_type("blk.0.ffn_down.weight", &[8, 172], GgmlDType::Q8_0),
            GgmlDType::F16
        );
        assert_eq!(
            tensor_type("blk.0.ffn_down.weight", &[8, 172], GgmlDType::F16),
            GgmlDType::F16
        );
    }

    #[test]
    fn llama_names_map_to_llama_cpp() {
        let cases = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.norm.weight", "output_norm.weight"),
            ("lm_head.weight", "output.weight"),
            (
                "model.layers.3.self_attn.q_proj.weight",
                "blk.3.attn_q.weight",
            ),
            (
                "model.layers.0.self_attn.o_proj.weight",
                "blk.0.attn_output.weight",
            ),
            (
                "model.layers.12.mlp.down_proj.weight",
                "blk.12.ffn_down.weight",
            ),
            (
                "model.layers.1.post_attention_layernorm.weight",
                "blk.1.ffn_norm.weight",
            ),
        ];
        for (hf, gguf) in cases {
            assert_eq!(llama_tensor_name(hf).unwrap().as_deref(), Some(gguf));
        }
        assert_eq!(
            llama_tensor_name("model.layers.0.self_attn.rotary_emb.inv_freq").unwrap(),
            None
        );
        let error = llama_tensor_name("model.layers.0.self_attn.q_norm.weight").unwrap_err();
        assert!(
            error.to_string().contains("no llama.cpp GGUF name"),
            "{error}"
        );
    }
}
