//! Human numbers: the one place that turns figures into short text for people (summaries,
//! progress, `metrics`, the HTML report). Significant digits rather than fixed decimals,
//! scientific notation for huge or tiny values (`4.6e30`), bytes with binary units, durations
//! like `12.5s` / `3m04s`, rates like `14.5k`. Pure functions; `--json` output never goes
//! through here (programs get the numbers as numbers).

use std::time::Duration;

/// Significant digits of ordinary numbers.
const SIGNIFICANT: usize = 4;

/// A figure with `SIGNIFICANT` significant digits, trailing zeros dropped: `0.9826`, `70.59`,
/// `1150`; scientific notation with two significant digits outside `[1e-3, 1e6)`: `4.6e30`,
/// `6.5e-6`. Integers below 1e6 are exact. `NaN`, `inf` and `-inf` as such.
pub fn number(value: f64) -> String {
    if value.is_nan() {
        return "NaN".into();
    }
    if value.is_infinite() {
        return if value > 0.0 { "inf" } else { "-inf" }.into();
    }
    if value == 0.0 {
        return "0".into();
    }
    let magnitude = value.abs();
    if !(1e-3..1e6).contains(&magnitude) {
        return scientific(value);
    }
    if value.fract() == 0.0 {
        return format!("{value:.0}");
    }
    let exponent = magnitude.log10().floor() as i32;
    let decimals = (SIGNIFICANT as i32 - 1 - exponent).max(0) as usize;
    let text = format!("{value:.decimals$}");
    // Rounding can reach the next power of ten (999.96 → "1000.0"): fine, zeros trimmed below.
    trim_zeros(&text)
}

/// `4.6e30`, `-6.5e-6` (two significant digits).
fn scientific(value: f64) -> String {
    let text = format!("{value:.1e}");
    match text.split_once('e') {
        Some((mantissa, exponent)) => format!("{}e{exponent}", trim_zeros(mantissa)),
        None => text,
    }
}

fn trim_zeros(text: &str) -> String {
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text.to_string()
    }
}

