//! The merged model written in bitsandbytes' saved 4-bit format: the folder transformers'
//! `save_pretrained` writes for a model loaded with `BitsAndBytesConfig(load_in_4bit=True)`, which
//! transformers + bitsandbytes load as a 4-bit model and [`super::quantized`] reads as stored.
//!
//! Owns: that layout — each quantized `W.weight` as bitsandbytes' `QuantState.as_dict(packed=True)`
//! saves it (the packed codes `uint8 [(n + 1) / 2, 1]`, `W.weight.absmax` (`f32`, or the `u8` codes
//! with double quantization), `W.weight.quant_map`, `W.weight.nested_absmax`,
//! `W.weight.nested_quant_map`, and `W.weight.quant_state.bitsandbytes__nf4|fp4`: the bytes of
//! python's `json.dumps` of the state) and `quantization_config` in config.json as
//! `BitsAndBytesConfig.to_dict()` writes it; shards of at most `max_shard_size` bytes, cut as
//! transformers cuts them but with a weight and its state always in one file (transformers reads a
//! weight's state from the shard that holds the weight), streamed: each shard's tensors go to a
//! spool file as they are made and are copied behind the header once the shard is full, so memory
//! stays near one tensor.
//! Which tensors are quantized is [`is_quantized_linear`]'s choice (the decoder blocks' linear
//! weights; norms, embeddings and `lm_head` stay 16-bit, as bitsandbytes leaves them), the values
//! are the merged 16-bit weights exactly as [`super::checkpoint::write_merged_folder`] writes them
//! (merged by [`visit_merged_tensors`], rounded once to the output dtype), and the quantization is
//! `crate::quant`'s (bit-exact with bitsandbytes).
//! Must not: quantize or merge itself, know PEFT methods or pipelines, or print.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::DType;
use safetensors::tensor::TensorInfo;
use safetensors::Dtype;
use serde_json::Value;

use super::checkpoint::{
    bytes_to_f32, f32_to_bytes, safetensors_dtype, safetensors_header, set_config_dtype,
    shard_name, visit_merged_tensors, write_json, write_model_files, CheckpointError,
    MergedOptions, WeightPatch, SHARD_INDEX,
};
use super::quantized::{is_quantized_linear, STATE_SUFFIX};
use super::ModelDir;
use crate::quant::{Absmax, QuantConfig, QuantizedTensor};

/// How the merged model is written in 4 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizedMergedOptions {
    /// Shard size and the dtype of the merged weights (the 16-bit tensors, and the values the
    /// 4-bit weights are quantized from).
    pub merged: MergedOptions,
    /// bitsandbytes' 4-bit settings.
    pub quant: QuantConfig,
    /// `bnb_4bit_compute_dtype` in config.json (None: the dtype of the quantized weights).
    pub compute_dtype: Option<DType>,
}

/// What writing the 4-bit folder did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizedMergedFolder {
    /// Weights an adapter patch changed.
    pub merged_tensors: usize,
    /// Weights written in 4 bits.
    pub quantized_tensors: usize,
    /// Bytes of all weight files written.
    pub bytes: u64,
    /// Weight files written (1: `model.safetensors`; more: shards with an index).
    pub files: usize,
}

