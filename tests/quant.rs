//! 4-bit quantization against bitsandbytes (`../shared/fixtures/nf4`, made by bitsandbytes 0.50.2's
//! `quantize_4bit` / `dequantize_4bit` on its CPU backend): packed bytes, absmax and the double
//! quantization state byte for byte, dequantization bit for bit; and the two loading paths of
//! `models::quantized` (quantize a 16-bit checkpoint while loading it; read a checkpoint in the
//! layout transformers + bitsandbytes save). Without PEFTPIPE_SHARED the fixture tests print why
//! and pass.
#![expect(clippy::print_stderr, reason = "tests print skip reasons")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use peftpipe::models::quantized::{
    bnb_quantization, is_quantized_linear, load_bnb_checkpoint, quantize_checkpoint,
};
use peftpipe::quant::{
    double_quant, Absmax, QuantConfig, QuantType, QuantizedTensor, QuantizedWeight,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

struct Fixture {
    tensors: HashMap<String, Tensor>,
    offset: f32,
}

impl Fixture {
    fn f32s(&self, name: &str) -> Vec<f32> {
        self.tensors[name]
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("an f32 fixture tensor")
    }

    fn bytes(&self, name: &str) -> Vec<u8> {
        self.tensors[name]
            .flatten_all()
            .and_then(|t| t.to_vec1::<u8>())
            .expect("a u8 fixture tensor")
    }

    fn weight(&self) -> Vec<f32> {
        self.f32s("weight")
    }
}

fn fixture_path() -> Option<PathBuf> {
    let Some(shared) = std::env::var_os("PEFTPIPE_SHARED") else {
        eprintln!("skipped: PEFTPIPE_SHARED is not set");
        return None;
    };
    let path = PathBuf::from(shared).join("fixtures/nf4/nf4_reference.safetensors");
    if !path.exists() {
        eprintln!("skipped: {} is missing", path.display());
        return None;
    }
    Some(path)
}

fn fixture() -> Option<Fixture> {
    let path = fixture_path()?;
    let tensors =
        candle_core::safetensors::load(&path, &Device::Cpu).expect("the NF4 fixture loads");
    let bytes = std::fs::read(&path).expect("reading the NF4 fixture");
    let (_, metadata) =
        safetensors::SafeTensors::read_metadata(&bytes).expect("a safetensors header");
    let offset: f64 = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get("dq_offset"))
        .expect("dq_offset in the fixture metadata")
        .parse()
        .expect("dq_offset is a number");
    Some(Fixture {
        tensors,
        offset: offset as f32,
    })
}

fn assert_bits_equal(ours: &[f32], theirs: &[f32], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths");
    let differing: Vec<usize> = (0..ours.len())
        .filter(|&i| ours[i].to_bits() != theirs[i].to_bits())
        .collect();
    assert!(
        differing.is_empty(),
        "{what}: {} of {} values differ in their bits, first at {}: ours {:e}, bitsandbytes {:e}",
        differing.len(),
        ours.len(),
        differing[0],
        ours[differing[0]],
        theirs[differing[0]]
    );
}

fn assert_bytes_equal(ours: &[u8], theirs: &[u8], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths");
    let differing = ours.iter().zip(theirs).filter(|(a, b)| a != b).count();
    let first = ours.iter().zip(theirs).position(|(a, b)| a != b);
    assert_eq!(
        differing, 0,
        "{what}: {differing} bytes differ, first at {first:?}"
    );
}

fn quantize(fixture: &Fixture, double_quant: bool) -> QuantizedTensor {
    let config = QuantConfig {
        double_quant,
        ..QuantConfig::default()
    };
    QuantizedTensor::quantize(&fixture.weight(), &[192, 256], DType::F32, &config)
        .expect("the fixture weight quantizes")
}

#[test]
fn nf4_code_book_equals_bitsandbytes() {
    let Some(fixture) = fixture() else { return };
    assert_bits_equal(&QuantType::Nf4.code(), &fixture.f32s("code"), "NF4 levels");
}

#[test]
fn dynamic_8bit_map_equals_bitsandbytes() {
    let Some(fixture) = fixture() else { return };
    assert_bits_equal(
        &double_quant::dynamic_map(),
        &fixture.f32s("dq_absmax_code"),
        "dynamic map",
    );
}

