//! Parsing and printing of the quantities operators type and read: byte rates (`--max-bandwidth
//! 100M`), durations (`--timeout 10m`) and byte counts in progress lines.
//!
//! Suffixes are binary (`M` = MiB) because QEMU's own numbers are, and an operator comparing our
//! progress with `info migrate` should see the same figures.

use std::time::Duration;

/// Why a `RATE` or `DUR` argument was rejected; the message is shown as is by clap.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// Nothing was given.
    #[error("empty value")]
    Empty,
    /// The number part is not a (non-negative, possibly fractional) number.
    #[error("`{0}` is not a number followed by an optional unit")]
    NotANumber(String),
    /// The unit is not one we know.
    #[error("unknown unit `{unit}` in `{value}` (expected {expected})")]
    UnknownUnit {
        /// The whole value as given.
        value: String,
        /// The unit part.
        unit: String,
        /// The units that would have been accepted.
        expected: &'static str,
    },
    /// The value is zero where zero would not mean anything useful.
    #[error("`{0}` must be greater than zero")]
    Zero(String),
    /// The value does not fit.
    #[error("`{0}` is too large")]
    TooLarge(String),
}

/// Splits `"512MiB"` into `(512.0, "MiB")`.
fn split_number(value: &str) -> Result<(f64, &str), UnitError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(UnitError::Empty);
    }
    let end = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(end);
    let number: f64 = number
        .parse()
        .map_err(|_| UnitError::NotANumber(value.to_owned()))?;
    Ok((number, unit.trim()))
}

/// Parses a byte rate in bytes per second: `1000`, `100M`, `1G`, `512MiB`, `2.5GiB/s`, `64k`.
///
/// `K`, `M`, `G`, `T` are powers of 1024 whether or not an `i` or `B` follows; a trailing `/s`
/// is accepted because people write rates that way. Zero is rejected: QEMU would read it as
/// "no limit" on some versions and as "stop" in the operator's head.
pub fn parse_rate(value: &str) -> Result<u64, UnitError> {
    let (number, unit) = split_number(value)?;
    let unit = unit.strip_suffix("/s").unwrap_or(unit);
    let lower = unit.to_ascii_lowercase();
    // One optional "B", then one optional "i" after a prefix: "MiB", "MB", "Mi", "M", "B".
    let prefix = lower.strip_suffix('b').unwrap_or(&lower);
    let prefix = match prefix.strip_suffix('i') {
        Some(p) if !p.is_empty() => p,
        _ => prefix,
    };
    let scale: u64 = match prefix {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => {
            return Err(UnitError::UnknownUnit {
                value: value.to_owned(),
                unit: unit.to_owned(),
                expected: "B, K, M, G, T, optionally as KiB, MiB, ... and /s",
            })
        }
    };
    let bytes = number * scale as f64;
    if bytes >= u64::MAX as f64 {
        return Err(UnitError::TooLarge(value.to_owned()));
    }
    let bytes = bytes.round() as u64;
    if bytes == 0 {
        return Err(UnitError::Zero(value.to_owned()));
    }
    Ok(bytes)
}

/// Parses a duration: `500ms`, `30s`, `10m`, `1h`, `1.5s`; a bare number is seconds.
pub fn parse_duration(value: &str) -> Result<Duration, UnitError> {
    let (number, unit) = split_number(value)?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "" | "s" | "sec" => number,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        _ => {
            return Err(UnitError::UnknownUnit {
                value: value.to_owned(),
                unit: unit.to_owned(),
                expected: "ms, s, m or h",
            })
        }
    };
    let duration =
        Duration::try_from_secs_f64(seconds).map_err(|_| UnitError::TooLarge(value.to_owned()))?;
    if duration.is_zero() {
        return Err(UnitError::Zero(value.to_owned()));
    }
    Ok(duration)
}

/// A duration as [`parse_duration`] reads it, or `off` for never (zero).
pub fn parse_duration_or_off(value: &str) -> Result<Duration, UnitError> {
    if value.eq_ignore_ascii_case("off") {
        return Ok(Duration::ZERO);
    }
    parse_duration(value)
}

