//! Go's `time.ParseDuration` syntax, which Istio's agent uses for its
//! duration variables (`SECRET_TTL=24h`, `90m`, `1h30m`, `1.5h`, `500ms`).

use std::time::Duration;

/// Parses a Go duration. Negative durations and a bare number other than
/// `0` are refused, as Go does; the message says what is wrong.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let original = text;
    let text = text.trim();
    if text.starts_with('-') {
        return Err(format!("`{original}` is negative"));
    }
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err("an empty duration; expected e.g. 24h, 90m or 30s".into());
    }
    let mut total_nanos: f64 = 0.0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("`{original}` is not a duration like 24h, 90m or 1h30m"))?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let nanos_per_unit = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            "" => {
                return Err(format!(
                    "`{original}` has a number without a unit (ns, ms, s, m, h)"
                ));
            }
            other => return Err(format!("`{original}`: unknown unit `{other}`")),
        };
        total_nanos += value * nanos_per_unit;
        rest = after;
    }
    // Go's limit: about 290 years.
    if total_nanos > i64::MAX as f64 {
        return Err(format!("`{original}` is too long"));
    }
    Ok(Duration::from_nanos(total_nanos.round() as u64))
}

/// Formats as Go's `Duration.String()` does for whole seconds (`24h0m0s`,
/// `1m30s`, `45s`), with milliseconds when there are any (`1.5s`).
pub fn go_duration_string(d: Duration) -> String {
    let secs = d.as_secs();
    let millis = d.subsec_millis();
    let seconds = if millis == 0 {
        format!("{}s", secs % 60)
    } else {
        let text = format!("{}.{millis:03}", secs % 60);
        format!("{}s", text.trim_end_matches('0'))
    };
    match (secs / 3600, secs / 60 % 60) {
        (0, 0) => seconds,
        (0, m) => format!("{m}m{seconds}"),
        (h, m) => format!("{h}h{m}m{seconds}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        let ok = |t: &str| parse_go_duration(t).unwrap();
        assert_eq!(ok("24h"), Duration::from_secs(86_400));
        assert_eq!(ok("1h30m"), Duration::from_secs(5_400));
        assert_eq!(ok("90s"), Duration::from_secs(90));
        assert_eq!(ok("1.5h"), Duration::from_secs(5_400));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("2m3s4ms"), Duration::from_millis(123_004));
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok(" 10s "), Duration::from_secs(10));
    }

    #[test]
    fn refuses_what_go_refuses() {
        for bad in ["", "24", "-1h", "1d", "h", "1.2.3s", "10 s"] {
            let err = parse_go_duration(bad).unwrap_err();
            assert!(!err.is_empty(), "{bad}");
        }
        assert!(
            parse_go_duration("1d")
                .unwrap_err()
                .contains("unknown unit `d`")
        );
        assert!(
            parse_go_duration("24")
                .unwrap_err()
                .contains("without a unit")
        );
    }

    #[test]
    fn formats_like_go() {
        assert_eq!(go_duration_string(Duration::from_secs(86_400)), "24h0m0s");
        assert_eq!(go_duration_string(Duration::from_secs(90)), "1m30s");
        assert_eq!(go_duration_string(Duration::from_secs(45)), "45s");
        assert_eq!(go_duration_string(Duration::from_millis(1_500)), "1.5s");
    }
}