#[test]
fn nf4_packed_bytes_and_absmax_equal_bitsandbytes() {
    let Some(fixture) = fixture() else { return };
    let ours = quantize(&fixture, false);
    assert_bytes_equal(&ours.packed, &fixture.bytes("packed"), "packed");
    let Absmax::Plain(absmax) = &ours.absmax else {
        panic!("no double quantization was asked for")
    };
    assert_bits_equal(absmax, &fixture.f32s("absmax"), "absmax");
}

#[test]
fn nf4_dequantization_equals_bitsandbytes_to_the_bit() {
    let Some(fixture) = fixture() else { return };
    let ours = quantize(&fixture, false);
    assert_bits_equal(
        &ours.dequantize_f32(),
        &fixture.f32s("dequantized"),
        "dequantized",
    );
}

#[test]
fn double_quant_bytes_scales_and_offset_equal_bitsandbytes() {
    let Some(fixture) = fixture() else { return };
    let ours = quantize(&fixture, true);
    assert_bytes_equal(&ours.packed, &fixture.bytes("dq_packed"), "dq_packed");
    let Absmax::Nested(nested) = &ours.absmax else {
        panic!("double quantization was asked for")
    };
    assert_eq!(nested.offset.to_bits(), fixture.offset.to_bits(), "offset");
    assert_bytes_equal(
        &nested.quantized,
        &fixture.bytes("dq_absmax_u8"),
        "absmax codes",
    );
    assert_bits_equal(
        &nested.scale,
        &fixture.f32s("dq_absmax_scale"),
        "absmax scales",
    );
    assert_eq!(nested.block_size, 256);
}

#[test]
fn double_quant_dequantization_equals_bitsandbytes_to_the_bit() {
    let Some(fixture) = fixture() else { return };
    let ours = quantize(&fixture, true);
    assert_bits_equal(
        &ours.dequantize_f32(),
        &fixture.f32s("dq_dequantized"),
        "dq_dequantized",
    );
}

/// The fixture's own state (not our quantization of it) dequantized by us: the dequantization
/// rule alone is bit-exact, on the CPU op path too.
#[test]
fn dequantizing_bitsandbytes_own_state_equals_its_output() -> TestResult {
    let Some(fixture) = fixture() else {
        return Ok(());
    };
    let state = QuantizedTensor {
        shape: vec![192, 256],
        dtype: DType::F32,
        quant_type: QuantType::Nf4,
        block_size: 64,
        packed: fixture.bytes("dq_packed"),
        absmax: Absmax::Nested(peftpipe::quant::NestedAbsmax {
            quantized: fixture.bytes("dq_absmax_u8"),
            scale: fixture.f32s("dq_absmax_scale"),
            code: fixture.f32s("dq_absmax_code"),
            block_size: 256,
            offset: fixture.offset,
        }),
    };
    state.check()?;
    let expected = fixture.f32s("dq_dequantized");
    assert_bits_equal(&state.dequantize_f32(), &expected, "host dequantization");
    let weight = QuantizedWeight::new(&state, &Device::Cpu)?;
    let dense = weight
        .dequantize(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert_bits_equal(&dense, &expected, "QuantizedWeight::dequantize");
    // bf16 is the f32 result rounded once to nearest-even.
    let bf16 = weight
        .dequantize(DType::BF16)?
        .flatten_all()?
        .to_vec1::<half::bf16>()?;
    let rounded: Vec<half::bf16> = expected.iter().map(|&x| half::bf16::from_f32(x)).collect();
    assert_eq!(bf16, rounded);
    Ok(())
}

#[test]
fn fp4_round_trip_stays_within_half_the_widest_level_gap() -> TestResult {
    let values: Vec<f32> = (0..1000)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.03)
        .collect();
    let config = QuantConfig {
        quant_type: QuantType::Fp4,
        block_size: 64,
        double_quant: false,
    };
    let quantized = QuantizedTensor::quantize(&values, &[1000], DType::F32, &config)?;
    let back = quantized.dequantize_f32();
    let absmax = quantized.absmax_f32();
    for (index, (a, b)) in values.iter().zip(&back).enumerate() {
        // FP4's widest gap is between 2/3 and 1 (1/3 of the absmax).
        let bound = absmax[index / 64] / 6.0 + 1e-7;
        assert!((a - b).abs() <= bound, "value {index}: {a} → {b}");
    }
    Ok(())
}

// ---- loading ------------------------------------------------------------------------------------

fn save(path: &Path, tensors: Vec<(&str, Tensor)>) -> TestResult {
    let map: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
    candle_core::safetensors::save(&map, path)?;
    Ok(())
}

