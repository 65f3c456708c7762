//! Which base a QLoRA-trained adapter runs over when the base model it is given may not be the
//! one its record describes (an export's peftpipe_base_quantization.json, a train artifact's
//! base_model.json), and the note that says so: one rule and one wording for `evaluate`'s
//! outside adapters and `generate`. Running such an adapter over another base (commonly the
//! 16-bit original) is legitimate, but never silent. Decides and words; prints nothing.

use std::path::PathBuf;

use crate::models::quantized::{BaseQuantization, BnbQuantization};
use crate::models::ModelDir;

/// A base model saved in bitsandbytes 4-bit: config.json's settings and the weights' block
/// size (from their stored sizes; `None` when they do not share one, which loading refuses).
#[derive(Debug, Clone)]
pub struct StoredBase {
    pub settings: BnbQuantization,
    pub block_size: Option<usize>,
}

impl StoredBase {
    /// The folder's 4-bit storage; `None` for a 16-bit checkpoint.
    pub fn of(dir: &ModelDir) -> Option<StoredBase> {
        dir.stored_quantization().map(|settings| {
            let sizes = dir.stored_block_sizes();
            StoredBase {
                settings: settings.clone(),
                block_size: match sizes.keys().collect::<Vec<_>>().as_slice() {
                    [size] => Some(**size),
                    _ => None,
                },
            }
        })
    }
}

/// The words of the note, for the command that says it.
#[derive(Debug, Clone, Copy)]
pub struct Wording {
    /// What is done with the adapter, as a participle and an infinitive: `scored`/`score`.
    pub done: &'static str,
    pub to_do: &'static str,
    /// What names the base model: `` `base_model` ``, `MODEL`.
    pub model: &'static str,
    /// What asks for a 4-bit base: `` `base_quantization` ``, `--load-in-4bit`.
    pub asked: &'static str,
    /// Whether the base the record describes (quantized from the 16-bit model as its run did)
    /// gets a note too, saying so.
    pub note_as_trained: bool,
}

/// `evaluate`'s words (an outside adapter of the comparison).
pub const EVALUATE: Wording = Wording {
    done: "scored",
    to_do: "score",
    model: "`base_model`",
    asked: "`base_quantization`",
    note_as_trained: true,
};

/// `generate`'s words.
pub const GENERATE: Wording = Wording {
    done: "applied",
    to_do: "apply",
    model: "MODEL",
    asked: "--load-in-4bit",
    note_as_trained: false,
};

/// The base adapter `name` runs over, and a note when that is not the base its folder records
/// it was trained over (`recorded`: a QLoRA export's
/// [`crate::config::evaluate::ADAPTER_BASE_RECORD`] or a train artifact's base_model.json):
/// `asked` (`base_quantization`, `--load-in-4bit`) when given; else the checkpoint as stored
/// when it is saved in 4 bits (`stored`; a note unless the record says it trained over such a
/// checkpoint with the same settings); else the recorded 4-bit base (quantized from the 16-bit
/// model as the run did), unless the run trained over a checkpoint saved in 4 bits (then the
/// 16-bit model, said in the note).
pub fn adapter_base(
    name: &str,
    asked: Option<&BaseQuantization>,
    stored: Option<&StoredBase>,
    recorded: Option<(BaseQuantization, PathBuf)>,
    wording: Wording,
) -> (Option<BaseQuantization>, Option<String>) {
    let Some((recorded, record)) = recorded else {
        return (asked.copied(), None);
    };
    let done = wording.done;
    let trained = format!(
        "{name} was trained over a {} base ({})",
        recorded.label(),
        record.display()
    );
    match asked {
        Some(asked) if asked.config != recorded.config => (
            Some(*asked),
            Some(format!(
                "{trained}; it is {done} over the {} base {} asks for",
                asked.label(),
                wording.asked
            )),
        ),
        Some(asked) => (Some(*asked), None),
        None => match stored {
            Some(stored)
                if recorded.prequantized
                    && stored.settings.has_settings_of(&recorded.config)
                    && stored
                        .block_size
                        .is_none_or(|size| size == recorded.config.block_size) =>
            {
                (None, None)
            }
            Some(stored) => (
                None,
                Some(format!(
                    "{trained}; it is {done} over this base model's 4-bit weights as stored ({}, double_quant {}{}), which may not be the weights it learned on",
                    stored.settings.quant_type.name(),
                    stored.settings.double_quant,
                    stored
                        .block_size
                        .map(|size| format!(", blocks of {size}"))
                        .unwrap_or_default()
                )),
            ),
            None if recorded.prequantized => (
                None,
                Some(format!(
                    "{trained} saved in 4 bits; this base model is 16-bit, so it is {done} over the 16-bit weights: point {} at the 4-bit checkpoint to {} it as trained",
                    wording.model, wording.to_do
                )),
            ),
            None => (
                Some(recorded),
                wording.note_as_trained.then(|| {
                    format!(
                        "{trained}: it is {done} over that base, quantized from the 16-bit model as its run did; set {} to choose another",
                        wording.asked
                    )
                }),
            ),
        },
    }
}
