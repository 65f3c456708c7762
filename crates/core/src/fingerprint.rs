//! Stage fingerprints: the one declared struct whose canonical JSON is hashed (blake3) to decide
//! whether a stage's cached output can be reused, and [`DirtyReason`], the cargo-style explanation
//! of why it cannot (`parameter template.k changed (3 → 4)`).
//!
//! What is hashed is exactly the fields of [`StageFingerprint`], nothing else: stage name (it
//! seeds the stage's random streams), stage kind, resolved parameters (flattened to key paths, values kept so a change can be shown), upstream
//! output digests by stage name, input file content digests by their stable key, tool version,
//! seed and the result-changing environment. Never absolute paths, mtimes or secrets.
//!
//! This module knows nothing of the cache layout, of how files are hashed (the caller passes
//! digests) or of candle/arrow. It never does I/O except reading the test-only version override.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::config::StageConfig;

/// Version of the fingerprint encoding. Bump it (with a line below) whenever the meaning of a
/// field or the encoding changes, so every stored fingerprint is invalidated at once.
///
/// - 1: kind, flattened params, upstream digests, input digests, tool version, seed, environment.
/// - 2: plus the stage name, which seeds the stage's random streams (`StageContext::stage_seed`):
///   under version 1 a renamed stage was restored with the output of its old name's seeds.
pub const FINGERPRINT_VERSION: u32 = 2;

/// Test-only: when set, replaces [`crate::TOOL_BUILD`] in fingerprints so tests can simulate an
/// upgrade of peftpipe. Not meant for users (it would make cached outputs lie about their origin).
pub const VERSION_OVERRIDE_ENV: &str = "PEFTPIPE_VERSION_OVERRIDE";

/// Environment variables that choose which CUDA kernels run (`PEFTPIPE_FUSED`, `PEFTPIPE_UNFUSED`:
/// fused kernels off; `PEFTPIPE_FLASH`: the flash-attention family; `PEFTPIPE_QGEMM`: fused 4-bit
/// GEMM or dequantize + cuBLAS). Each family computes the same function with sums in another
/// order, so the last bits of a CUDA stage's output depend on them: when set (non-empty) they are
/// part of the environment of stages that run on CUDA.
pub const KERNEL_SWITCHES: [&str; 4] = [
    "PEFTPIPE_FUSED",
    "PEFTPIPE_UNFUSED",
    "PEFTPIPE_FLASH",
    "PEFTPIPE_QGEMM",
];

/// The [`KERNEL_SWITCHES`] set in this process (trimmed, empty ones left out).
pub fn kernel_switches() -> BTreeMap<String, String> {
    KERNEL_SWITCHES
        .iter()
        .filter_map(|name| {
            let value = std::env::var(name).ok()?;
            let value = value.trim();
            (!value.is_empty()).then(|| (name.to_string(), value.to_string()))
        })
        .collect()
}

/// The tool version that goes into fingerprints (see [`VERSION_OVERRIDE_ENV`]).
pub fn tool_version() -> String {
    match std::env::var(VERSION_OVERRIDE_ENV) {
        Ok(version) if !version.is_empty() => version,
        _ => crate::TOOL_BUILD.to_string(),
    }
}

/// Everything that decides a stage's output. Two runs with equal fingerprints must produce
/// interchangeable outputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageFingerprint {
    /// [`FINGERPRINT_VERSION`] when this was computed.
    pub version: u32,
    /// The stage's name in the pipeline: stages derive their random streams (split, shuffle,
    /// few-shot draws, LoRA init, data order, dropout) from the pipeline seed and their name, so
    /// the name changes results. Empty in entries written before version 2.
    #[serde(default)]
    pub stage: String,
    /// Stage kind (`ingest`, `template`, ...).
    pub kind: String,
    /// Resolved parameters, flattened to key paths relative to the stage (`template.k`,
    /// `ingest.filters[0].column`), with their values.
    pub params: BTreeMap<String, serde_json::Value>,
    /// Upstream stage name → that stage's output digest.
    pub upstream: BTreeMap<String, String>,
    /// Input file key (path as written, normalized) → blake3 of its content.
    pub inputs: BTreeMap<String, String>,
    /// peftpipe's build identity ([`crate::TOOL_BUILD`]: version and source digest).
    pub tool_version: String,
    /// Pipeline seed.
    pub seed: u64,
    /// Result-changing environment (device kind, dtype), from `StageSpec::environment`.
    pub environment: BTreeMap<String, String>,
}

