//! PEFT's auxiliary trainable modules, which ride along with a method rather than being one:
//! `trainable_token_indices` (PEFT's `TrainableTokensWrapper`: only the chosen rows of the
//! embedding train) and `modules_to_save` (PEFT's `ModulesToSaveWrapper`: a full trainable copy of
//! a module: the input embedding, `lm_head` or a normalization layer). This file owns their config type, PEFT's rules for which model modules they name
//! (resolved against a model's config.json alone) and their checks; the method configs in
//! `method.rs` carry the fields, `peft::auxiliary` in the main crate trains them. Never loads
//! weights or knows tensors.

use std::borrow::Cow;
use std::collections::BTreeMap;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::probe::LinearLayerShape;
use super::Problem;

/// `trainable_token_indices` as written: a list of token ids (rows of the model's input
/// embedding) or PEFT's mapping `{module name: [ids]}` (`{embed_tokens: [2]}`, `{lm_head: [2]}`).
#[derive(Debug, Clone, PartialEq)]
pub enum TrainableTokenIndices {
    List(Vec<u32>),
    Modules(BTreeMap<String, Vec<u32>>),
}

impl Serialize for TrainableTokenIndices {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            TrainableTokenIndices::List(ids) => ids.serialize(serializer),
            TrainableTokenIndices::Modules(modules) => modules.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for TrainableTokenIndices {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IndicesVisitor;
        impl<'de> Visitor<'de> for IndicesVisitor {
            type Value = TrainableTokenIndices;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of token ids, or `{module name: [token ids]}`")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut ids = Vec::new();
                while let Some(id) = seq.next_element::<u32>()? {
                    ids.push(id);
                }
                Ok(TrainableTokenIndices::List(ids))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut modules = BTreeMap::new();
                while let Some(name) = map.next_key::<String>()? {
                    let ids = map.next_value::<Vec<u32>>()?;
                    if modules.insert(name.clone(), ids).is_some() {
                        return Err(de::Error::custom(format!("module `{name}` is given twice")));
                    }
                }
                Ok(TrainableTokenIndices::Modules(modules))
            }
        }
        deserializer.deserialize_any(IndicesVisitor)
    }
}

impl JsonSchema for TrainableTokenIndices {
    fn schema_name() -> Cow<'static, str> {
        "TrainableTokenIndices".into()
    }

    fn json_schema(_generator: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "Token ids whose embedding rows train (PEFT's `trainable_token_indices`): a list (rows of the input embedding; a tied lm_head follows), or `{module: [ids]}` naming `embed_tokens` and/or `lm_head`.",
            "oneOf": [
                {"type": "array", "items": {"type": "integer", "minimum": 0}},
                {
                    "type": "object",
                    "additionalProperties": {"type": "array", "items": {"type": "integer", "minimum": 0}}
                }
            ]
        })
    }
}

/// What a module of the model is, for the auxiliary rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleKind {
    /// The input token embedding (`model.embed_tokens`, `transformer.wte`).
    Embedding,
    /// The output projection `lm_head`.
    Head,
    /// A normalization layer.
    Norm,
    /// Anything else (a linear layer, a block, an activation).
    Other,
}