/// Write the merged model (the base in `base_dir` with `patches` applied) to `out` in
/// bitsandbytes' saved 4-bit format (see the module docs). Llama-family models only: peftpipe
/// reads no GPT-2 checkpoint in 4 bits.
pub fn write_quantized_merged_folder(
    patches: &[WeightPatch],
    base_dir: &Path,
    out: &Path,
    options: QuantizedMergedOptions,
    cancelled: &dyn Fn() -> bool,
) -> Result<QuantizedMergedFolder, CheckpointError> {
    options
        .quant
        .validate()
        .map_err(|error| CheckpointError::invalid(error.to_string()))?;
    let base =
        ModelDir::open(base_dir).map_err(|error| CheckpointError::invalid(error.to_string()))?;
    if base.config().model_type() == "gpt2" {
        return Err(CheckpointError::invalid(format!(
            "{}: a merged model in bitsandbytes 4-bit is written for Llama-family models, not \
             gpt2 (peftpipe reads no GPT-2 checkpoint in 4 bits); export the 16-bit merged model",
            base.config_path().display()
        )));
    }
    // Start empty: weight files of an earlier layout (one file vs shards) must not linger.
    if out.exists() {
        fs::remove_dir_all(out)?;
    }
    fs::create_dir_all(out)?;
    let mut shards = ShardWriter::new(out, options.merged.max_shard_size);
    let mut merged_tensors = 0;
    let mut quantized_tensors = 0;
    let mut quantized_dtype: Option<&'static str> = None;
    let mut config = visit_merged_tensors(patches, base_dir, cancelled, |tensor| {
        let dtype = options.merged.dtype.unwrap_or(tensor.dtype);
        let (stored, torch_name) = safetensors_dtype(dtype)
            .map_err(|error| CheckpointError::invalid(format!("`{}`: {error}", tensor.name)))?;
        // The tensor as the 16-bit merged export writes it.
        let bytes = f32_to_bytes(stored, &tensor.values);
        merged_tensors += usize::from(tensor.patched);
        if !is_quantized_linear(&tensor.name, &tensor.shape) {
            return shards.add(vec![OutputTensor {
                name: tensor.name,
                dtype: stored,
                shape: tensor.shape,
                bytes,
            }]);
        }
        let values = bytes_to_f32(stored, &bytes).ok_or_else(|| {
            CheckpointError::Internal(format!("`{}`: {stored:?} is not a float", tensor.name))
        })?;
        drop(bytes);
        let quantized = QuantizedTensor::quantize(&values, &tensor.shape, dtype, &options.quant)
            .map_err(|error| {
                CheckpointError::invalid(format!("quantizing `{}`: {error}", tensor.name))
            })?;
        drop(values);
        quantized_dtype.get_or_insert(torch_name);
        quantized_tensors += 1;
        shards.add(state_dict(&tensor.name, &quantized)?)
    })?;
    let written = shards.finish()?;
    if let Some(dtype) = options.merged.dtype {
        let (_, torch_name) = safetensors_dtype(dtype)?;
        set_config_dtype(&mut config, torch_name);
    }
    let compute_dtype = match options.compute_dtype {
        Some(dtype) => safetensors_dtype(dtype)?.1,
        None => quantized_dtype.unwrap_or("float32"),
    };
    if let Value::Object(map) = &mut config {
        map.insert(
            "quantization_config".into(),
            quantization_config(&options.quant, compute_dtype),
        );
    }
    write_model_files(base_dir, out, &config)?;
    Ok(QuantizedMergedFolder {
        merged_tensors,
        quantized_tensors,
        bytes: written.bytes,
        files: written.files,
    })
}

/// `BitsAndBytesConfig(load_in_4bit=True, ...).to_dict()` as transformers writes it into
/// config.json (its keys sorted, as `to_json_string` sorts them; storage `uint8`, no modules
/// skipped beyond transformers' defaults).
pub fn quantization_config(quant: &QuantConfig, compute_dtype: &str) -> Value {
    serde_json::json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant.quant_type.name(),
        "bnb_4bit_use_double_quant": quant.double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes"
    })
}