impl StageFingerprint {
    /// The fingerprint of the stage `name` with `config`, given its upstream output digests and
    /// input file digests. Input keys are normalized (see [`normalize_key`]).
    pub fn new(
        name: &str,
        config: &StageConfig,
        upstream: BTreeMap<String, String>,
        inputs: impl IntoIterator<Item = (String, String)>,
        seed: u64,
    ) -> Self {
        let kind = config.kind().as_str().to_string();
        let mut params = BTreeMap::new();
        flatten_params(&kind, &config.params(), &mut params);
        StageFingerprint {
            version: FINGERPRINT_VERSION,
            stage: name.to_string(),
            kind,
            params,
            upstream,
            inputs: inputs
                .into_iter()
                .map(|(key, digest)| (normalize_key(&key), digest))
                .collect(),
            tool_version: tool_version(),
            seed,
            environment: config.spec().environment(),
        }
    }

    /// Apply the run's `--device` override: a stage whose environment has a `device` component
    /// gets the override's device kind (`cuda:1` → `cuda`; the index does not change results).
    /// A stage that then runs on CUDA also records the process's kernel switches
    /// ([`KERNEL_SWITCHES`]), so a run with other kernels is not restored from this one's cache.
    pub fn with_device_override(self, device: Option<&str>) -> Self {
        self.with_device_environment(device, &kernel_switches())
    }

    /// [`Self::with_device_override`] with the kernel switches given (`name → value`, as
    /// [`kernel_switches`] reads them).
    pub fn with_device_environment(
        mut self,
        device: Option<&str>,
        switches: &BTreeMap<String, String>,
    ) -> Self {
        if let (Some(device), Some(slot)) = (device, self.environment.get_mut("device")) {
            // `auto` is the kind this build selects, as the stage resolves it.
            let kind = crate::config::train::device_kind(device)
                .unwrap_or_else(|_| device.split(':').next().unwrap_or(device));
            *slot = kind.to_string();
            // The dtype an `auto` setting resolves to follows the device the stage now runs on.
            let setting = self
                .params
                .get(&format!("{}.dtype", self.kind))
                .and_then(|value| {
                    serde_json::from_value::<crate::config::train::DTypeChoice>(value.clone()).ok()
                });
            if let (Some(setting), Some(dtype)) = (setting, self.environment.get_mut("dtype")) {
                *dtype = setting.resolve(kind).to_string();
            }
        }
        if self.environment.get("device").map(String::as_str) == Some("cuda") {
            for (name, value) in switches {
                self.environment.insert(name.clone(), value.clone());
            }
        }
        self
    }

    /// Canonical JSON: objects with sorted keys, no whitespace.
    pub fn canonical_json(&self) -> String {
        // Serializing a struct of strings, integers and JSON values cannot fail.
        let value = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        canonical_json(&value)
    }

    /// blake3 of the canonical JSON, hex.
    pub fn digest(&self) -> String {
        blake3::hash(self.canonical_json().as_bytes())
            .to_hex()
            .to_string()
    }