/// The Hugging Face module names of a model as `named_modules()` lists them (without PEFT's
/// `base_model.model.` prefix), with their kind. Llama family unless `model_type` is `gpt2`.
pub fn model_modules(model_type: &str, num_layers: usize) -> Vec<(String, ModuleKind)> {
    use ModuleKind::*;
    let mut modules = Vec::new();
    let mut add = |name: String, kind| modules.push((name, kind));
    if model_type == "gpt2" {
        add("transformer".into(), Other);
        add("transformer.wte".into(), Embedding);
        add("transformer.wpe".into(), Other);
        add("transformer.drop".into(), Other);
        add("transformer.h".into(), Other);
        for i in 0..num_layers {
            let block = format!("transformer.h.{i}");
            for (child, kind) in [
                ("", Other),
                (".ln_1", Norm),
                (".attn", Other),
                (".attn.c_attn", Other),
                (".attn.c_proj", Other),
                (".attn.attn_dropout", Other),
                (".attn.resid_dropout", Other),
                (".ln_2", Norm),
                (".mlp", Other),
                (".mlp.c_fc", Other),
                (".mlp.c_proj", Other),
                (".mlp.act", Other),
                (".mlp.dropout", Other),
            ] {
                add(format!("{block}{child}"), kind);
            }
        }
        add("transformer.ln_f".into(), Norm);
    } else {
        add("model".into(), Other);
        add("model.embed_tokens".into(), Embedding);
        add("model.layers".into(), Other);
        for i in 0..num_layers {
            let layer = format!("model.layers.{i}");
            for (child, kind) in [
                ("", Other),
                (".self_attn", Other),
                (".self_attn.q_proj", Other),
                (".self_attn.k_proj", Other),
                (".self_attn.v_proj", Other),
                (".self_attn.o_proj", Other),
                (".mlp", Other),
                (".mlp.gate_proj", Other),
                (".mlp.up_proj", Other),
                (".mlp.down_proj", Other),
                (".mlp.act_fn", Other),
                (".input_layernorm", Norm),
                (".post_attention_layernorm", Norm),
            ] {
                add(format!("{layer}{child}"), kind);
            }
        }
        add("model.norm".into(), Norm);
        add("model.rotary_emb".into(), Other);
    }
    add("lm_head".into(), Head);
    modules
}

/// What the auxiliary fields ask of one model, resolved with PEFT's rules
/// (`peft.utils.other.set_additional_trainable_modules` and `_set_trainable`: a name matches
/// every module whose name ends with it; a list of token ids targets the input embedding; with
/// tied embeddings an `lm_head` given the same ids as the embedding follows it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvedAuxiliary {
    /// Rows of the input embedding that train (sorted as given), with the module's name.
    pub embedding_tokens: Option<Vec<u32>>,
    /// Rows of `lm_head` that train on their own (an untied head, or a tied one given other ids).
    pub head_tokens: Option<Vec<u32>>,
    /// A tied `lm_head` uses the embedding's trained rows (PEFT's `tied_adapter`).
    pub head_follows_embedding: bool,
    /// `modules_to_save` holds the input embedding: a full trainable copy.
    pub save_embedding: bool,
    /// `modules_to_save` holds `lm_head`: a full trainable copy.
    pub save_head: bool,
    /// The normalization layers `modules_to_save` holds (full module names in the model's order,
    /// `model.layers.0.input_layernorm`, `transformer.ln_f`): each a trainable copy of its weight
    /// (and LayerNorm's bias).
    pub save_norms: Vec<String>,
    /// The input embedding's module name (`model.embed_tokens`, `transformer.wte`).
    pub embedding_name: String,
}

impl ResolvedAuxiliary {
    /// Nothing auxiliary trains.
    pub fn is_empty(&self) -> bool {
        self.embedding_tokens.is_none()
            && self.head_tokens.is_none()
            && !self.save_embedding
            && !self.save_head
            && self.save_norms.is_empty()
    }
}

/// A problem with an auxiliary field: the field relative to the method
/// (`trainable_token_indices[2]`, `modules_to_save[0]`) and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuxiliaryProblem {
    pub field: String,
    pub message: String,
}

fn problem(field: impl Into<String>, message: impl Into<String>) -> AuxiliaryProblem {
    AuxiliaryProblem {
        field: field.into(),
        message: message.into(),
    }
}

