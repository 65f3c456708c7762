//! Deterministic synthetic sentiment data: the quickstart dataset (short review sentences from a
//! small vocabulary, with planted duplicates and nulls) and the longer rows of `peftpipe bench
//! data`, plus the word-level tokenizer files that cover the quickstart vocabulary. Pure functions
//! of a seed; the only disk writes are the explicit `write_*` functions.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::artifact::ParquetSink;
use crate::stages::StageError;

/// Seed of the committed quickstart dataset.
pub const QUICKSTART_SEED: u64 = 20_261_128;
/// Distinct generated rows of the quickstart dataset (before duplicates and nulls).
pub const QUICKSTART_UNIQUE_ROWS: usize = 1150;
/// Exact duplicates planted in the quickstart dataset.
pub const QUICKSTART_DUPLICATES: usize = 40;
/// Rows whose text is null.
pub const QUICKSTART_NULL_TEXTS: usize = 8;
/// Rows whose label is null.
pub const QUICKSTART_NULL_LABELS: usize = 4;

const NOUNS: &[&str] = &[
    "film",
    "movie",
    "story",
    "plot",
    "acting",
    "ending",
    "music",
    "cast",
    "script",
    "director",
    "soundtrack",
    "dialogue",
    "camera",
    "pacing",
    "hero",
    "villain",
    "scene",
    "book",
    "show",
    "series",
    "humor",
    "effects",
    "design",
    "album",
    "game",
    "meal",
    "service",
    "hotel",
    "room",
    "phone",
    "battery",
    "screen",
    "price",
    "staff",
    "food",
    "coffee",
    "chair",
    "shoes",
    "jacket",
    "lamp",
];
const POSITIVE: &[&str] = &[
    "great",
    "wonderful",
    "brilliant",
    "charming",
    "delightful",
    "excellent",
    "lovely",
    "beautiful",
    "clever",
    "funny",
    "moving",
    "warm",
    "fresh",
    "solid",
    "superb",
    "gorgeous",
    "smart",
    "fun",
    "pleasant",
    "perfect",
];
const NEGATIVE: &[&str] = &[
    "terrible",
    "awful",
    "boring",
    "dull",
    "bland",
    "weak",
    "clumsy",
    "poor",
    "messy",
    "slow",
    "tedious",
    "painful",
    "flat",
    "cheap",
    "lazy",
    "silly",
    "broken",
    "noisy",
    "cold",
    "forgettable",
];
const ADVERBS: &[&str] = &[
    "really", "truly", "very", "quite", "so", "rather", "simply", "totally", "pretty", "honestly",
];
const POSITIVE_VERBS: &[&str] = &[
    "loved",
    "enjoyed",
    "liked",
    "adored",
    "recommend",
    "treasured",
];
const NEGATIVE_VERBS: &[&str] = &[
    "hated",
    "disliked",
    "regretted",
    "endured",
    "returned",
    "avoided",
];
const POSITIVE_ENDINGS: &[&str] = &[
    "highly recommended",
    "worth every minute",
    "a real joy",
    "i would go again",
    "five stars",
];
const NEGATIVE_ENDINGS: &[&str] = &[
    "a waste of time",
    "not worth it",
    "i want my money back",
    "one star",
    "never again",
];
const OPENERS: &[&str] = &[
    "overall",
    "frankly",
    "sadly",
    "luckily",
    "in short",
    "to be fair",
];

/// Words the pipelines' templates and the tokenizer's chat template add to the dataset's own.
pub const TEMPLATE_WORDS: &[&str] = &[
    "review",
    "sentiment",
    "positive",
    "negative",
    "label",
    "text",
    "user",
    "assistant",
    "system",
    "classify",
    "the",
    "of",
    "this",
    "as",
    "or",
    "answer",
    "examples",
    "example",
    "input",
    "output",
];

/// Punctuation in the vocabulary (each is its own token under the whitespace pre-tokenizer).
pub const PUNCTUATION: &[&str] = &[".", ",", "!", "?", ":", ";", "'", "\"", "(", ")", "-"];

fn pick<'a>(rng: &mut ChaCha8Rng, words: &[&'a str]) -> &'a str {
    words.choose(rng).copied().unwrap_or_default()
}

