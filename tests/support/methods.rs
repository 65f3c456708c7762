//! Methods made the way a pipeline makes them: a `method:` block as written in YAML, turned into a
//! fresh adapter through the registry (`peft::new_adapter`). Shared by the conformance table
//! (tests/methods.rs), the device table (tests/device.rs) and the PEFT cross-check
//! (tests/peft_python.rs), so a method is spelled once per table and built one way.

use candle_core::Device;
use peftpipe::config::method::MethodConfig;
use peftpipe::peft::{new_adapter, Adapter, MethodContext};

/// A method config as a pipeline writes it under `method:` (YAML, e.g. `lora: {r: 4}`).
pub fn method_config(yaml: &str) -> MethodConfig {
    let value: serde_json::Value =
        serde_norway::from_str(yaml).unwrap_or_else(|error| panic!("YAML of `{yaml}`: {error}"));
    serde_json::from_value(value).unwrap_or_else(|error| panic!("method `{yaml}`: {error}"))
}

/// The tokenizer stand-in for prompt tuning's `init: text`: each byte to an id in 3..33 (inside
/// every test model's vocabulary).
pub fn byte_tokenize(text: &str) -> Result<Vec<u32>, String> {
    Ok(text.bytes().map(|b| 3 + u32::from(b) % 30).collect())
}

/// A fresh adapter (training mode) for `yaml` on a model with `model_config` (its config.json),
/// on `device`, through the registry; the registry's error when it refuses the pair.
pub fn try_new_method(
    yaml: &str,
    model_config: &serde_json::Value,
    device: &Device,
    seed: u64,
) -> Result<Box<dyn Adapter>, peftpipe::peft::PeftError> {
    new_adapter(
        &method_config(yaml),
        &MethodContext {
            model_config,
            device,
            seed,
            tokenize: Some(&byte_tokenize),
        },
    )
}

/// [`try_new_method`] that panics with the method and the error.
pub fn new_method(
    yaml: &str,
    model_config: &serde_json::Value,
    device: &Device,
    seed: u64,
) -> Box<dyn Adapter> {
    try_new_method(yaml, model_config, device, seed)
        .unwrap_or_else(|error| panic!("{yaml}: {error}"))
}