/// Checks on the values alone.
pub fn check_values(
    tokens: Option<&TrainableTokenIndices>,
    modules_to_save: Option<&[String]>,
) -> Vec<AuxiliaryProblem> {
    let mut problems = Vec::new();
    let check_ids = |field: String, ids: &[u32], problems: &mut Vec<AuxiliaryProblem>| {
        if ids.is_empty() {
            problems.push(problem(field, "is an empty list of token ids"));
            return;
        }
        let mut seen = std::collections::BTreeSet::new();
        for (index, id) in ids.iter().enumerate() {
            if !seen.insert(id) {
                problems.push(problem(
                    format!("{field}[{index}]"),
                    format!("token id {id} is given twice"),
                ));
            }
        }
    };
    match tokens {
        Some(TrainableTokenIndices::List(ids)) => {
            check_ids("trainable_token_indices".into(), ids, &mut problems)
        }
        Some(TrainableTokenIndices::Modules(modules)) => {
            if modules.is_empty() {
                problems.push(problem(
                    "trainable_token_indices",
                    "names no module; write `[ids]` or `{embed_tokens: [ids]}`",
                ));
            }
            for (name, ids) in modules {
                if name.is_empty() {
                    problems.push(problem(
                        "trainable_token_indices",
                        "has an empty module name",
                    ));
                }
                check_ids(
                    format!("trainable_token_indices.{name}"),
                    ids,
                    &mut problems,
                );
            }
        }
        None => {}
    }
    if let Some(names) = modules_to_save {
        if names.is_empty() {
            problems.push(problem("modules_to_save", "is an empty list"));
        }
        for (index, name) in names.iter().enumerate() {
            if name.is_empty() {
                problems.push(problem(
                    format!("modules_to_save[{index}]"),
                    "is an empty name",
                ));
            }
        }
    }
    problems
}

/// Resolve the auxiliary fields against a model: `vocab_size` rows, `num_layers` decoder layers,
/// `tied`: `lm_head` shares the embedding matrix.
pub fn resolve(
    tokens: Option<&TrainableTokenIndices>,
    modules_to_save: Option<&[String]>,
    model_type: &str,
    num_layers: usize,
    vocab_size: usize,
    tied: bool,
) -> Result<ResolvedAuxiliary, Vec<AuxiliaryProblem>> {
    let mut problems = check_values(tokens, modules_to_save);
    let modules = model_modules(model_type, num_layers);
    let embedding_name = modules
        .iter()
        .find(|(_, kind)| *kind == ModuleKind::Embedding)
        .map(|(name, _)| name.clone())
        .unwrap_or_default();
    let mut resolved = ResolvedAuxiliary {
        embedding_name: embedding_name.clone(),
        ..ResolvedAuxiliary::default()
    };
    // PEFT's `_set_trainable`: `key.endswith(target_key)` over every module name.
    let matches = |name: &str| -> Vec<&(String, ModuleKind)> {
        modules
            .iter()
            .filter(|(module, _)| module.ends_with(name))
            .collect()
    };
    let supported = "peftpipe trains `lm_head`, the input embedding and normalization layers";

    let mut save_names = Vec::new();
    for (index, name) in modules_to_save.unwrap_or_default().iter().enumerate() {
        let field = format!("modules_to_save[{index}]");
        if name.is_empty() {
            continue;
        }
        let found = matches(name);
        if found.is_empty() {
            problems.push(problem(
                field,
                format!(
                    "`{name}` matches no module of this {} model (e.g. lm_head, {}, {})",
                    if model_type.is_empty() {
                        "llama"
                    } else {
                        model_type
                    },
                    embedding_name.rsplit('.').next().unwrap_or("embed_tokens"),
                    if model_type == "gpt2" { "ln_f" } else { "norm" }
                ),
            ));
            continue;
        }
        for (module, kind) in found {
            match kind {
                ModuleKind::Embedding => resolved.save_embedding = true,
                ModuleKind::Head => resolved.save_head = true,
                ModuleKind::Norm => {
                    if !resolved.save_norms.contains(module) {
                        resolved.save_norms.push(module.clone());
                    }
                }
                ModuleKind::Other => problems.push(problem(
                    &field,
                    format!("`{name}` matches `{module}`, which is not an embedding, lm_head or norm: {supported} as modules_to_save"),
                )),
            }
        }
        save_names.push(name.clone());
    }
    // In the model's order, whatever order the names matched them in.
    resolved.save_norms = modules
        .iter()
        .filter(|(module, _)| resolved.save_norms.contains(module))
        .map(|(module, _)| module.clone())
        .collect();

    let check_range = |field: String, ids: &[u32], problems: &mut Vec<AuxiliaryProblem>| {
        for (index, id) in ids.iter().enumerate() {
            if *id as usize >= vocab_size {
                problems.push(problem(
                    format!("{field}[{index}]"),
                    format!(
                        "token id {id} is outside the vocabulary (vocab_size {vocab_size} in the model's config.json)"
                    ),
                ));
            }
        }
    };
    match tokens {
        None => {}
        Some(TrainableTokenIndices::List(ids)) => {
            check_range("trainable_token_indices".into(), ids, &mut problems);
            resolved.embedding_tokens = Some(ids.clone());
        }
        Some(TrainableTokenIndices::Modules(targets)) => {
            for (name, ids) in targets {
                let field = format!("trainable_token_indices.{name}");
                check_range(field.clone(), ids, &mut problems);
                let found = matches(name);
                if found.is_empty() {
                    problems.push(problem(
                        field,
                        format!("`{name}` matches no module of the model (use the embedding, e.g. `{}`, or `lm_head`)",
                            embedding_name.rsplit('.').next().unwrap_or("embed_tokens")),
                    ));
                    continue;
                }
                for (module, kind) in found {
                    let slot = match kind {
                        ModuleKind::Embedding => &mut resolved.embedding_tokens,
                        ModuleKind::Head => &mut resolved.head_tokens,
                        _ => {
                            problems.push(problem(
                                &field,
                                format!("`{name}` matches `{module}`, which is not an embedding or lm_head"),
                            ));
                            continue;
                        }
                    };
                    *slot = Some(ids.clone());
                }
            }
        }
    }
    // PEFT: "The embedding layer is already marked to be trained fully".
    if resolved.save_embedding && resolved.embedding_tokens.is_some() {
        problems.push(problem(
            "trainable_token_indices",
            "the input embedding is also in modules_to_save (trained fully): give one or the other, as PEFT requires",
        ));
    }
    if resolved.save_head && resolved.head_tokens.is_some() {
        problems.push(problem(
            "trainable_token_indices",
            "lm_head is also in modules_to_save (trained fully): give one or the other, as PEFT requires",
        ));
    }
    // Tied weights (PEFT's `set_additional_trainable_modules`): the head follows the embedding's
    // rows unless it was given other ids, or is trained fully.
    if tied && resolved.embedding_tokens.is_some() && !resolved.save_head {
        match &resolved.head_tokens {
            None => resolved.head_follows_embedding = true,
            Some(head) if Some(head) == resolved.embedding_tokens.as_ref() => {
                resolved.head_tokens = None;
                resolved.head_follows_embedding = true;
            }
            Some(_) => {}
        }
    }
    if problems.is_empty() {
        Ok(resolved)
    } else {
        Err(problems)
    }
}