/// One review sentence and its label (`positive` / `negative`).
pub fn review_sentence(rng: &mut ChaCha8Rng) -> (String, &'static str) {
    let positive = rng.random_bool(0.5);
    let (adjectives, verbs, endings, other) = if positive {
        (POSITIVE, POSITIVE_VERBS, POSITIVE_ENDINGS, NEGATIVE)
    } else {
        (NEGATIVE, NEGATIVE_VERBS, NEGATIVE_ENDINGS, POSITIVE)
    };
    let noun = pick(rng, NOUNS);
    let noun2 = pick(rng, NOUNS);
    let adjective = pick(rng, adjectives);
    let adjective2 = pick(rng, adjectives);
    let adverb = pick(rng, ADVERBS);
    let text = match rng.random_range(0..7) {
        0 => format!("the {noun} was {adverb} {adjective}."),
        1 => format!("i {} this {noun}, it is {adjective}.", pick(rng, verbs)),
        2 => format!(
            "{adjective} {noun} and {adjective2} {noun2}, {}.",
            pick(rng, endings)
        ),
        3 => format!("what a {adjective} {noun}!"),
        // Mixed: the clause after "but" decides.
        4 => format!(
            "the {noun} is {} but the {noun2} is {adverb} {adjective}.",
            pick(rng, other)
        ),
        5 => format!(
            "{}, the {noun} felt {adjective} and {adjective2}.",
            pick(rng, OPENERS)
        ),
        _ => format!("{adjective} {noun}. {}!", pick(rng, endings)),
    };
    (text, if positive { "positive" } else { "negative" })
}

/// The quickstart rows: unique sentences, then planted duplicates and nulls, shuffled.
pub fn quickstart_rows() -> Vec<(Option<String>, Option<String>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(QUICKSTART_SEED);
    let mut seen = BTreeSet::new();
    let mut rows: Vec<(Option<String>, Option<String>)> = Vec::new();
    while rows.len() < QUICKSTART_UNIQUE_ROWS {
        let (text, label) = review_sentence(&mut rng);
        if seen.insert(text.clone()) {
            rows.push((Some(text), Some(label.to_string())));
        }
    }
    for _ in 0..QUICKSTART_DUPLICATES {
        let index = rng.random_range(0..QUICKSTART_UNIQUE_ROWS);
        rows.push(rows[index].clone());
    }
    for _ in 0..QUICKSTART_NULL_TEXTS {
        let (_, label) = review_sentence(&mut rng);
        rows.push((None, Some(label.to_string())));
    }
    for _ in 0..QUICKSTART_NULL_LABELS {
        let (text, _) = review_sentence(&mut rng);
        rows.push((Some(text), None));
    }
    rows.shuffle_with(&mut rng);
    rows
}

trait ShuffleWith {
    fn shuffle_with(&mut self, rng: &mut ChaCha8Rng);
}

impl<T> ShuffleWith for Vec<T> {
    fn shuffle_with(&mut self, rng: &mut ChaCha8Rng) {
        rand::seq::SliceRandom::shuffle(self.as_mut_slice(), rng);
    }
}

/// Schema of the review datasets: `text`, `label` (both nullable Utf8).
pub fn review_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("text", DataType::Utf8, true),
        Field::new("label", DataType::Utf8, true),
    ]))
}

/// Write rows of (text, label) as a Parquet file.
pub fn write_reviews(
    path: &Path,
    rows: &[(Option<String>, Option<String>)],
) -> Result<(), StageError> {
    let schema = review_schema();
    let mut sink = ParquetSink::create(path, schema.clone(), true)?;
    for chunk in rows.chunks(8192) {
        let texts = StringArray::from_iter(chunk.iter().map(|(t, _)| t.as_deref()));
        let labels = StringArray::from_iter(chunk.iter().map(|(_, l)| l.as_deref()));
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(texts), Arc::new(labels)])
            .map_err(|e| StageError::Internal(e.to_string()))?;
        sink.write(&batch)?;
    }
    sink.finish()?;
    Ok(())
}

/// A batch of benchmark rows: each text is several review sentences (~200 bytes); about 2% of
/// rows repeat an earlier text of the batch and 0.5% have a null text. Deterministic in
/// (`seed`, `batch_index`).
pub fn bench_batch(seed: u64, batch_index: u64, rows: usize) -> Result<RecordBatch, StageError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ batch_index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut texts: Vec<Option<String>> = Vec::with_capacity(rows);
    let mut labels: Vec<Option<&str>> = Vec::with_capacity(rows);
    for index in 0..rows {
        let roll = rng.random_range(0..1000);
        if roll < 5 {
            texts.push(None);
            labels.push(Some("negative"));
            continue;
        }
        if roll < 25 && index > 0 {
            let earlier = rng.random_range(0..index);
            texts.push(texts[earlier].clone());
            labels.push(labels[earlier]);
            continue;
        }
        let (first, label) = review_sentence(&mut rng);
        let mut text = first;
        while text.len() < 180 {
            let (more, _) = review_sentence(&mut rng);
            text.push(' ');
            text.push_str(&more);
        }
        texts.push(Some(text));
        labels.push(Some(label));
    }
    RecordBatch::try_new(
        review_schema(),
        vec![
            Arc::new(StringArray::from(texts)),
            Arc::new(StringArray::from(labels)),
        ],
    )
    .map_err(|e| StageError::Internal(e.to_string()))
}

