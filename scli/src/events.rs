//! `--query_events [--since WHEN]`: what the MDMs recorded (SDS down and up, failed devices,
//! rebuilds started and finished, takeovers, leader changes, logins, users' commands), oldest
//! first, and how `--since` is read. Pure: computed from the query's answer.

use proto::clock::{parse_rfc3339, rfc3339};
use proto::model::ClusterState;
use serde_json::Value;

/// `--since`: an RFC 3339 time in UTC (`2026-12-06T15:00:00Z`), Unix seconds, or a span back
/// from `now` (`90s`, `30m`, `2h`, `7d`).
pub fn parse_since(s: &str, now: u64) -> anyhow::Result<u64> {
    let s = s.trim();
    if let Some(t) = parse_rfc3339(s) {
        return Ok(t);
    }
    if let Ok(t) = s.parse::<u64>() {
        return Ok(t);
    }
    let unit = s.chars().last().unwrap_or(' ');
    let per = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => 0,
    };
    let n = s[..s.len() - unit.len_utf8().min(s.len())]
        .parse::<u64>()
        .ok();
    match n.filter(|_| per > 0) {
        Some(n) => Ok(now.saturating_sub(n.saturating_mul(per))),
        None => anyhow::bail!(
            "--since {s:?}: give a UTC time (2026-12-06T15:00:00Z), Unix seconds, or a span back from now (90s, 30m, 2h, 7d)"
        ),
    }
}

/// The text (one line per event) and JSON (the list) of the events in `s`.
pub fn render(s: &ClusterState) -> (String, Value) {
    let text = if s.events.is_empty() {
        "No events".to_string()
    } else {
        s.events
            .iter()
            .map(|e| {
                format!(
                    "{}  {:<7}  {:<16}  {:<12}  {}",
                    if e.unix > 0 {
                        rfc3339(e.unix)
                    } else {
                        "-".repeat(20)
                    },
                    e.severity.to_string(),
                    e.kind,
                    e.actor,
                    e.message
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let json = serde_json::to_value(&s.events).unwrap_or(Value::Null);
    (text, json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_times_seconds_and_spans() {
        let now = 1_800_000_000;
        assert_eq!(
            parse_since("2026-12-06T15:00:00Z", now).ok(),
            Some(1_796_569_200)
        );
        assert_eq!(parse_since("1700000000", now).ok(), Some(1_700_000_000));
        assert_eq!(parse_since("90s", now).ok(), Some(now - 90));
        assert_eq!(parse_since("30m", now).ok(), Some(now - 1800));
        assert_eq!(parse_since("2h", now).ok(), Some(now - 7200));
        assert_eq!(parse_since("7d", now).ok(), Some(now - 7 * 86_400));
        for bad in ["", "m", "5w", "yesterday", "-5m", "2026-12-06"] {
            assert!(parse_since(bad, now).is_err(), "{bad}");
        }
    }
}