/// A 16-bit checkpoint in two shards: the fixture weight as a decoder projection (f32 here, so
/// the bitsandbytes bytes apply), another projection in bf16, embeddings, a norm and a head.
#[test]
fn quantizing_a_checkpoint_while_loading_it_matches_bitsandbytes_and_keeps_the_rest_dense(
) -> TestResult {
    let Some(fixture) = fixture() else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let first = dir.path().join("model-00001-of-00002.safetensors");
    let second = dir.path().join("model-00002-of-00002.safetensors");
    let weight = fixture.tensors["weight"].clone();
    save(
        &first,
        vec![
            (
                "model.embed_tokens.weight",
                Tensor::randn(0f32, 1.0, (40, 256), &Device::Cpu)?.to_dtype(DType::BF16)?,
            ),
            ("model.layers.0.mlp.down_proj.weight", weight),
            (
                "model.layers.0.input_layernorm.weight",
                Tensor::ones(256, DType::BF16, &Device::Cpu)?,
            ),
        ],
    )?;
    save(
        &second,
        vec![
            (
                "model.layers.1.self_attn.q_proj.weight",
                Tensor::randn(0f32, 0.02, (64, 256), &Device::Cpu)?.to_dtype(DType::BF16)?,
            ),
            (
                "model.norm.weight",
                Tensor::ones(256, DType::BF16, &Device::Cpu)?,
            ),
            (
                "lm_head.weight",
                Tensor::randn(0f32, 1.0, (40, 256), &Device::Cpu)?.to_dtype(DType::BF16)?,
            ),
        ],
    )?;
    let base = quantize_checkpoint(
        &[first, second],
        &QuantConfig::default(),
        DType::BF16,
        &Device::Cpu,
    )?;
    let quantized: Vec<&str> = base.quantized.keys().map(String::as_str).collect();
    assert_eq!(
        quantized,
        [
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.1.self_attn.q_proj.weight"
        ]
    );
    let dense: Vec<&str> = base.dense.keys().map(String::as_str).collect();
    assert_eq!(
        dense,
        [
            "lm_head.weight",
            "model.embed_tokens.weight",
            "model.layers.0.input_layernorm.weight",
            "model.norm.weight"
        ]
    );
    assert!(base.dense.values().all(|t| t.dtype() == DType::BF16));
    let host = base.quantized["model.layers.0.mlp.down_proj.weight"].to_host()?;
    assert_eq!(host.dtype, DType::F32);
    assert_bytes_equal(&host.packed, &fixture.bytes("dq_packed"), "loaded packed");
    assert_bits_equal(
        &host.dequantize_f32(),
        &fixture.f32s("dq_dequantized"),
        "loaded dequantized",
    );
    assert_eq!(
        base.quantized["model.layers.1.self_attn.q_proj.weight"]
            .to_host()?
            .dtype,
        DType::BF16
    );
    Ok(())
}

fn state_json(double_quant: bool, offset: f32) -> Tensor {
    // As bitsandbytes' `pack_dict_to_tensor(QuantState.as_dict())`: JSON bytes in a u8 tensor.
    let mut state = serde_json::json!({
        "quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [192, 256],
    });
    if double_quant {
        state["nested_blocksize"] = 256.into();
        state["nested_dtype"] = "float32".into();
        state["nested_offset"] = f64::from(offset).into();
    }
    let bytes = serde_json::to_vec(&state).expect("JSON");
    let count = bytes.len();
    Tensor::from_vec(bytes, count, &Device::Cpu).expect("a u8 tensor")
}