/// One tensor of the output, in its stored form.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// The tensors `Linear4bit._save_to_state_dict` writes for the weight `name` (`….weight`)
/// quantized as `quantized`: the packed codes under `name`, then `QuantState.as_dict(packed=True)`'s
/// tensors (see the module docs), in name order.
pub fn state_dict(
    name: &str,
    quantized: &QuantizedTensor,
) -> Result<Vec<OutputTensor>, CheckpointError> {
    let tensor = |suffix: &str, dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>| OutputTensor {
        name: format!("{name}{suffix}"),
        dtype,
        shape,
        bytes,
    };
    let type_name = quantized.quant_type.name();
    let (_, dtype_name) = safetensors_dtype(quantized.dtype)?;
    let shape: Vec<String> = quantized.shape.iter().map(usize::to_string).collect();
    // `json.dumps` of the state's non-tensor items, in `as_dict`'s order.
    let mut state = format!(
        r#"{{"quant_type": "{type_name}", "blocksize": {}, "dtype": "{dtype_name}", "shape": [{}]"#,
        quantized.block_size,
        shape.join(", ")
    );
    let mut tensors = vec![tensor(
        "",
        Dtype::U8,
        vec![quantized.packed.len(), 1],
        quantized.packed.clone(),
    )];
    match &quantized.absmax {
        Absmax::Plain(values) => tensors.push(tensor(
            ".absmax",
            Dtype::F32,
            vec![values.len()],
            f32_to_bytes(Dtype::F32, values),
        )),
        Absmax::Nested(nested) => {
            let offset = python_float(f64::from(nested.offset)).ok_or_else(|| {
                CheckpointError::invalid(format!(
                    "`{name}`: the mean of its absmax values is {}: the weight holds values \
                     that are not finite",
                    nested.offset
                ))
            })?;
            state.push_str(&format!(
                r#", "nested_blocksize": {}, "nested_dtype": "float32", "nested_offset": {offset}"#,
                nested.block_size
            ));
            tensors.push(tensor(
                ".absmax",
                Dtype::U8,
                vec![nested.quantized.len()],
                nested.quantized.clone(),
            ));
            tensors.push(tensor(
                ".nested_absmax",
                Dtype::F32,
                vec![nested.scale.len()],
                f32_to_bytes(Dtype::F32, &nested.scale),
            ));
            tensors.push(tensor(
                ".nested_quant_map",
                Dtype::F32,
                vec![nested.code.len()],
                f32_to_bytes(Dtype::F32, &nested.code),
            ));
        }
    }
    state.push('}');
    // bitsandbytes' python table writes FP4's code 8 as `-0`, an integer: saved as +0.0.
    let quant_map = quantized.quant_type.code().map(|level| level + 0.0);
    tensors.push(tensor(
        ".quant_map",
        Dtype::F32,
        vec![16],
        f32_to_bytes(Dtype::F32, &quant_map),
    ));
    let state = state.into_bytes();
    tensors.push(tensor(
        &format!("{STATE_SUFFIX}{type_name}"),
        Dtype::U8,
        vec![state.len()],
        state,
    ));
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(tensors)
}

/// A finite float as python's `repr` (and so `json.dumps`) writes it: the shortest digits that
/// read back to the same double, positional for decimal exponents from -4 to 15 (with `.0` on
/// whole numbers), else scientific with a signed exponent of at least two digits (`1e-05`,
/// `1.5e+16`). None for NaN and infinities (python would write `NaN`, which is no JSON).
pub fn python_float(value: f64) -> Option<String> {
    if !value.is_finite() {
        return None;
    }
    // Rust's `{:e}` gives the same shortest round-trip digits: `d[.ddd]e[-]x`.
    let scientific = format!("{value:e}");
    let (mantissa, exponent) = scientific.split_once('e')?;
    let exponent: i32 = exponent.parse().ok()?;
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if !(-4..16).contains(&exponent) {
        let exponent_sign = if exponent < 0 { '-' } else { '+' };
        return Some(format!(
            "{sign}{mantissa}e{exponent_sign}{:02}",
            exponent.unsigned_abs()
        ));
    }
    let text = if exponent < 0 {
        format!("0.{}{digits}", "0".repeat((-exponent - 1) as usize))
    } else {
        let whole = exponent as usize + 1;
        if digits.len() > whole {
            format!("{}.{}", &digits[..whole], &digits[whole..])
        } else {
            format!("{digits}{}.0", "0".repeat(whole - digits.len()))
        }
    };
    Some(format!("{sign}{text}"))
}

