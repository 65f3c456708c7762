//! Device slots: a stage that computes on a GPU holds that GPU's slot for its whole job
//! (restore or run), so two such stages (two expansions of a matrix `train`, a `train` and an
//! `evaluate`) never share one device at once; stages that compute on the CPU, or that only move
//! data, hold no slot and still run in parallel up to `jobs`.
//!
//! Which device a stage uses is what it declares (`StageSpec::device`, the `device:` setting as
//! written), replaced by the run's `--device` when given, resolved without touching any device:
//! `cpu` → no slot; `cuda` → `cuda:0`; `cuda:N` → `cuda:N`; `auto` → `cuda:0` in a CUDA build
//! (where `auto` picks the first GPU), else no slot. Pure; the runner keeps the busy set.

use std::collections::BTreeMap;

use crate::config::StageConfig;

/// The device slot `config` needs under the run's `--device` override, if any.
pub fn device_slot(config: &StageConfig, device_override: Option<&str>) -> Option<String> {
    let written = config.spec().device()?;
    resolve(device_override.unwrap_or(written))
}

/// `cpu` → None, `cuda` → `cuda:0`, `cuda:N` → `cuda:N`, `auto` → `cuda:0` in a CUDA build.
pub fn resolve(device: &str) -> Option<String> {
    match device {
        "auto" if cfg!(feature = "cuda") => Some("cuda:0".to_string()),
        "cuda" => Some("cuda:0".to_string()),
        other => other
            .strip_prefix("cuda:")
            .and_then(|index| index.parse::<usize>().ok())
            .map(|index| format!("cuda:{index}")),
    }
}

/// The slots held by running stages, each with the stage that holds it.
#[derive(Debug, Default)]
pub struct Slots {
    busy: BTreeMap<String, String>,
}

impl Slots {
    /// Take `slot` for `stage` (None: nothing to take). Err: the stage that holds it.
    pub fn take(&mut self, slot: Option<&str>, stage: &str) -> Result<(), String> {
        let Some(slot) = slot else {
            return Ok(());
        };
        match self.busy.get(slot) {
            Some(holder) => Err(holder.clone()),
            None => {
                self.busy.insert(slot.to_string(), stage.to_string());
                Ok(())
            }
        }
    }

    pub fn release(&mut self, slot: Option<&str>) {
        if let Some(slot) = slot {
            self.busy.remove(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_resolve_to_slots_without_touching_a_device() {
        assert_eq!(resolve("cpu"), None);
        assert_eq!(resolve("cuda").as_deref(), Some("cuda:0"));
        assert_eq!(resolve("cuda:0").as_deref(), Some("cuda:0"));
        assert_eq!(resolve("cuda:01").as_deref(), Some("cuda:1"));
        assert_eq!(resolve("cuda:x"), None);
        let auto = resolve("auto");
        assert_eq!(auto.is_some(), cfg!(feature = "cuda"));
    }

    #[test]
    fn a_slot_is_held_by_one_stage_at_a_time() {
        let mut slots = Slots::default();
        assert_eq!(slots.take(Some("cuda:0"), "a"), Ok(()));
        assert_eq!(slots.take(Some("cuda:0"), "b"), Err("a".to_string()));
        assert_eq!(slots.take(Some("cuda:1"), "b"), Ok(()));
        assert_eq!(slots.take(None, "c"), Ok(()));
        assert_eq!(slots.take(None, "d"), Ok(()));
        slots.release(Some("cuda:0"));
        assert_eq!(slots.take(Some("cuda:0"), "b"), Ok(()));
    }

    fn stage(yaml: &str) -> StageConfig {
        let value: serde_norway::Value = serde_norway::from_str(yaml).unwrap();
        serde_json::from_value(serde_json::to_value(value).unwrap()).unwrap()
    }

    #[test]
    fn only_stages_that_declare_a_device_take_a_slot_and_the_override_wins() {
        let train = stage("train: {data: d, model: m, method: {lora: {r: 4}}, device: cuda:1}");
        assert_eq!(device_slot(&train, None).as_deref(), Some("cuda:1"));
        assert_eq!(device_slot(&train, Some("cpu")), None);
        assert_eq!(device_slot(&train, Some("cuda")).as_deref(), Some("cuda:0"));
        let evaluate = stage("evaluate: {model: t, data: d, device: cuda}");
        assert_eq!(device_slot(&evaluate, None).as_deref(), Some("cuda:0"));
        let ingest = stage("ingest: {path: a.parquet}");
        assert_eq!(device_slot(&ingest, Some("cuda:0")), None);
    }
}
