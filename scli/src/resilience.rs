//! `--query_resilience`: what losing each SDS, fault set or device would do, as the MDM leader
//! computed it (`proto::resilience`), and which single losses the cluster cannot survive now.

use proto::capacity::human;
use proto::msg::ClusterStatus;
use serde_json::Value;
use std::fmt::Write;

/// The text (a table, worst first) and JSON of the leader's analysis in `c`.
pub fn render(c: &ClusterStatus) -> anyhow::Result<(String, Value)> {
    let Some(r) = &c.resilience else {
        anyhow::bail!("the MDM sent no resilience analysis (an MDM older than this scli?)");
    };
    let mut t = String::new();
    let _ = writeln!(
        t,
        "Now: {} PGs with a single copy, {} with none reachable",
        r.pgs_single_copy_now, r.pgs_unavailable_now
    );
    let rate = match r.copy_rate_source.as_str() {
        "unknown" => "unknown (no rebuild bandwidth limit and no rebuild running)".to_string(),
        src => format!("{}/s ({src})", human(r.copy_bytes_per_sec)),
    };
    let _ = writeln!(t, "Copy rate for the estimates: {rate}");
    if r.cannot_survive.is_empty() {
        let _ = writeln!(
            t,
            "No single loss would leave a PG without a reachable copy."
        );
    } else {
        let _ = writeln!(
            t,
            "Cannot survive now (PGs would have no reachable copy): {}",
            r.cannot_survive.join(", ")
        );
    }
    let _ = writeln!(
        t,
        "\n{:<10} {:<28} {:>14} {:>15} {:>12} {:>10}",
        "If lost", "name", "PGs one copy", "PGs no copy", "to rebuild", "takes"
    );
    for l in &r.losses {
        let takes = l
            .rebuild_seconds
            .map_or_else(|| "?".to_string(), |s| format!("{s} s"));
        let _ = writeln!(
            t,
            "{:<10} {:<28} {:>14} {:>15} {:>12} {:>10}",
            l.kind,
            l.name,
            l.pgs_single_copy,
            l.pgs_unavailable,
            human(l.rebuild_bytes),
            takes
        );
    }
    Ok((t.trim_end().to_string(), serde_json::to_value(r)?))
}