/// What [`ShardWriter::finish`] wrote.
struct WrittenShards {
    bytes: u64,
    files: usize,
}

/// A shard being filled: its tensors so far (names and infos) and the spool holding their bytes.
struct OpenShard {
    spool_path: PathBuf,
    spool: BufWriter<File>,
    tensors: Vec<(String, TensorInfo)>,
    size: u64,
}

/// Writes tensors into safetensors shards of at most `max` tensor bytes, in the order given, as
/// transformers' sharding does (a group that does not fit starts a new shard; one bigger than
/// `max` gets a shard of its own), a group (a 4-bit weight and its state) never split.
struct ShardWriter {
    out: PathBuf,
    max: u64,
    open: Option<OpenShard>,
    /// Closed shards: file written (a temporary name) and the tensors it holds.
    closed: Vec<(PathBuf, Vec<String>)>,
    /// Tensor bytes in all shards (the index's `total_size`).
    total_size: u64,
}

impl ShardWriter {
    fn new(out: &Path, max: u64) -> Self {
        Self {
            out: out.to_path_buf(),
            max,
            open: None,
            closed: Vec::new(),
            total_size: 0,
        }
    }

    /// Append a group of tensors that must share a file.
    fn add(&mut self, group: Vec<OutputTensor>) -> Result<(), CheckpointError> {
        let size: u64 = group.iter().map(|tensor| tensor.bytes.len() as u64).sum();
        if self
            .open
            .as_ref()
            .is_some_and(|shard| !shard.tensors.is_empty() && shard.size + size > self.max)
        {
            self.close()?;
        }
        let shard = match &mut self.open {
            Some(shard) => shard,
            None => {
                let spool_path = self.out.join(format!(".shard-{}.spool", self.closed.len()));
                let spool = BufWriter::new(File::create(&spool_path)?);
                self.open.insert(OpenShard {
                    spool_path,
                    spool,
                    tensors: Vec::new(),
                    size: 0,
                })
            }
        };
        for tensor in group {
            let start = shard.size as usize;
            shard.spool.write_all(&tensor.bytes)?;
            shard.size += tensor.bytes.len() as u64;
            shard.tensors.push((
                tensor.name,
                TensorInfo {
                    dtype: tensor.dtype,
                    shape: tensor.shape,
                    data_offsets: (start, shard.size as usize),
                },
            ));
        }
        self.total_size += size;
        Ok(())
    }

    /// Write the open shard's file: the header, then its spooled bytes.
    fn close(&mut self) -> Result<(), CheckpointError> {
        let Some(shard) = self.open.take() else {
            return Ok(());
        };
        let OpenShard {
            spool_path,
            spool,
            tensors,
            ..
        } = shard;
        spool.into_inner().map_err(|error| error.into_error())?;
        let names = tensors.iter().map(|(name, _)| name.clone()).collect();
        let header = safetensors_header(tensors)?;
        let path = self
            .out
            .join(format!(".shard-{}.safetensors", self.closed.len()));
        let mut writer = BufWriter::new(File::create(&path)?);
        writer.write_all(&(header.len() as u64).to_le_bytes())?;
        writer.write_all(&header)?;
        std::io::copy(&mut File::open(&spool_path)?, &mut writer)?;
        writer
            .into_inner()
            .map_err(|error| error.into_error())?
            .sync_all()?;
        fs::remove_file(&spool_path)?;
        self.closed.push((path, names));
        Ok(())
    }