    /// Why `self` (the current fingerprint) differs from `previous`, one reason per changed
    /// component, in a stable order. Empty when they are equal.
    pub fn diff(&self, previous: &StageFingerprint) -> Vec<DirtyReason> {
        let mut reasons = Vec::new();
        if self.version != previous.version {
            reasons.push(DirtyReason::FingerprintVersionChanged {
                old: previous.version,
                new: self.version,
            });
        }
        if self.tool_version != previous.tool_version {
            reasons.push(DirtyReason::ToolVersionChanged {
                old: previous.tool_version.clone(),
                new: self.tool_version.clone(),
            });
        }
        // Entries of version 1 have no name: the version change already says why.
        if self.stage != previous.stage && !previous.stage.is_empty() {
            reasons.push(DirtyReason::StageRenamed {
                old: previous.stage.clone(),
                new: self.stage.clone(),
            });
        }
        if self.kind != previous.kind {
            reasons.push(DirtyReason::KindChanged {
                old: previous.kind.clone(),
                new: self.kind.clone(),
            });
        }
        for (key, change) in diff_maps(&previous.params, &self.params) {
            reasons.push(match change {
                Change::Changed(old, new) => DirtyReason::ParameterChanged {
                    key,
                    old: old.clone(),
                    new: new.clone(),
                },
                Change::Added(new) => DirtyReason::ParameterAdded {
                    key,
                    value: new.clone(),
                },
                Change::Removed(old) => DirtyReason::ParameterRemoved {
                    key,
                    value: old.clone(),
                },
            });
        }
        if self.seed != previous.seed {
            reasons.push(DirtyReason::SeedChanged {
                old: previous.seed,
                new: self.seed,
            });
        }
        for (key, change) in diff_maps(&previous.environment, &self.environment) {
            let (old, new) = match change {
                Change::Changed(old, new) => (Some(old.clone()), Some(new.clone())),
                Change::Added(new) => (None, Some(new.clone())),
                Change::Removed(old) => (Some(old.clone()), None),
            };
            reasons.push(DirtyReason::EnvironmentChanged { key, old, new });
        }
        for (stage, change) in diff_maps(&previous.upstream, &self.upstream) {
            reasons.push(match change {
                Change::Changed(..) => DirtyReason::UpstreamRebuilt { stage },
                Change::Added(_) => DirtyReason::UpstreamAdded { stage },
                Change::Removed(_) => DirtyReason::UpstreamRemoved { stage },
            });
        }
        for (path, change) in diff_maps(&previous.inputs, &self.inputs) {
            reasons.push(match change {
                Change::Changed(..) => DirtyReason::InputChanged { path },
                Change::Added(_) => DirtyReason::InputAdded { path },
                Change::Removed(_) => DirtyReason::InputRemoved { path },
            });
        }
        reasons
    }
}

enum Change<'a, V> {
    Changed(&'a V, &'a V),
    Added(&'a V),
    Removed(&'a V),
}

fn diff_maps<'a, V: PartialEq>(
    old: &'a BTreeMap<String, V>,
    new: &'a BTreeMap<String, V>,
) -> Vec<(String, Change<'a, V>)> {
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|key| match (old.get(key), new.get(key)) {
            (Some(a), Some(b)) if a != b => Some((key.clone(), Change::Changed(a, b))),
            (None, Some(b)) => Some((key.clone(), Change::Added(b))),
            (Some(a), None) => Some((key.clone(), Change::Removed(a))),
            _ => None,
        })
        .collect()
}

/// Flatten a JSON value into `prefix.key` / `prefix[index]` paths → leaf values. Empty objects
/// and arrays are leaves (so `[]` → `[1]` is visible as a change).
pub fn flatten_params(
    prefix: &str,
    value: &serde_json::Value,
    out: &mut BTreeMap<String, serde_json::Value>,
) {
    match value {
        serde_json::Value::Object(map) if !map.is_empty() => {
            for (key, inner) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten_params(&path, inner, out);
            }
        }
        serde_json::Value::Array(items) if !items.is_empty() => {
            for (index, inner) in items.iter().enumerate() {
                flatten_params(&format!("{prefix}[{index}]"), inner, out);
            }
        }
        leaf => {
            out.insert(prefix.to_string(), leaf.clone());
        }
    }
}