/// The checks of [`resolve`] against the model a pipeline trains (its linear layers from
/// config.json: the decoder-layer count, and `lm_head`'s shape for the vocabulary and tying),
/// reported under `{key}.<field>` (`key`: `stages.train.method.lora`).
pub fn check_against_model(
    tokens: Option<&TrainableTokenIndices>,
    modules_to_save: Option<&[String]>,
    key: &str,
    model_type: &str,
    layers: &[LinearLayerShape],
    problems: &mut Vec<Problem>,
) {
    if tokens.is_none() && modules_to_save.is_none() {
        return;
    }
    let Some(head) = layers.iter().find(|layer| layer.path == "lm_head") else {
        return;
    };
    let num_layers = layers
        .iter()
        .filter_map(|layer| {
            let mut parts = layer.path.split('.');
            while let Some(part) = parts.next() {
                if part == "layers" || part == "h" {
                    return parts.next()?.parse::<usize>().ok();
                }
            }
            None
        })
        .max()
        .map_or(0, |last| last + 1);
    // Tying only decides whether lm_head follows the embedding; every check holds either way.
    if let Err(found) = resolve(
        tokens,
        modules_to_save,
        model_type,
        num_layers,
        head.out_features,
        false,
    ) {
        for item in found {
            problems
                .push(Problem::new(format!("{key}.{}", item.field), item.message).about_value());
        }
    }
}