/// An integer count with thin grouping: `1202`, `111,800`, `1,234,567`.
pub fn count(value: u64) -> String {
    let digits = value.to_string();
    if digits.len() <= 4 {
        return digits;
    }
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// Bytes with binary units: `512 B`, `401.5 KiB`, `1.2 GiB`.
pub fn bytes(value: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if value < 1024 {
        return format!("{value} B");
    }
    let mut scaled = value as f64 / 1024.0;
    let mut unit = 0;
    while scaled >= 1024.0 && unit + 1 < UNITS.len() {
        scaled /= 1024.0;
        unit += 1;
    }
    if scaled >= 100.0 {
        format!("{scaled:.0} {}", UNITS[unit])
    } else {
        format!("{scaled:.1} {}", UNITS[unit])
    }
}

/// A duration: `4ms`, `0.58s`, `7.76s`, `12.5s`, `3m04s`, `1h02m`.
pub fn duration(duration: Duration) -> String {
    seconds(duration.as_secs_f64())
}

/// [`duration`] of a number of seconds (negative and non-finite values read as 0).
pub fn seconds(total: f64) -> String {
    let total = if total.is_finite() {
        total.max(0.0)
    } else {
        0.0
    };
    if total < 0.995 {
        let millis = (total * 1000.0).round() as u64;
        if millis < 100 {
            return format!("{millis}ms");
        }
        return format!("{total:.2}s");
    }
    if total < 9.995 {
        return format!("{total:.2}s");
    }
    if total < 59.95 {
        return format!("{total:.1}s");
    }
    let whole = total.round() as u64;
    if whole < 3600 {
        format!("{}m{:02}s", whole / 60, whole % 60)
    } else {
        format!("{}h{:02}m", whole / 3600, (whole % 3600) / 60)
    }
}

/// A rate or large quantity with an SI suffix and three significant digits: `950`, `14.5k`,
/// `1.23M`, `4.56G`.
pub fn si(value: f64) -> String {
    if !value.is_finite() {
        return number(value);
    }
    let magnitude = value.abs();
    let (scaled, suffix) = if magnitude >= 1e9 {
        (value / 1e9, "G")
    } else if magnitude >= 1e6 {
        (value / 1e6, "M")
    } else if magnitude >= 1e3 {
        (value / 1e3, "k")
    } else {
        return format!("{}", value.round());
    };
    let decimals = if scaled.abs() >= 100.0 {
        0
    } else if scaled.abs() >= 10.0 {
        1
    } else {
        2
    };
    format!("{scaled:.decimals$}{suffix}")
}

/// A relative change `new` vs `old`: `+12.5%`, `-98%`, `+1.2e17%`, `` (empty) when `old` is 0.
pub fn percent_change(old: f64, new: f64) -> String {
    if old == 0.0 || !old.is_finite() || !new.is_finite() {
        return String::new();
    }
    let change = (new - old) / old.abs() * 100.0;
    if change.abs() >= 1e6 {
        // Scientific, as the figures themselves are (`+1.2e17%`, not 18 digits).
        return format!("{}%", signed(change));
    }
    let text = if change.abs() >= 100.0 {
        format!("{change:+.0}%")
    } else {
        format!("{change:+.1}%")
    };
    text.replace("+0.0%", "0%").replace("-0.0%", "0%")
}

/// A difference with a sign: `+0.4826`, `-4.6e30`, `0`.
pub fn signed(value: f64) -> String {
    if value > 0.0 {
        format!("+{}", number(value))
    } else {
        number(value)
    }
}

/// One value of a stage's figures for people, by its key: `*_bytes` as bytes, `*_seconds` as a
/// duration, `*_per_second` as a rate, `{"base": b, "adapted": a}` as `b → a`, counts grouped,
/// other numbers with significant digits, strings as they are.
pub fn figure(key: &str, value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::Number(number_value) => {
            if let Some(integer) = number_value.as_u64() {
                if key.ends_with("bytes") {
                    return bytes(integer);
                }
                if key.ends_with("per_second") {
                    return si(integer as f64);
                }
                if key.ends_with("seconds") {
                    return seconds(integer as f64);
                }
                return count(integer);
            }
            let float = number_value.as_f64().unwrap_or(f64::NAN);
            if key.ends_with("per_second") {
                si(float)
            } else if key.ends_with("seconds") {
                seconds(float)
            } else if key.ends_with("bytes") && float >= 0.0 {
                bytes(float as u64)
            } else {
                number(float)
            }
        }
        Value::Object(fields) => match (
            fields.get("base").and_then(Value::as_f64),
            fields.get("adapted").and_then(Value::as_f64),
        ) {
            (Some(base), Some(adapted)) => format!("{} → {}", number(base), number(adapted)),
            _ => fields
                .iter()
                .map(|(name, inner)| format!("{name} {}", figure(name, inner)))
                .collect::<Vec<_>>()
                .join(", "),
        },
        Value::String(text) => text.clone(),
        Value::Bool(flag) => flag.to_string(),
        Value::Null => "-".into(),
        Value::Array(items) => items
            .iter()
            .map(|item| figure(key, item))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// `text` cut to at most `width` characters, with `…` when cut.
pub fn fit(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut out: String = text.chars().take(width.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_have_significant_digits() {
        assert_eq!(number(0.006208181381225586), "0.006208");
        assert_eq!(number(0.9826086956521739), "0.9826");
        assert_eq!(number(0.5), "0.5");
        assert_eq!(number(70.59368998486063), "70.59");
        assert_eq!(number(1.0476209782907002), "1.048");
        assert_eq!(number(1150.0), "1150");
        assert_eq!(number(-70.5471681263136), "-70.55");
        assert_eq!(number(999_999.0), "999999");
        assert_eq!(number(0.0), "0");
        assert_eq!(number(f64::NAN), "NaN");
    }

    #[test]
    fn huge_and_tiny_numbers_are_scientific() {
        assert_eq!(number(4.5545976487822755e30), "4.6e30");
        assert_eq!(number(-4.5545976487822755e30), "-4.6e30");
        assert_eq!(number(6.535947712418301e-6), "6.5e-6");
        assert_eq!(number(3e-4), "3e-4");
        assert_eq!(number(2.5e6), "2.5e6");
    }

    #[test]
    fn bytes_have_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(411_152), "402 KiB");
        assert_eq!(bytes(20_000), "19.5 KiB");
        assert_eq!(bytes(5 * 1024 * 1024 * 1024 / 4), "1.2 GiB");
        assert_eq!(bytes(200 * 1024 * 1024), "200 MiB");
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(duration(Duration::from_micros(4_114)), "4ms");
        assert_eq!(duration(Duration::from_millis(580)), "0.58s");
        assert_eq!(duration(Duration::from_millis(7_760)), "7.76s");
        assert_eq!(duration(Duration::from_millis(12_500)), "12.5s");
        assert_eq!(duration(Duration::from_secs(184)), "3m04s");
        assert_eq!(duration(Duration::from_secs(3720)), "1h02m");
        assert_eq!(seconds(59.97), "1m00s");
        assert_eq!(seconds(f64::NAN), "0ms");
    }

    #[test]
    fn rates_and_counts() {
        assert_eq!(si(14_488.319760111659), "14.5k");
        assert_eq!(si(950.2), "950");
        assert_eq!(si(1_234_567.0), "1.23M");
        assert_eq!(count(1202), "1202");
        assert_eq!(count(111_800), "111,800");
        assert_eq!(count(1_234_567), "1,234,567");
    }

    #[test]
    fn changes_are_signed() {
        assert_eq!(percent_change(0.5, 0.9826), "+96.5%");
        assert_eq!(percent_change(70.59, 0.04652), "-99.9%");
        assert_eq!(percent_change(1.0, 3.5), "+250%");
        assert_eq!(percent_change(0.0, 1.0), "");
        // Perplexity 1.108 → 1.3e15 (an adapter that diverged): no 18-digit percentage.
        assert_eq!(percent_change(1.1075, 1.3e15), "+1.2e17%");
        assert_eq!(percent_change(-1.0, 5.0e6), "+5e8%");
        assert_eq!(signed(0.4826086956521739), "+0.4826");
        assert_eq!(signed(-4.5545976487822755e30), "-4.6e30");
    }

    #[test]
    fn figures_by_key() {
        assert_eq!(figure("merged_bytes", &json!(411_152)), "402 KiB");
        assert_eq!(figure("wall_seconds", &json!(7.716560778)), "7.72s");
        assert_eq!(figure("tokens_per_second", &json!(14488.3)), "14.5k");
        assert_eq!(
            figure("final_loss", &json!(0.006208181381225586)),
            "0.006208"
        );
        assert_eq!(figure("tokens", &json!(111_800)), "111,800");
        assert_eq!(
            figure(
                "perplexity",
                &json!({"base": 4.5545976487822755e30, "adapted": 1.0476209782907002})
            ),
            "4.6e30 → 1.048"
        );
        assert_eq!(figure("split", &json!("train")), "train");
    }

    #[test]
    fn fit_cuts_with_an_ellipsis() {
        assert_eq!(fit("abcdef", 10), "abcdef");
        assert_eq!(fit("abcdef", 4), "abc…");
    }
}
