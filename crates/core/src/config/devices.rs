//! `devices` of a train stage as written: which GPUs a data-parallel run uses (one process each).
//! `all` (every GPU the host shows), a count `N` (GPUs `0..N`) or a list of indices (`[0, 2]`).
//! Pure data; the train stage resolves it against the host (see `train::distributed`).

use std::borrow::Cow;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The GPUs of a data-parallel run, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevicesConfig {
    /// Every GPU the host shows (after `CUDA_VISIBLE_DEVICES`).
    All,
    /// The first `N` GPUs.
    Count(usize),
    /// These GPU indices, rank `i` on the `i`-th.
    List(Vec<usize>),
}

impl DevicesConfig {
    /// The GPU indices, given how many the host shows (`None`: unknown, only `all` needs it).
    pub fn resolve(&self, visible: Option<usize>) -> Result<Vec<usize>, String> {
        let indices = match self {
            DevicesConfig::All => match visible {
                Some(0) => return Err("`all`: this host shows no GPU".into()),
                Some(count) => (0..count).collect(),
                None => return Err("`all`: cannot count this host's GPUs".into()),
            },
            DevicesConfig::Count(count) => (0..*count).collect(),
            DevicesConfig::List(list) => list.clone(),
        };
        if let Some(problem) = Self::problem(&indices) {
            return Err(problem);
        }
        if let Some(visible) = visible {
            if let Some(missing) = indices.iter().find(|&&index| index >= visible) {
                return Err(format!(
                    "GPU {missing} does not exist: this host shows {visible} GPU(s) (0..{visible})"
                ));
            }
        }
        Ok(indices)
    }

    /// What is wrong with a written list or count, if anything (checked at validation).
    pub fn check(&self) -> Option<String> {
        match self {
            DevicesConfig::All => None,
            DevicesConfig::Count(count) => Self::problem(&(0..*count).collect::<Vec<_>>())
                .map(|_| format!("{count} devices: a data-parallel run needs at least one GPU")),
            DevicesConfig::List(list) => Self::problem(list),
        }
    }

    fn problem(indices: &[usize]) -> Option<String> {
        if indices.is_empty() {
            return Some("no devices: list at least one GPU (or write `all`)".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        indices
            .iter()
            .find(|index| !seen.insert(**index))
            .map(|index| format!("GPU {index} is listed twice (one rank per GPU)"))
    }
}

impl Serialize for DevicesConfig {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            DevicesConfig::All => serializer.serialize_str("all"),
            DevicesConfig::Count(count) => serializer.serialize_u64(*count as u64),
            DevicesConfig::List(list) => list.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for DevicesConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DevicesVisitor;
        impl<'de> Visitor<'de> for DevicesVisitor {
            type Value = DevicesConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("`all`, a number of GPUs, or a list of GPU indices like [0, 1]")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
                if value == "all" {
                    Ok(DevicesConfig::All)
                } else {
                    Err(E::custom(format!(
                        "`{value}`: write `all`, a number of GPUs (`2`) or a list of GPU indices (`[0, 1]`)"
                    )))
                }
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<Self::Value, E> {
                usize::try_from(value)
                    .map(DevicesConfig::Count)
                    .map_err(|_| E::custom(format!("{value} devices is too many")))
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<Self::Value, E> {
                u64::try_from(value)
                    .map_err(|_| E::custom(format!("{value} devices: must be at least 1")))
                    .and_then(|value| self.visit_u64(value))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut list = Vec::new();
                while let Some(index) = seq.next_element::<usize>()? {
                    list.push(index);
                }
                Ok(DevicesConfig::List(list))
            }
        }
        deserializer.deserialize_any(DevicesVisitor)
    }
}

impl JsonSchema for DevicesConfig {
    fn schema_name() -> Cow<'static, str> {
        "Devices".into()
    }

    fn json_schema(_generator: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "GPUs of a data-parallel run, one process each: `all` (every GPU the host shows), a number N (GPUs 0..N) or a list of GPU indices.",
            "oneOf": [
                {"const": "all"},
                {"type": "integer", "minimum": 1},
                {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1, "uniqueItems": true}
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<DevicesConfig, String> {
        serde_norway::from_str(text).map_err(|error| error.to_string())
    }

    #[test]
    fn the_three_written_forms_parse_and_resolve() {
        assert_eq!(parse("all").unwrap(), DevicesConfig::All);
        assert_eq!(parse("2").unwrap(), DevicesConfig::Count(2));
        assert_eq!(parse("[1, 3]").unwrap(), DevicesConfig::List(vec![1, 3]));
        assert_eq!(DevicesConfig::All.resolve(Some(4)).unwrap(), [0, 1, 2, 3]);
        assert_eq!(DevicesConfig::Count(2).resolve(Some(4)).unwrap(), [0, 1]);
        assert_eq!(
            DevicesConfig::List(vec![3, 1]).resolve(None).unwrap(),
            [3, 1]
        );
        for written in ["all", "2", "[1, 3]"] {
            let value = parse(written).unwrap();
            let again = serde_norway::to_string(&value).unwrap();
            assert_eq!(parse(&again).unwrap(), value, "{written}");
        }
    }

    #[test]
    fn wrong_devices_are_clear_errors() {
        assert!(parse("some").unwrap_err().contains("write `all`"));
        assert!(parse("-1").unwrap_err().contains("at least 1"));
        assert!(DevicesConfig::Count(0)
            .check()
            .unwrap()
            .contains("at least one"));
        assert!(DevicesConfig::List(vec![])
            .check()
            .unwrap()
            .contains("no devices"));
        assert!(DevicesConfig::List(vec![0, 0])
            .check()
            .unwrap()
            .contains("twice"));
        let missing = DevicesConfig::List(vec![0, 2])
            .resolve(Some(2))
            .unwrap_err();
        assert!(missing.contains("GPU 2 does not exist"), "{missing}");
        assert!(DevicesConfig::All
            .resolve(Some(0))
            .unwrap_err()
            .contains("no GPU"));
    }
}