    /// Close the last shard, give every shard its final name (`model.safetensors`, or
    /// transformers' `model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`).
    fn finish(mut self) -> Result<WrittenShards, CheckpointError> {
        if self.open.is_none() && self.closed.is_empty() {
            // A model without tensors still gets its (empty) weight file.
            self.add(Vec::new())?;
        }
        self.close()?;
        let count = self.closed.len();
        let mut weight_map = serde_json::Map::new();
        let mut bytes = 0;
        for (index, (path, names)) in self.closed.iter().enumerate() {
            let file_name = if count == 1 {
                "model.safetensors".to_string()
            } else {
                shard_name(index, count)
            };
            let target = self.out.join(&file_name);
            fs::rename(path, &target)?;
            bytes += fs::metadata(&target)?.len();
            for name in names {
                weight_map.insert(name.clone(), Value::String(file_name.clone()));
            }
        }
        if count > 1 {
            let index = serde_json::json!({
                "metadata": {"total_size": self.total_size},
                "weight_map": weight_map,
            });
            write_json(&self.out.join(SHARD_INDEX), &index)?;
        }
        Ok(WrittenShards {
            bytes,
            files: count,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QuantType;

    #[test]
    fn floats_are_written_as_python_writes_them() {
        for (value, python) in [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (100.0, "100.0"),
            (0.5, "0.5"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (0.000015, "1.5e-05"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.234e20, "1.234e+20"),
            (-2.5e-7, "-2.5e-07"),
            (123.456, "123.456"),
            (1e-100, "1e-100"),
            // `offset.item()` of a float32 mean: the f32 value widened to a double.
            (f64::from(0.1f32), "0.10000000149011612"),
        ] {
            assert_eq!(python_float(value).as_deref(), Some(python), "{value:e}");
        }
        assert_eq!(python_float(f64::NAN), None);
        assert_eq!(python_float(f64::INFINITY), None);
    }

    #[test]
    fn the_state_dict_holds_bitsandbytes_parts_and_json() {
        let values: Vec<f32> = (0..300)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let quantized =
            QuantizedTensor::quantize(&values, &[3, 100], DType::BF16, &QuantConfig::default())
                .unwrap();
        let Absmax::Nested(nested) = &quantized.absmax else {
            panic!("double quantized");
        };
        let tensors = state_dict("model.layers.0.mlp.up_proj.weight", &quantized).unwrap();
        let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "model.layers.0.mlp.up_proj.weight",
                "model.layers.0.mlp.up_proj.weight.absmax",
                "model.layers.0.mlp.up_proj.weight.nested_absmax",
                "model.layers.0.mlp.up_proj.weight.nested_quant_map",
                "model.layers.0.mlp.up_proj.weight.quant_map",
                "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4",
            ]
        );
        let shapes: Vec<&[usize]> = tensors.iter().map(|t| t.shape.as_slice()).collect();
        assert_eq!(shapes[..5], [&[150, 1][..], &[5], &[1], &[256], &[16]]);
        assert_eq!(tensors[0].bytes, quantized.packed);
        let state = String::from_utf8(tensors[5].bytes.clone()).unwrap();
        assert_eq!(
            state,
            format!(
                r#"{{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [3, 100], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": {}}}"#,
                python_float(f64::from(nested.offset)).unwrap()
            )
        );

        let fp4 = QuantConfig {
            quant_type: QuantType::Fp4,
            block_size: 128,
            double_quant: false,
        };
        let quantized = QuantizedTensor::quantize(&values, &[300], DType::F32, &fp4).unwrap();
        let tensors = state_dict("w.weight", &quantized).unwrap();
        let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "w.weight",
                "w.weight.absmax",
                "w.weight.quant_map",
                "w.weight.quant_state.bitsandbytes__fp4"
            ]
        );
        assert_eq!(tensors[1].dtype, Dtype::F32);
        assert_eq!(tensors[1].shape, [3]);
        // FP4's code 8 saved as +0.0, as bitsandbytes' python table holds it.
        assert_eq!(&tensors[2].bytes[32..36], &0f32.to_le_bytes());
        assert_eq!(
            tensors[3].bytes,
            br#"{"quant_type": "fp4", "blocksize": 128, "dtype": "float32", "shape": [300]}"#
        );
    }
}