/// A checkpoint in the exact layout transformers + bitsandbytes save (`save_pretrained` of a
/// 4-bit model), built from the fixture: one double-quantized and one plain 4-bit projection.
#[test]
fn reading_a_bitsandbytes_saved_checkpoint_dequantizes_like_bitsandbytes() -> TestResult {
    let Some(fixture) = fixture() else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "quantization_config": {
            "quant_method": "bitsandbytes", "load_in_4bit": true, "load_in_8bit": false,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": true,
            "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": null
        }
    });
    let parsed = bnb_quantization(&config, &dir.path().join("config.json"))?.expect("quantized");
    assert_eq!(parsed.quant_type, QuantType::Nf4);
    assert!(parsed.double_quant);
    assert_eq!(parsed.compute_dtype, Some(DType::BF16));
    let packed = |name: &str| -> Tensor {
        let bytes = fixture.bytes(name);
        let count = bytes.len();
        Tensor::from_vec(bytes, (count, 1), &Device::Cpu).expect("u8")
    };
    let nested = "model.layers.0.mlp.down_proj.weight";
    let plain = "model.layers.0.self_attn.q_proj.weight";
    let path = dir.path().join("model.safetensors");
    let name = |weight: &'static str, part: &str| -> &'static str {
        Box::leak(format!("{weight}{part}").into_boxed_str())
    };
    save(
        &path,
        vec![
            (nested, packed("dq_packed")),
            (
                name(nested, ".absmax"),
                fixture.tensors["dq_absmax_u8"].clone(),
            ),
            (name(nested, ".quant_map"), fixture.tensors["code"].clone()),
            (
                name(nested, ".nested_absmax"),
                fixture.tensors["dq_absmax_scale"].clone(),
            ),
            (
                name(nested, ".nested_quant_map"),
                fixture.tensors["dq_absmax_code"].clone(),
            ),
            (
                name(nested, ".quant_state.bitsandbytes__nf4"),
                state_json(true, fixture.offset),
            ),
            (plain, packed("packed")),
            (name(plain, ".absmax"), fixture.tensors["absmax"].clone()),
            (name(plain, ".quant_map"), fixture.tensors["code"].clone()),
            (
                name(plain, ".quant_state.bitsandbytes__nf4"),
                state_json(false, 0.0),
            ),
            (
                "model.norm.weight",
                Tensor::ones(256, DType::BF16, &Device::Cpu)?,
            ),
        ],
    )?;
    let base = load_bnb_checkpoint(&[path], DType::BF16, &Device::Cpu)?;
    let dense: Vec<&str> = base.dense.keys().map(String::as_str).collect();
    assert_eq!(dense, ["model.norm.weight"]);
    let read = |weight: &str| -> Result<Vec<f32>, candle_core::Error> {
        base.quantized[weight]
            .dequantize(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()
    };
    assert_bits_equal(
        &read(nested)?,
        &fixture.f32s("dq_dequantized"),
        "saved, double quant",
    );
    assert_bits_equal(
        &read(plain)?,
        &fixture.f32s("dequantized"),
        "saved, plain absmax",
    );
    assert_eq!(base.quantized[nested].original_dtype(), DType::BF16);
    assert!(is_quantized_linear(nested, &[192, 256]));
    Ok(())
}

#[test]
fn a_checkpoint_whose_state_disagrees_with_its_shape_is_a_clear_error() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("model.safetensors");
    let weight = "model.layers.0.mlp.up_proj.weight";
    let name =
        |part: &str| -> &'static str { Box::leak(format!("{weight}{part}").into_boxed_str()) };
    save(
        &path,
        vec![
            // 10 bytes = 20 values, but the state says [192, 256].
            (weight, Tensor::zeros((10, 1), DType::U8, &Device::Cpu)?),
            (name(".absmax"), Tensor::zeros(1, DType::F32, &Device::Cpu)?),
            (
                name(".quant_map"),
                Tensor::new(&QuantType::Nf4.code(), &Device::Cpu)?,
            ),
            (
                name(".quant_state.bitsandbytes__nf4"),
                state_json(false, 0.0),
            ),
        ],
    )?;
    let error = load_bnb_checkpoint(std::slice::from_ref(&path), DType::F32, &Device::Cpu)
        .expect_err("an inconsistent state is refused")
        .to_string();
    assert!(error.contains(&path.display().to_string()), "{error}");
    assert!(error.contains("packed bytes"), "{error}");
    Ok(())
}

/// A 16-bit weight is quantized from its own storage (widened inside the quantizer, no f32 copy)
/// to exactly the bytes its f32 widening gives; across several parallel tasks and a partial block.
#[test]
fn sixteen_bit_weights_quantize_like_their_f32_widening() -> TestResult {
    let count = 3 * 65_536 + 64 * 7 + 37;
    let values = Tensor::randn(0f32, 0.02, count, &Device::Cpu)?;
    for dtype in [DType::BF16, DType::F16] {
        let weight = values.to_dtype(dtype)?;
        let widened = weight.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        for config in [
            QuantConfig::default(),
            QuantConfig {
                quant_type: peftpipe::quant::QuantType::Fp4,
                double_quant: false,
                ..QuantConfig::default()
            },
        ] {
            let direct = QuantizedTensor::from_tensor(&weight, &config)?;
            let reference = QuantizedTensor::quantize(&widened, &[count], dtype, &config)?;
            assert_eq!(direct.dtype, dtype);
            assert_bytes_equal(&direct.packed, &reference.packed, "packed codes");
            assert_bits_equal(&direct.absmax_f32(), &reference.absmax_f32(), "absmax");
        }
    }
    Ok(())
}