/// Formats a byte count with a binary unit: `0 B`, `512 B`, `1.50 MiB`, `12.3 GiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = UNITS[0];
    for next in &UNITS[1..] {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    if value < 10.0 {
        format!("{value:.2} {unit}")
    } else if value < 100.0 {
        format!("{value:.1} {unit}")
    } else {
        format!("{value:.0} {unit}")
    }
}

/// Formats a rate in bytes per second: `1.50 GiB/s`.
pub fn format_rate(bytes_per_second: f64) -> String {
    if !bytes_per_second.is_finite() || bytes_per_second <= 0.0 {
        return "0 B/s".to_owned();
    }
    format!("{}/s", format_bytes(bytes_per_second as u64))
}

/// Formats a duration for humans: `850ms`, `12.3s`, `4m05s`, `1h02m`.
pub fn format_duration(duration: Duration) -> String {
    let ms = duration.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", duration.as_secs_f64())
    } else if ms < 3_600_000 {
        let s = duration.as_secs();
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        let m = duration.as_secs() / 60;
        format!("{}h{:02}m", m / 60, m % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("1000"), Ok(1000));
        assert_eq!(parse_rate("100M"), Ok(100 << 20));
        assert_eq!(parse_rate("1G"), Ok(1 << 30));
        assert_eq!(parse_rate("512MiB"), Ok(512 << 20));
        assert_eq!(parse_rate("64k"), Ok(64 << 10));
        assert_eq!(parse_rate("2.5GiB/s"), Ok(5 << 29));
        assert_eq!(parse_rate("20MB"), Ok(20 << 20));
        assert_eq!(parse_rate("7B"), Ok(7));
        assert_eq!(parse_rate("3Mi"), Ok(3 << 20));
        assert_eq!(parse_rate(" 1 T "), Ok(1 << 40));
    }

    #[test]
    fn bad_rates() {
        assert_eq!(parse_rate(""), Err(UnitError::Empty));
        assert!(matches!(parse_rate("fast"), Err(UnitError::NotANumber(_))));
        assert!(matches!(parse_rate("-5M"), Err(UnitError::NotANumber(_))));
        assert!(matches!(
            parse_rate("5X"),
            Err(UnitError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_rate("5iB"),
            Err(UnitError::UnknownUnit { .. })
        ));
        assert!(matches!(parse_rate("0M"), Err(UnitError::Zero(_))));
        assert!(matches!(
            parse_rate("5bb"),
            Err(UnitError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_rate("99999999999T"),
            Err(UnitError::TooLarge(_))
        ));
        assert_eq!(
            parse_rate("5X").expect_err("unknown unit").to_string(),
            "unknown unit `X` in `5X` (expected B, K, M, G, T, optionally as KiB, MiB, ... and /s)"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(matches!(
            parse_duration("5d"),
            Err(UnitError::UnknownUnit { .. })
        ));
        assert!(matches!(parse_duration("0s"), Err(UnitError::Zero(_))));
        assert_eq!(parse_duration_or_off("off"), Ok(Duration::ZERO));
        assert_eq!(parse_duration_or_off("45s"), Ok(Duration::from_secs(45)));
        assert!(matches!(
            parse_duration_or_off("0"),
            Err(UnitError::Zero(_))
        ));
        assert!(matches!(
            parse_duration("soon"),
            Err(UnitError::NotANumber(_))
        ));
    }

    #[test]
    fn formatting() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1536 << 10), "1.50 MiB");
        assert_eq!(format_bytes(256 << 20), "256 MiB");
        assert_eq!(format_bytes(20 << 30), "20.0 GiB");
        assert_eq!(format_rate(1024.0 * 1024.0), "1.00 MiB/s");
        assert_eq!(format_rate(f64::NAN), "0 B/s");
        assert_eq!(format_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(format_duration(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(format_duration(Duration::from_secs(245)), "4m05s");
        assert_eq!(format_duration(Duration::from_secs(3720)), "1h02m");
    }
}
