//! Long operations followed to their end: `--remove_sds --wait` and `--remove_sds_device
//! --wait` show a progress line (chunks and PG copies left to move, the copy rate, an ETA)
//! until the SDS or device is gone; `--add_sds --wait` until the rebalance onto the new SDS is
//! over; `--query_storage_pool --watch` redraws the pool every two
//! seconds until interrupted. On a terminal the line is rewritten in place (the pool view
//! redrawn); otherwise each update is a plain line, for logs.

use crate::client;
use anyhow::{anyhow, bail};
use proto::capacity::human;
use proto::client::MdmClient;
use proto::model::ClusterState;
use proto::msg::{ClusterStatus, MdmRequest, MdmResponse, Query};
use std::io::{IsTerminal, Write};
use std::time::Duration;

/// What `--wait` follows.
pub enum Waited {
    /// An SDS being removed: done when the map no longer has it.
    Sds(String),
    /// A device being removed: done when its SDS no longer lists it.
    Device { sds: String, path: String },
    /// A new SDS: done when it serves and no pool of its protection domain has PG moves in
    /// flight or planned.
    Added(String),
}

/// How often the progress is asked for.
const POLL: Duration = Duration::from_secs(1);

async fn view(c: &MdmClient, token: &str) -> anyhow::Result<(ClusterStatus, ClusterState)> {
    let r = client::request(
        c,
        &MdmRequest::Query {
            token: token.into(),
            query: Query::All,
        },
    )
    .await?;
    match r {
        MdmResponse::View { status, state } => Ok((*status, *state)),
        _ => Err(anyhow!("unexpected answer from the MDM")),
    }
}

/// Print `line` as the current progress: in place on a terminal, a line of its own otherwise.
fn show(line: &str, tty: bool) {
    let mut out = std::io::stdout();
    let _ = if tty {
        write!(out, "\r{line}\x1b[K")
    } else {
        writeln!(out, "{line}")
    };
    let _ = out.flush();
}

/// The copy rate (rebuild and rebalance) of the SDS of `x`'s protection domain, bytes/s.
fn copy_rate(c: &ClusterStatus, s: &ClusterState, x: &proto::model::Sds) -> u64 {
    s.sds
        .values()
        .filter(|y| y.pd == x.pd)
        .filter_map(|y| c.sds_stats.get(&y.name))
        .map(|y| y.rebuild_bytes_per_sec)
        .sum()
}

/// The rebalance onto a new SDS: a progress line, or `None` once it is over.
fn rebalance(name: &str, c: &ClusterStatus, s: &ClusterState) -> Option<String> {
    let x = s.sds_by_name(name)?;
    let pools: Vec<_> = s.pools.values().filter(|p| p.pd == x.pd).collect();
    let moves: u32 = pools.iter().map(|p| s.pool_health(p).rebalancing_pgs).sum();
    let planned: u64 = pools
        .iter()
        .filter_map(|p| c.rebalance_moves_planned.get(&p.name))
        .sum();
    let serving = x.state == proto::model::SdsState::Normal;
    if serving && moves == 0 && planned == 0 {
        return None;
    }
    let copies = pools
        .iter()
        .flat_map(|p| p.pgs.iter())
        .filter(|m| m.primary == Some(x.id) || m.secondary == Some(x.id))
        .count();
    let rate = copy_rate(c, s, x);
    if !serving {
        return Some(format!(
            "Adding SDS {name}: waiting for it to report ({:?})",
            x.state
        ));
    }
    Some(format!(
        "Rebalancing onto SDS {name}: {moves} PG moves in flight and {planned} more planned, {copies} PG copies on it, {}/s",
        human(rate)
    ))
}

/// One progress line for `w`, or `None` once it is done.
fn progress(w: &Waited, c: &ClusterStatus, s: &ClusterState) -> Option<String> {
    let (x, what) = match w {
        Waited::Added(name) => return rebalance(name, c, s),
        Waited::Sds(name) => (s.sds_by_name(name)?, format!("SDS {name}")),
        Waited::Device { sds, path } => {
            let x = s.sds_by_name(sds)?;
            x.devices.iter().find(|d| &d.path == path)?;
            (x, format!("device {path} of SDS {sds}"))
        }
    };
    let st = c.sds_stats.get(&x.name).cloned().unwrap_or_default();
    let left = match w {
        Waited::Device { .. } => st.chunks_draining,
        Waited::Sds(_) | Waited::Added(_) => st.chunks_stored,
    };
    let copies: usize = s
        .pools
        .values()
        .flat_map(|p| p.pgs.iter())
        .filter(|m| [m.primary, m.secondary, m.leaving].contains(&Some(x.id)))
        .count();
    let rate = copy_rate(c, s, x);
    let eta = match (w, rate) {
        (Waited::Sds(_), r) if r > 0 => format!("ETA {} s", (left << 20).div_ceil(r)),
        _ => "ETA unknown".into(),
    };
    Some(format!(
        "Removing {what}: {left} chunks ({}) and {copies} PG copies left, {}/s, {eta}",
        human(left << 20),
        human(rate)
    ))
}

/// Follow `w` until it is done, printing progress; returns the closing line.
pub async fn wait(c: &MdmClient, token: &str, w: Waited) -> anyhow::Result<String> {
    let tty = std::io::stdout().is_terminal();
    let started = std::time::Instant::now();
    loop {
        let (status, state) = view(c, token).await?;
        match progress(&w, &status, &state) {
            Some(line) => show(&line, tty),
            None => {
                if tty {
                    println!();
                }
                let secs = started.elapsed().as_secs();
                return Ok(match &w {
                    Waited::Sds(name) => format!("SDS {name} removed after {secs} s."),
                    Waited::Device { sds, path } => {
                        format!("Device {path} of SDS {sds} removed after {secs} s.")
                    }
                    Waited::Added(name) => {
                        format!("SDS {name} serves; the rebalance onto it ended after {secs} s.")
                    }
                });
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Redraw `render(view)` every two seconds until interrupted (Ctrl-C ends it).
pub async fn watch(
    c: &MdmClient,
    token: &str,
    render: impl Fn(&ClusterStatus, &ClusterState) -> anyhow::Result<String>,
) -> anyhow::Result<String> {
    let tty = std::io::stdout().is_terminal();
    loop {
        let (status, state) = view(c, token).await?;
        let text = render(&status, &state)?;
        let now = proto::clock::rfc3339(proto::clock::now_unix());
        let mut out = std::io::stdout();
        let written = if tty {
            write!(out, "\x1b[H\x1b[2J{now}\n{text}\n")
        } else {
            write!(out, "--- {now}\n{text}\n")
        };
        if written.and_then(|_| out.flush()).is_err() {
            bail!("stdout closed");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(String::new()),
        }
    }
}