/// The fields' checks on the values alone, reported under `{key}.<field>`.
pub fn check(
    tokens: Option<&TrainableTokenIndices>,
    modules_to_save: Option<&[String]>,
    key: &str,
    problems: &mut Vec<Problem>,
) {
    for item in check_values(tokens, modules_to_save) {
        problems.push(Problem::new(format!("{key}.{}", item.field), item.message).about_value());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(text: &str) -> TrainableTokenIndices {
        serde_norway::from_str(text).unwrap()
    }

    #[test]
    fn both_forms_parse_and_round_trip() {
        assert_eq!(ids("[2, 5]"), TrainableTokenIndices::List(vec![2, 5]));
        let modules = ids("{embed_tokens: [2], lm_head: [3]}");
        assert_eq!(
            modules,
            TrainableTokenIndices::Modules(BTreeMap::from([
                ("embed_tokens".into(), vec![2]),
                ("lm_head".into(), vec![3])
            ]))
        );
        assert_eq!(
            serde_json::to_value(&modules).unwrap(),
            serde_json::json!({"embed_tokens": [2], "lm_head": [3]})
        );
        assert!(serde_norway::from_str::<TrainableTokenIndices>("[-1]").is_err());
        assert!(serde_norway::from_str::<TrainableTokenIndices>("embed_tokens").is_err());
    }

    #[test]
    fn a_list_targets_the_embedding_and_a_tied_head_follows() {
        let resolved = resolve(Some(&ids("[2]")), None, "llama", 2, 512, true).unwrap();
        assert_eq!(resolved.embedding_tokens, Some(vec![2]));
        assert!(resolved.head_follows_embedding);
        assert_eq!(resolved.head_tokens, None);
        let untied = resolve(Some(&ids("[2]")), None, "llama", 2, 512, false).unwrap();
        assert!(!untied.head_follows_embedding);
        let gpt2 = resolve(Some(&ids("{wte: [2]}")), None, "gpt2", 2, 50, true).unwrap();
        assert_eq!(gpt2.embedding_name, "transformer.wte");
        assert_eq!(gpt2.embedding_tokens, Some(vec![2]));
        // A tied head given the same ids follows; other ids train on their own.
        let same = ids("{embed_tokens: [2], lm_head: [2]}");
        let same = resolve(Some(&same), None, "llama", 2, 512, true).unwrap();
        assert!(same.head_follows_embedding && same.head_tokens.is_none());
        let other = ids("{embed_tokens: [2], lm_head: [3]}");
        let other = resolve(Some(&other), None, "llama", 2, 512, true).unwrap();
        assert!(!other.head_follows_embedding);
        assert_eq!(other.head_tokens, Some(vec![3]));
    }

    #[test]
    fn out_of_range_unknown_and_conflicting_names_are_problems() {
        let fields = |tokens: Option<&str>, save: Option<&[&str]>| {
            let tokens = tokens.map(ids);
            let save: Option<Vec<String>> =
                save.map(|names| names.iter().map(|n| n.to_string()).collect());
            resolve(tokens.as_ref(), save.as_deref(), "llama", 2, 512, true)
                .unwrap_err()
                .into_iter()
                .map(|p| format!("{}: {}", p.field, p.message))
                .collect::<Vec<_>>()
        };
        let range = fields(Some("[2, 512]"), None);
        assert_eq!(range.len(), 1);
        assert!(range[0].starts_with("trainable_token_indices[1]: token id 512 is outside the vocabulary (vocab_size 512"), "{range:?}");
        let unknown = fields(None, Some(&["lm_haed"]));
        assert!(
            unknown[0].starts_with("modules_to_save[0]: `lm_haed` matches no module"),
            "{unknown:?}"
        );
        let linear = fields(None, Some(&["q_proj"]));
        assert!(
            linear[0].contains("not an embedding, lm_head or norm"),
            "{linear:?}"
        );
        // A name that matches a norm and something else (`layers.0` ends `model.layers.0`).
        let block = fields(None, Some(&["layers.0"]));
        assert!(block[0].contains("matches `model.layers.0`"), "{block:?}");
        let mlp = fields(None, Some(&["lm_head", "mlp"]));
        assert_eq!(mlp.len(), 2, "{mlp:?}");
        // Token rows of a norm are not a thing.
        let rows = fields(Some("{norm: [2]}"), None);
        assert!(rows[0].contains("not an embedding or lm_head"), "{rows:?}");
        let both = fields(Some("[2]"), Some(&["embed_tokens"]));
        assert!(both[0].contains("also in modules_to_save"), "{both:?}");
        let twice = fields(Some("[2, 2]"), None);
        assert!(twice[0].starts_with("trainable_token_indices[1]: token id 2 is given twice"));
        let empty = fields(Some("[]"), None);
        assert!(empty[0].contains("empty list"));
    }

    #[test]
    fn norms_are_modules_to_save_matched_by_suffix_as_peft_does() {
        let save = |names: &[&str], model_type: &str| {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            resolve(None, Some(&names), model_type, 2, 512, true).unwrap()
        };
        let final_norm = save(&["model.norm"], "llama");
        assert_eq!(final_norm.save_norms, ["model.norm"]);
        assert!(!final_norm.is_empty() && !final_norm.save_head && !final_norm.save_embedding);
        assert_eq!(
            save(&["input_layernorm"], "llama").save_norms,
            [
                "model.layers.0.input_layernorm",
                "model.layers.1.input_layernorm"
            ]
        );
        // PEFT's `key.endswith(name)`: `norm` is the end of every norm's name, so all train.
        assert_eq!(
            save(&["norm"], "llama").save_norms,
            [
                "model.layers.0.input_layernorm",
                "model.layers.0.post_attention_layernorm",
                "model.layers.1.input_layernorm",
                "model.layers.1.post_attention_layernorm",
                "model.norm"
            ]
        );
        // Given twice (and in another order), each norm is listed once, in the model's order.
        assert_eq!(
            save(
                &["model.norm", "layers.1.post_attention_layernorm", "norm"],
                "llama"
            )
            .save_norms
            .len(),
            5
        );
        let gpt2 = save(&["ln_f", "ln_1", "lm_head"], "gpt2");
        assert_eq!(
            gpt2.save_norms,
            [
                "transformer.h.0.ln_1",
                "transformer.h.1.ln_1",
                "transformer.ln_f"
            ]
        );
        assert!(gpt2.save_head);
        // A norm name of the other architecture matches nothing.
        let problems =
            resolve(None, Some(&["ln_f".to_string()]), "llama", 2, 512, true).unwrap_err();
        assert!(
            problems[0].message.contains(
                "matches no module of this llama model (e.g. lm_head, embed_tokens, norm)"
            ),
            "{problems:?}"
        );
    }

    /// `peftpipe validate`'s check against a model's linear layers (from config.json) accepts
    /// norms and still rejects a linear layer, under the method's key.
    #[test]
    fn validate_accepts_norms_and_rejects_linear_layers() {
        let layer = |path: &str, out_features| LinearLayerShape {
            path: path.into(),
            in_features: 16,
            out_features,
        };
        let layers = [
            layer("model.layers.0.self_attn.q_proj", 16),
            layer("model.layers.1.self_attn.q_proj", 16),
            layer("lm_head", 40),
        ];
        let check = |names: &[&str]| {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            let mut problems = Vec::new();
            check_against_model(
                None,
                Some(&names),
                "stages.train.method.lora",
                "llama",
                &layers,
                &mut problems,
            );
            problems
        };
        assert!(check(&["norm"]).is_empty());
        assert!(check(&["input_layernorm", "model.norm", "lm_head"]).is_empty());
        let problems = check(&["post_attention_layernorm", "q_proj"]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(
            problems[0].path,
            "stages.train.method.lora.modules_to_save[1]"
        );
        assert!(problems[0]
            .message
            .contains("which is not an embedding, lm_head or norm"));
    }

    #[test]
    fn modules_to_save_match_by_suffix_as_peft_does() {
        let save = vec!["lm_head".to_string(), "embed_tokens".to_string()];
        let resolved = resolve(None, Some(&save), "llama", 2, 512, true).unwrap();
        assert!(resolved.save_head && resolved.save_embedding);
        assert!(!resolved.head_follows_embedding);
    }
}