/// JSON with object keys sorted at every level and no insignificant whitespace.
pub fn canonical_json(value: &serde_json::Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (index, (key, inner)) in entries.into_iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(inner, out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (index, inner) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_canonical(inner, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// A machine-independent spelling of a relative path key: `/` separators, no `.` components,
/// no repeated or trailing separators, `a/../` folded lexically. `./data//x.parquet` and
/// `data/x.parquet` give the same key.
pub fn normalize_key(key: &str) -> String {
    let unified = key.replace('\\', "/");
    let absolute = unified.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in unified.split('/') {
        match part {
            "" | "." => {}
            ".." => match parts.last() {
                Some(last) if *last != ".." => {
                    parts.pop();
                }
                _ if absolute => {}
                _ => parts.push(".."),
            },
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    if absolute {
        format!("/{joined}")
    } else if joined.is_empty() {
        ".".to_string()
    } else {
        joined
    }
}

/// Why a stage must run instead of being restored from the cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum DirtyReason {
    /// No previous run recorded in the lock file.
    NeverRun,
    /// `--force`.
    Forced,
    /// The lock file names an output the cache no longer has.
    OutputMissing,
    /// The cached output failed its digest check.
    OutputCorrupted {
        detail: String,
    },
    /// The cached output is intact but a published copy of it is not (deleted, edited,
    /// overwritten, never published here): the stage is republished, not rerun.
    PublishedOutputStale {
        path: String,
        detail: String,
    },
    /// What the last publish decided on this machine (an adapter's `base_model_name_or_path`)
    /// is not what publishing would write now: republished, not rerun.
    PublishContextChanged {
        key: String,
        old: String,
        new: String,
    },
    FingerprintVersionChanged {
        old: u32,
        new: u32,
    },
    ToolVersionChanged {
        old: String,
        new: String,
    },
    /// The stage's name, which seeds its random streams, differs.
    StageRenamed {
        old: String,
        new: String,
    },
    KindChanged {
        old: String,
        new: String,
    },
    ParameterChanged {
        key: String,
        old: serde_json::Value,
        new: serde_json::Value,
    },
    ParameterAdded {
        key: String,
        value: serde_json::Value,
    },
    ParameterRemoved {
        key: String,
        value: serde_json::Value,
    },
    SeedChanged {
        old: u64,
        new: u64,
    },
    EnvironmentChanged {
        key: String,
        old: Option<String>,
        new: Option<String>,
    },
    /// The upstream stage's output digest differs from the one this stage was built from.
    UpstreamRebuilt {
        stage: String,
    },
    /// The upstream stage is itself dirty, so this stage's input will change (plan only).
    UpstreamDirty {
        stage: String,
    },
    UpstreamAdded {
        stage: String,
    },
    UpstreamRemoved {
        stage: String,
    },
    InputChanged {
        path: String,
    },
    InputAdded {
        path: String,
    },
    InputRemoved {
        path: String,
    },
}

/// A parameter value for a reason line: JSON, cut to a readable length.
fn show_value(value: &serde_json::Value) -> String {
    const LIMIT: usize = 60;
    let text = value.to_string();
    if text.chars().count() <= LIMIT {
        text
    } else {
        let cut: String = text.chars().take(LIMIT - 1).collect();
        format!("{cut}…")
    }
}

impl fmt::Display for DirtyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirtyReason::NeverRun => f.write_str("never run"),
            DirtyReason::Forced => f.write_str("forced"),
            DirtyReason::OutputMissing => f.write_str("output missing from cache"),
            DirtyReason::OutputCorrupted { detail } => {
                write!(f, "cached output corrupted ({detail})")
            }
            DirtyReason::PublishedOutputStale { path, detail } => {
                if detail.starts_with("is ") || detail.starts_with("was ") {
                    write!(f, "published output {path} {detail}")
                } else {
                    write!(f, "published output {path} changed ({detail})")
                }
            }
            DirtyReason::PublishContextChanged { key, old, new } => {
                write!(f, "published with {key} {old}, now {new}")
            }
            DirtyReason::FingerprintVersionChanged { old, new } => {
                write!(f, "fingerprint format changed ({old} → {new})")
            }
            DirtyReason::ToolVersionChanged { old, new } => {
                write!(f, "peftpipe version changed ({old} → {new})")
            }
            DirtyReason::StageRenamed { old, new } => write!(
                f,
                "stage name changed ({old} → {new}; the name seeds its randomness)"
            ),
            DirtyReason::KindChanged { old, new } => {
                write!(f, "stage kind changed ({old} → {new})")
            }
            DirtyReason::ParameterChanged { key, old, new } => write!(
                f,
                "parameter {key} changed ({} → {})",
                show_value(old),
                show_value(new)
            ),
            DirtyReason::ParameterAdded { key, value } => {
                write!(f, "parameter {key} added ({})", show_value(value))
            }
            DirtyReason::ParameterRemoved { key, value } => {
                write!(f, "parameter {key} removed (was {})", show_value(value))
            }
            DirtyReason::SeedChanged { old, new } => write!(f, "seed changed ({old} → {new})"),
            DirtyReason::EnvironmentChanged { key, old, new } => write!(
                f,
                "environment {key} changed ({} → {})",
                old.as_deref().unwrap_or("unset"),
                new.as_deref().unwrap_or("unset")
            ),
            DirtyReason::UpstreamRebuilt { stage } => {
                write!(f, "upstream stage {stage} was rebuilt")
            }
            DirtyReason::UpstreamDirty { stage } => {
                write!(f, "upstream stage {stage} is dirty")
            }
            DirtyReason::UpstreamAdded { stage } => {
                write!(f, "now reads upstream stage {stage}")
            }
            DirtyReason::UpstreamRemoved { stage } => {
                write!(f, "no longer reads upstream stage {stage}")
            }
            DirtyReason::InputChanged { path } => write!(f, "the file {path} changed"),
            DirtyReason::InputAdded { path } => write!(f, "now reads the file {path}"),
            DirtyReason::InputRemoved { path } => write!(f, "no longer reads the file {path}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn fingerprint(params: serde_json::Value) -> StageFingerprint {
        let mut flat = BTreeMap::new();
        flatten_params("template", &params, &mut flat);
        StageFingerprint {
            version: FINGERPRINT_VERSION,
            stage: "prompts".into(),
            kind: "template".into(),
            params: flat,
            upstream: BTreeMap::from([("data".to_string(), "aa".to_string())]),
            inputs: BTreeMap::from([("datasets/x.parquet".to_string(), "11".to_string())]),
            tool_version: "0.1.0".into(),
            seed: 7,
            environment: BTreeMap::new(),
        }
    }

    #[test]
    fn flatten_uses_dots_for_keys_and_brackets_for_items() {
        let mut flat = BTreeMap::new();
        flatten_params(
            "ingest",
            &json!({"filters": [{"column": "a"}], "limit": 3, "drop": [], "rename": {}}),
            &mut flat,
        );
        let keys: Vec<&str> = flat.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "ingest.drop",
                "ingest.filters[0].column",
                "ingest.limit",
                "ingest.rename"
            ]
        );
        assert_eq!(flat["ingest.drop"], json!([]));
    }

    #[test]
    fn parameter_change_is_displayed_cargo_style() {
        let old = fingerprint(json!({"k": 3, "input": "data"}));
        let new = fingerprint(json!({"k": 4, "input": "data"}));
        let reasons = new.diff(&old);
        assert_eq!(reasons.len(), 1);
        assert_eq!(
            reasons[0].to_string(),
            "parameter template.k changed (3 → 4)"
        );
        assert_ne!(old.digest(), new.digest());
    }

    #[test]
    fn every_component_change_has_its_reason() {
        let old = fingerprint(json!({"k": 3}));
        let mut new = old.clone();
        new.tool_version = "0.2.0".into();
        new.stage = "prompts_v2".into();
        new.seed = 8;
        new.upstream.insert("data".into(), "bb".into());
        new.inputs.insert("datasets/x.parquet".into(), "22".into());
        new.inputs.insert("datasets/y.parquet".into(), "33".into());
        new.environment.insert("device".into(), "cuda".into());
        new.params.remove("template.k");
        let lines: Vec<String> = new.diff(&old).iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "peftpipe version changed (0.1.0 → 0.2.0)",
                "stage name changed (prompts → prompts_v2; the name seeds its randomness)",
                "parameter template.k removed (was 3)",
                "seed changed (7 → 8)",
                "environment device changed (unset → cuda)",
                "upstream stage data was rebuilt",
                "the file datasets/x.parquet changed",
                "now reads the file datasets/y.parquet",
            ]
        );
    }

    #[test]
    fn the_stage_name_is_part_of_the_digest() {
        // Stages seed their randomness from their name: a renamed stage must not be restored
        // from the output of its old name.
        let train = fingerprint(json!({"k": 3}));
        let mut finetune = train.clone();
        finetune.stage = "finetune".into();
        assert_ne!(train.digest(), finetune.digest());
        assert_eq!(finetune.diff(&train).len(), 1);
    }

    #[test]
    fn entries_of_version_1_read_back_and_differ_by_version_only() {
        let current = fingerprint(json!({"k": 3}));
        let mut value = serde_json::to_value(&current).unwrap();
        let object = value.as_object_mut().unwrap();
        object.remove("stage");
        object.insert("version".into(), json!(1));
        let old: StageFingerprint = serde_json::from_value(value).unwrap();
        assert_eq!(old.stage, "");
        assert_ne!(old.digest(), current.digest());
        let lines: Vec<String> = current.diff(&old).iter().map(ToString::to_string).collect();
        assert_eq!(lines, ["fingerprint format changed (1 → 2)"]);
    }

    #[test]
    fn equal_fingerprints_have_no_reasons() {
        let a = fingerprint(json!({"k": 3}));
        assert!(a.diff(&a.clone()).is_empty());
    }

    #[test]
    fn device_override_replaces_the_device_kind_only_where_it_matters() {
        let mut with_device = fingerprint(json!({"k": 3}));
        with_device
            .environment
            .insert("device".into(), "cpu".into());
        let overridden = with_device.clone().with_device_override(Some("cuda:1"));
        assert_eq!(overridden.environment["device"], "cuda");
        assert_eq!(
            overridden.diff(&with_device)[0].to_string(),
            "environment device changed (cpu → cuda)"
        );
        let data_stage = fingerprint(json!({"k": 3}));
        assert_eq!(
            data_stage.clone().with_device_override(Some("cuda")),
            data_stage
        );
    }

    #[test]
    fn a_device_override_resolves_an_auto_dtype_for_the_new_device() {
        let mut train = fingerprint(json!({"k": 3}));
        train.kind = "train".into();
        train.environment.insert("device".into(), "cpu".into());
        train.environment.insert("dtype".into(), "f32".into());
        for (setting, on_cuda) in [("auto", "bf16"), ("f32", "f32"), ("f16", "f16")] {
            let mut stage = train.clone();
            stage.params.insert("train.dtype".into(), json!(setting));
            let moved = stage.with_device_environment(Some("cuda:0"), &BTreeMap::new());
            assert_eq!(moved.environment["device"], "cuda", "{setting}");
            assert_eq!(moved.environment["dtype"], on_cuda, "{setting}");
        }
    }

    #[test]
    fn kernel_switches_are_part_of_cuda_stages_only() {
        let switches = BTreeMap::from([("PEFTPIPE_FLASH".to_string(), "mma".to_string())]);
        let mut train = fingerprint(json!({"k": 3}));
        train.environment.insert("device".into(), "cuda".into());
        let default = train
            .clone()
            .with_device_environment(None, &BTreeMap::new());
        assert_eq!(
            default, train,
            "no switch set: the fingerprint is unchanged"
        );
        let switched = train.clone().with_device_environment(None, &switches);
        assert_ne!(switched, default);
        assert_eq!(
            switched.diff(&default)[0].to_string(),
            "environment PEFTPIPE_FLASH changed (unset → mma)"
        );
        // A CPU stage, and one moved to the CPU by --device, ignore them; one moved to CUDA
        // takes them.
        let mut cpu = fingerprint(json!({"k": 3}));
        cpu.environment.insert("device".into(), "cpu".into());
        assert_eq!(cpu.clone().with_device_environment(None, &switches), cpu);
        assert_eq!(
            train
                .clone()
                .with_device_environment(Some("cpu"), &switches)
                .environment["device"],
            "cpu"
        );
        assert!(!train
            .with_device_environment(Some("cpu"), &switches)
            .environment
            .contains_key("PEFTPIPE_FLASH"));
        let moved = cpu.with_device_environment(Some("cuda:0"), &switches);
        assert_eq!(moved.environment["PEFTPIPE_FLASH"], "mma");
        let data_stage = fingerprint(json!({"k": 3}));
        assert_eq!(
            data_stage
                .clone()
                .with_device_environment(Some("cuda"), &switches),
            data_stage
        );
    }

    #[test]
    fn long_values_are_cut() {
        let reason = DirtyReason::ParameterChanged {
            key: "template.prompt".into(),
            old: json!("x".repeat(200)),
            new: json!("y"),
        };
        let text = reason.to_string();
        assert!(text.chars().count() < 120, "{text}");
        assert!(text.contains('…'));
    }

    #[test]
    fn normalize_key_folds_spellings() {
        assert_eq!(normalize_key("./datasets//x.parquet"), "datasets/x.parquet");
        assert_eq!(normalize_key("datasets\\x.parquet"), "datasets/x.parquet");
        assert_eq!(normalize_key("a/b/../x"), "a/x");
        assert_eq!(normalize_key("../shared/x"), "../shared/x");
        assert_eq!(
            normalize_key("${PEFTPIPE_SHARED}/x/"),
            "${PEFTPIPE_SHARED}/x"
        );
    }

    #[test]
    fn fingerprint_round_trips_through_json() {
        let a = fingerprint(json!({"k": 3, "weights": [0.5, 1e-3]}));
        let text = serde_json::to_string(&a).unwrap();
        let back: StageFingerprint = serde_json::from_str(&text).unwrap();
        assert_eq!(a, back);
        assert_eq!(a.digest(), back.digest());
    }

    /// A JSON object with the same entries in a different insertion order.
    fn reorder(value: &serde_json::Value, rotate: usize) -> serde_json::Value {
        match value {
            serde_json::Value::Object(map) => {
                let mut entries: Vec<(String, serde_json::Value)> = map
                    .iter()
                    .map(|(k, v)| (k.clone(), reorder(v, rotate + 1)))
                    .collect();
                if !entries.is_empty() {
                    let by = rotate % entries.len();
                    entries.rotate_left(by);
                    entries.reverse();
                }
                serde_json::Value::Object(entries.into_iter().collect())
            }
            serde_json::Value::Array(items) => {
                serde_json::Value::Array(items.iter().map(|v| reorder(v, rotate + 1)).collect())
            }
            other => other.clone(),
        }
    }

    fn json_leaf() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            any::<i64>().prop_map(serde_json::Value::from),
            any::<bool>().prop_map(serde_json::Value::from),
            "[a-z0-9 ]{0,8}".prop_map(serde_json::Value::from),
            (-1e6f64..1e6).prop_map(serde_json::Value::from),
        ]
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        json_leaf().prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
                prop::collection::btree_map("[a-z]{1,6}", inner, 0..5)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Spell a relative path differently without changing what it names.
    fn respell(path: &str, style: u8) -> String {
        match style % 4 {
            0 => path.to_string(),
            1 => format!("./{path}"),
            2 => path.replace('/', "//"),
            _ => path.replace('/', "/./"),
        }
    }

    proptest! {
        #[test]
        fn fingerprint_is_deterministic(
            params in prop::collection::btree_map("[a-z]{1,6}", json_value(), 0..6),
            files in prop::collection::btree_map("[a-z]{1,5}/[a-z]{1,5}\\.parquet", "[0-9a-f]{8}", 0..5),
            upstream in prop::collection::btree_map("[a-z]{1,6}", "[0-9a-f]{8}", 0..3),
            rotate in 0usize..7,
            style in any::<u8>(),
            seed in any::<u64>(),
        ) {
            let params = serde_json::Value::Object(params.into_iter().collect());
            let build = |params: &serde_json::Value, inputs: Vec<(String, String)>, upstream: Vec<(String, String)>| {
                let mut flat = BTreeMap::new();
                flatten_params("template", params, &mut flat);
                StageFingerprint {
                    version: FINGERPRINT_VERSION,
                    stage: "prompts".into(),
                    kind: "template".into(),
                    params: flat,
                    upstream: upstream.into_iter().collect(),
                    inputs: inputs.into_iter().map(|(k, d)| (normalize_key(&k), d)).collect(),
                    tool_version: "0.1.0".into(),
                    seed,
                    environment: BTreeMap::new(),
                }
            };
            let plain = build(
                &params,
                files.iter().map(|(k, d)| (k.clone(), d.clone())).collect(),
                upstream.iter().map(|(k, d)| (k.clone(), d.clone())).collect(),
            );
            let mut shuffled_files: Vec<(String, String)> =
                files.iter().map(|(k, d)| (respell(k, style), d.clone())).collect();
            shuffled_files.reverse();
            let mut shuffled_upstream: Vec<(String, String)> =
                upstream.iter().map(|(k, d)| (k.clone(), d.clone())).collect();
            shuffled_upstream.reverse();
            let shuffled = build(&reorder(&params, rotate), shuffled_files, shuffled_upstream);
            prop_assert_eq!(plain.digest(), shuffled.digest());
            prop_assert!(shuffled.diff(&plain).is_empty());
            // Computing twice gives the same bytes.
            prop_assert_eq!(plain.canonical_json(), plain.clone().canonical_json());
        }

        #[test]
        fn any_changed_parameter_changes_the_digest(
            k in any::<i64>(),
            other in any::<i64>(),
        ) {
            prop_assume!(k != other);
            let a = fingerprint(serde_json::json!({"k": k}));
            let b = fingerprint(serde_json::json!({"k": other}));
            prop_assert_ne!(a.digest(), b.digest());
            prop_assert_eq!(b.diff(&a).len(), 1);
        }
    }
}