/// Every word of the generator's vocabulary (lowercase), the template words and punctuation.
pub fn quickstart_vocabulary() -> BTreeSet<String> {
    let mut words = BTreeSet::new();
    let lists: [&[&str]; 12] = [
        NOUNS,
        POSITIVE,
        NEGATIVE,
        ADVERBS,
        POSITIVE_VERBS,
        NEGATIVE_VERBS,
        POSITIVE_ENDINGS,
        NEGATIVE_ENDINGS,
        OPENERS,
        TEMPLATE_WORDS,
        PUNCTUATION,
        &[
            "the", "was", "i", "this", "it", "is", "and", "what", "a", "but", "felt",
        ],
    ];
    for list in lists {
        for phrase in list {
            for word in split_words(phrase) {
                words.insert(word);
            }
        }
    }
    words
}

/// Split text the way the tokenizer's pipeline does: lowercase, then runs of word characters or
/// runs of other non-space characters (HF `Whitespace` pre-tokenizer: `\w+|[^\w\s]+`).
pub fn split_words(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    let mut words = Vec::new();
    let mut current = String::new();
    let mut current_is_word = false;
    for c in lower.chars() {
        if c.is_whitespace() {
            if !current.is_empty() {
                words.push(std::mem::take(&mut current));
            }
            continue;
        }
        let is_word = c.is_alphanumeric() || c == '_';
        if !current.is_empty() && is_word != current_is_word {
            words.push(std::mem::take(&mut current));
        }
        current_is_word = is_word;
        current.push(c);
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

/// Special tokens of the quickstart tokenizer, in id order.
pub const SPECIAL_TOKENS: [&str; 4] = ["<unk>", "<s>", "</s>", "<pad>"];

/// The quickstart `tokenizer.json`: HF tokenizers WordLevel model, lowercase normalizer,
/// whitespace pre-tokenizer, special tokens `<unk>`=0, `<s>`=1, `</s>`=2, `<pad>`=3, then the
/// vocabulary in sorted order.
pub fn quickstart_tokenizer_json() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    for (id, token) in SPECIAL_TOKENS.iter().enumerate() {
        vocab.insert(token.to_string(), id.into());
    }
    for word in quickstart_vocabulary() {
        let id = vocab.len();
        vocab.entry(word).or_insert(id.into());
    }
    let added: Vec<serde_json::Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(id, token)| {
            serde_json::json!({
                "id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            })
        })
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
}

/// The quickstart `tokenizer_config.json` with a simple chat template.
pub fn quickstart_tokenizer_config() -> serde_json::Value {
    serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "add_bos_token": true,
        "add_eos_token": false,
        "model_max_length": 128,
        "clean_up_tokenization_spaces": false,
        "chat_template": "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quickstart_rows_are_deterministic_and_planted() {
        let rows = quickstart_rows();
        assert_eq!(rows, quickstart_rows());
        assert_eq!(
            rows.len(),
            QUICKSTART_UNIQUE_ROWS
                + QUICKSTART_DUPLICATES
                + QUICKSTART_NULL_TEXTS
                + QUICKSTART_NULL_LABELS
        );
        assert_eq!(
            rows.iter().filter(|r| r.0.is_none()).count(),
            QUICKSTART_NULL_TEXTS
        );
        let positives = rows
            .iter()
            .filter(|r| r.1.as_deref() == Some("positive"))
            .count();
        assert!((500..700).contains(&positives), "{positives}");
    }

    #[test]
    fn every_generated_word_is_in_the_vocabulary() {
        let vocabulary = quickstart_vocabulary();
        assert!(
            (150..=300).contains(&vocabulary.len()),
            "{}",
            vocabulary.len()
        );
        for (text, _) in quickstart_rows() {
            for word in split_words(text.as_deref().unwrap_or_default()) {
                assert!(vocabulary.contains(&word), "`{word}` missing");
            }
        }
    }

    #[test]
    fn split_words_matches_the_whitespace_pre_tokenizer() {
        assert_eq!(
            split_words("The film, it's GREAT!"),
            vec!["the", "film", ",", "it", "'", "s", "great", "!"]
        );
    }
}
