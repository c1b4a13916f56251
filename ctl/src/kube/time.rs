//! Times and durations as Kubernetes writes them: RFC 3339 timestamps, kubectl's short ages
//! ("5m", "3h12m") and Go durations ("1m30s").

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the epoch of an RFC 3339 UTC timestamp as vmsnapd writes it
/// (`2026-11-26T14:03:12Z`, optionally with a fraction or a `+00:00` offset).
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    if bytes.len() < 20 {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        if !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if text.get(4..5)? != "-" || text.get(7..8)? != "-" || text.get(13..14)? != ":" {
        return None;
    }
    if !matches!(text.get(10..11)?, "T" | "t" | " ") || text.get(16..17)? != ":" {
        return None;
    }
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    if second > 60 {
        return None;
    }
    let mut rest = text.get(19..)?;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = fraction.get(digits..)?;
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.get(0..1)? {
                "+" => 1,
                "-" => -1,
                _ => return None,
            };
            if rest.len() != 6 || rest.get(3..4)? != ":" {
                return None;
            }
            let h: i64 = rest.get(1..3)?.parse().ok()?;
            let m: i64 = rest.get(4..6)?.parse().ok()?;
            sign * (h * 3600 + m * 60)
        }
    };
    Some(days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second - offset)
}

/// Days since 1970-01-01 of a date in the proleptic Gregorian calendar (Howard Hinnant's
/// algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Now, in seconds since the epoch.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// kubectl's age of a timestamp ("45s", "5m", "3h12m", "2d3h", "400d"); `<unknown>` when it
/// cannot be read, `<invalid>` when it lies in the future by more than a few seconds.
pub fn age(timestamp: &str, now: i64) -> String {
    let Some(then) = parse_rfc3339(timestamp) else {
        return "<unknown>".to_string();
    };
    let seconds = now - then;
    if seconds < -2 {
        return "<invalid>".to_string();
    }
    human_duration(seconds.max(0))
}

/// kubectl's `HumanDuration`, to the precision it uses.
pub fn human_duration(seconds: i64) -> String {
    let minutes = seconds / 60;
    let hours = seconds / 3600;
    if seconds < 120 {
        format!("{seconds}s")
    } else if minutes < 10 {
        let s = seconds % 60;
        if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        }
    } else if minutes < 180 {
        format!("{minutes}m")
    } else if hours < 8 {
        let m = minutes % 60;
        if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        }
    } else if hours < 48 {
        format!("{hours}h")
    } else if hours < 24 * 8 {
        let h = hours % 24;
        if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        }
    } else if hours < 24 * 365 * 2 {
        format!("{}d", hours / 24)
    } else if hours < 24 * 365 * 8 {
        let d = (hours / 24) % 365;
        if d == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{d}d", hours / 24 / 365)
        }
    } else {
        format!("{}y", hours / 24 / 365)
    }
}

/// A Go duration (`time.ParseDuration`): a sequence of decimal numbers with units `ns`, `us`
/// (or `µs`), `ms`, `s`, `m`, `h`, such as `1m30s`, `1.5h` or `300ms`; `0` alone is zero.
/// Negative durations are refused.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration (examples: 90s, 1m30s, 2h)");
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.is_empty() || text.starts_with('-') {
        return Err(bad());
    }
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .bytes()
            .take_while(|b| b.is_ascii_digit() || *b == b'.')
            .count();
        if number_len == 0 {
            return Err(bad());
        }
        let number: f64 = rest
            .get(..number_len)
            .ok_or_else(bad)?
            .parse()
            .map_err(|_| bad())?;
        rest = rest.get(number_len..).ok_or_else(bad)?;
        let unit_len = rest
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(rest.len(), |(i, _)| i);
        let unit = rest.get(..unit_len).ok_or_else(bad)?;
        rest = rest.get(unit_len..).ok_or_else(bad)?;
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += number * scale;
    }
    if !total.is_finite() || total > 1e12 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2026-11-26T14:03:12Z"), Some(1_795_701_792));
        assert_eq!(
            parse_rfc3339("2026-11-26T14:03:12.25Z"),
            Some(1_795_701_792)
        );
        assert_eq!(
            parse_rfc3339("2026-11-26T15:03:12+01:00"),
            Some(1_795_701_792)
        );
        for bad in [
            "",
            "2026-11-26",
            "2026-13-26T14:03:12Z",
            "2026-11-26T14:03:12",
            "x026-11-26T14:03:12Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn ages() {
        let now = 1_795_701_792;
        assert_eq!(age("2026-11-26T14:03:12Z", now), "0s");
        assert_eq!(age("2026-11-26T14:02:12Z", now), "60s");
        assert_eq!(age("2026-11-26T13:58:02Z", now), "5m10s");
        assert_eq!(age("2026-11-26T11:03:12Z", now), "3h");
        assert_eq!(age("2026-11-24T11:03:12Z", now), "2d3h");
        assert_eq!(age("", now), "<unknown>");
        assert_eq!(age("2026-11-26T15:03:12Z", now), "<invalid>");
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_go_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_go_duration("2h45m"), Ok(Duration::from_secs(9900)));
        for bad in ["", "5", "-1s", "1x", "m", "1m30", "1.2.3s", "s1"] {
            assert!(parse_go_duration(bad).is_err(), "{bad}");
        }
    }
}
