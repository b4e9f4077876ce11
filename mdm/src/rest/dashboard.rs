//! The web dashboard: one server-rendered HTML page, no script and nothing fetched from
//! elsewhere, that refreshes itself every [`REFRESH_SECS`]. It answers, top first: is the
//! cluster healthy, and if not what is wrong (a headline in words, not only in colour); the
//! MDMs, pools (state, PGs, capacity, rebuild with rate and ETA), SDS, SDCs and volumes; which
//! single loss the cluster cannot survive now; I/O plots of the last hour per pool, SDS and
//! volume (inline SVG from [`crate::history`]); the latest events.
//!
//! Behind the same login as scli: `GET /login` shows a form, `POST /login` sets the session
//! cookie (see [`super`]), `POST /logout` clears it. Any logged-in user (Monitor and up) may
//! look; the page changes nothing.

use super::{session_cookie, token, Client, Shared};
use crate::history::{Point, Subject};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use proto::capacity::{human, pool_capacity, pool_rebuild};
use proto::model::{ClusterState, DeviceState, SdsState, Severity};
use proto::msg::{ClusterStatus, MdmResponse, Query, SDC_SESSION_MS};
use serde::Deserialize;
use std::fmt::Write;

/// Seconds between the page's reloads.
pub const REFRESH_SECS: u64 = 5;
/// Volumes plotted (the busiest); the rest are listed without plots.
const PLOTTED_VOLUMES: usize = 12;
/// Events shown.
const EVENTS_SHOWN: usize = 15;

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/", get(page))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
}

/// Escape text for HTML.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '&' => o.push_str("&amp;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}\
header{padding:12px 20px;color:#fff}header h1{margin:0;font-size:22px}header p{margin:4px 0 0}\
.ok{background:#1a7f37}.warn{background:#9a6700}.bad{background:#cf222e}\
main{padding:8px 20px 24px}section{background:#fff;border:1px solid #d0d7de;border-radius:6px;\
margin:12px 0;padding:8px 12px}h2{font-size:16px;margin:4px 0 8px}table{border-collapse:collapse;\
width:100%}th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #eaeef2;vertical-align:top}\
th{font-weight:600;color:#57606a}.state{font-weight:600;padding:1px 6px;border-radius:4px;color:#fff}\
.bar{width:140px;height:10px;background:#eaeef2;border-radius:5px;display:inline-block;\
vertical-align:middle;margin-right:6px}.bar span{display:block;height:10px;border-radius:5px}\
svg{background:#fbfcfd;border:1px solid #eaeef2}.plots td{white-space:nowrap}\
.muted{color:#57606a}form.inline{display:inline;float:right}";

/// The colour class of a state word.
fn class_of(state: &str) -> &'static str {
    match state {
        "Normal" | "Connected" | "Leader" | "Follower" | "Active" | "Info" => "ok",
        "Unavailable" | "Down" | "Failed" | "Error" | "Disconnected" | "Inactive" => "bad",
        _ => "warn",
    }
}

fn badge(state: &str) -> String {
    format!(
        "<span class=\"state {}\">{}</span>",
        class_of(state),
        esc(state)
    )
}

/// A capacity bar: `used` of `total`, labelled in words.
fn bar(used: u64, total: u64) -> String {
    let pct = proto::capacity::percent(used, total).min(100);
    let colour = match pct {
        90.. => "#cf222e",
        80.. => "#9a6700",
        _ => "#1a7f37",
    };
    format!(
        "<span class=\"bar\" role=\"img\" aria-label=\"{pct}% used\"><span style=\"width:{pct}%;background:{colour}\"></span></span>{} of {} ({pct}%)",
        human(used),
        human(total)
    )
}

/// A rate of bytes per second for people: KiB/s, MiB/s with a decimal below 100, GiB/s.
fn rate(bps: f64) -> String {
    const MIB: f64 = (1u64 << 20) as f64;
    if bps < MIB {
        format!("{:.0} KiB/s", bps / 1024.0)
    } else if bps < 100.0 * MIB {
        format!("{:.1} MiB/s", bps / MIB)
    } else if bps < 1024.0 * MIB {
        format!("{:.0} MiB/s", bps / MIB)
    } else {
        format!("{:.2} GiB/s", bps / (1024.0 * MIB))
    }
}

/// What a plot shows.
#[derive(Clone, Copy)]
enum Metric {
    Iops,
    Bandwidth,
    Latency,
}

impl Metric {
    fn value(self, p: &Point) -> f64 {
        match self {
            Metric::Iops => f64::from(p.iops()),
            Metric::Bandwidth => f64::from(p.bps()),
            Metric::Latency => f64::from(p.latency_us()) / 1000.0,
        }
    }

    fn label(self, v: f64) -> String {
        match self {
            Metric::Iops => format!("{v:.0} IOPS"),
            Metric::Bandwidth => rate(v),
            Metric::Latency => format!("{v:.2} ms"),
        }
    }
}

/// A line plot over the last hour (or since the first sample, when that is later, but at
/// least a minute), with the latest and highest values in words.
fn plot(points: &[Point], metric: Metric, now: u64, what: &str) -> String {
    const W: f64 = 220.0;
    const H: f64 = 44.0;
    let max = points
        .iter()
        .map(|p| metric.value(p))
        .fold(0.0_f64, f64::max);
    let last = points.last().map_or(0.0, |p| metric.value(p));
    let first = points.first().map_or(now, |p| p.unix);
    let span = now.saturating_sub(first).clamp(60, 3600);
    let start = now.saturating_sub(span) as f64;
    let coords: Vec<String> = points
        .iter()
        .map(|p| {
            let x = ((p.unix as f64 - start) / span as f64 * W).clamp(0.0, W);
            let y = if max > 0.0 {
                H - metric.value(p) / max * (H - 4.0)
            } else {
                H
            };
            format!("{x:.1},{y:.1}")
        })
        .collect();
    let minutes = span.div_ceil(60);
    let summary = format!(
        "{what}, last {minutes} min: now {}, peak {}",
        metric.label(last),
        metric.label(max)
    );
    format!(
        "<svg width=\"{W}\" height=\"{H}\" role=\"img\" aria-label=\"{}\"><title>{}</title><polyline fill=\"none\" stroke=\"#0969da\" stroke-width=\"1.5\" points=\"{}\"/></svg><br><span class=\"muted\">{} (peak {})</span>",
        esc(&summary),
        esc(&summary),
        coords.join(" "),
        esc(&metric.label(last)),
        esc(&metric.label(max))
    )
}

/// One table row of three plots for `name`.
fn plot_row(name: &str, points: &[Point], now: u64) -> String {
    format!(
        "<tr><th scope=\"row\">{}</th><td>{}</td><td>{}</td><td>{}</td></tr>",
        esc(name),
        plot(points, Metric::Iops, now, &format!("{name} IOPS")),
        plot(points, Metric::Bandwidth, now, &format!("{name} bandwidth")),
        plot(points, Metric::Latency, now, &format!("{name} latency"))
    )
}

const PLOT_HEAD: &str = "<tr><th scope=\"col\"></th><th scope=\"col\">IOPS</th><th scope=\"col\">Bandwidth</th><th scope=\"col\">Mean latency</th></tr>";

/// A rebuild's or rebalance's progress in words: PGs and bytes left, rate, ETA.
fn progress_text(r: &proto::capacity::RebuildProgress) -> String {
    let mut t = format!(
        "{} PGs left, {} at most",
        r.pgs_left,
        human(r.bytes_left_at_most)
    );
    if r.bytes_per_sec > 0 {
        let _ = write!(t, " at {}", rate(r.bytes_per_sec as f64));
    }
    match r.eta_seconds {
        Some(e) => {
            let _ = write!(t, ", ETA {e} s");
        }
        None => t.push_str(", waiting to copy"),
    }
    t
}

/// The overall verdict: a class and a headline listing what is wrong.
fn verdict(s: &ClusterState, c: &ClusterStatus) -> (&'static str, String, Vec<String>) {
    let mut problems = Vec::new();
    let mut worst = 0;
    if c.leader.is_none() {
        problems.push("no MDM leader".to_string());
        worst = 2;
    }
    if c.active < c.total {
        problems.push(format!(
            "{} of {} MDMs unreachable",
            c.total - c.active,
            c.total
        ));
        worst = worst.max(1);
    }
    for x in s.sds.values() {
        if x.state == SdsState::Down {
            problems.push(format!("SDS {} is down", x.name));
            worst = worst.max(1);
        }
        for d in x.devices.iter().filter(|d| d.state == DeviceState::Failed) {
            problems.push(format!("device {}:{} failed", x.name, d.path));
            worst = worst.max(1);
        }
    }
    for p in s.pools.values() {
        let h = s.pool_health(p);
        if h.state == "Normal" {
            continue;
        }
        let r = pool_rebuild(s, &c.sds_stats, p.id);
        let mut line = format!("pool {} is {}", p.name, h.state.to_lowercase());
        if r.pgs_left > 0 {
            let _ = write!(line, " ({})", progress_text(&r));
        }
        problems.push(line);
        worst = worst.max(if h.state == "Unavailable" { 2 } else { 1 });
    }
    let (class, word) = match worst {
        0 => ("ok", "Healthy"),
        1 => ("warn", "Degraded"),
        _ => ("bad", "Data unavailable"),
    };
    (class, word.to_string(), problems)
}

/// The dashboard for a logged-in user; the login form for anyone else.
async fn page(State(r): State<Shared>, h: HeaderMap) -> Response {
    let Some(t) = token(&h, true) else {
        return Redirect::to("/login").into_response();
    };
    let (c, s) = match r.svc.query_as(&t, &Query::Resilience) {
        Ok(MdmResponse::View { status, state }) => (*status, *state),
        Ok(_) => return (StatusCode::INTERNAL_SERVER_ERROR, "unexpected answer").into_response(),
        Err(e) if e.code == proto::ErrorCode::Unauthenticated => {
            return Redirect::to("/login?expired=1").into_response()
        }
        Err(e) => return super::ApiError::from(e).into_response(),
    };
    let events: Vec<proto::model::Event> = {
        let full = r.svc.raft.shared.read_state();
        full.events
            .iter()
            .rev()
            .take(EVENTS_SHOWN)
            .cloned()
            .collect()
    };
    let html = render(&r, &s, &c, &events);
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        ],
        html,
    )
        .into_response()
}

fn render(
    r: &super::Rest,
    s: &ClusterState,
    c: &ClusterStatus,
    events: &[proto::model::Event],
) -> String {
    let now = proto::clock::now_unix();
    let (class, word, problems) = verdict(s, c);
    let mut o = String::with_capacity(64 << 10);
    let title = format!("Meshblock: {word}");
    let _ = write!(
        o,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\"><meta name=\"viewport\" content=\"width=device-width\"><title>{}</title><style>{STYLE}</style></head><body>",
        esc(&title)
    );
    let headline = if problems.is_empty() {
        "Every MDM, SDS and pool is normal.".to_string()
    } else {
        format!("{}.", problems.join("; "))
    };
    let _ = write!(
        o,
        "<header class=\"{class}\" id=\"health\" data-health=\"{}\"><form class=\"inline\" method=\"post\" action=\"/logout\"><button>Log out</button></form><h1>Cluster {}</h1><p id=\"headline\">{}</p><p class=\"small\">Refreshed {} UTC every {REFRESH_SECS} s · leader {}</p></header><main>",
        esc(&word),
        esc(&word),
        esc(&headline),
        esc(&proto::clock::rfc3339(now)),
        esc(&c.leader.as_ref().map_or("none".into(), |l| l.name.clone()))
    );
    mdms(&mut o, c);
    pools(&mut o, s, c);
    resilience(&mut o, c);
    sds(&mut o, s, c);
    sdcs(&mut o, s, c);
    plots(&mut o, r, s, now);
    events_table(&mut o, events);
    o.push_str("</main></body></html>");
    o
}

fn mdms(o: &mut String, c: &ClusterStatus) {
    let _ = write!(
        o,
        "<section id=\"mdms\"><h2>MDMs: {} of {} active, {}</h2><table><tr><th scope=\"col\">Name</th><th scope=\"col\">Role</th><th scope=\"col\">Address</th><th scope=\"col\">State</th></tr>",
        c.active,
        c.total,
        esc(&format!("{:?}", c.mode))
    );
    let rows = c
        .leader
        .iter()
        .map(|m| (m, "Leader"))
        .chain(c.followers.iter().map(|m| (m, "Follower")))
        .chain(c.standbys.iter().map(|m| (m, "Standby")));
    for (m, role) in rows {
        let state = if m.active { "Active" } else { "Inactive" };
        let _ = write!(
            o,
            "<tr><td>{}</td><td>{role}</td><td>{}</td><td>{}</td></tr>",
            esc(&m.name),
            esc(&m.addr),
            badge(state)
        );
    }
    o.push_str("</table></section>");
}

fn pools(o: &mut String, s: &ClusterState, c: &ClusterStatus) {
    o.push_str("<section id=\"pools\"><h2>Storage pools</h2><table><tr><th scope=\"col\">Pool</th><th scope=\"col\">State</th><th scope=\"col\">PGs</th><th scope=\"col\">Used of usable</th><th scope=\"col\">Provisioned</th><th scope=\"col\">Rebuild / rebalance</th></tr>");
    for p in s.pools.values() {
        let h = s.pool_health(p);
        let cap = pool_capacity(s, &c.sds_stats, p.id);
        let r = pool_rebuild(s, &c.sds_stats, p.id);
        let pd = s.pds.get(&p.pd).map_or("", |d| d.name.as_str());
        let progress = if r.pgs_left == 0 {
            "none".to_string()
        } else {
            progress_text(&r)
        };
        let used = cap.thin_used_bytes + cap.thick_reserved_bytes;
        let _ = write!(
            o,
            "<tr data-pool=\"{}\" data-state=\"{}\"><th scope=\"row\">{} <span class=\"muted\">({})</span></th><td>{}</td><td>{} normal, {} rebuilding, {} rebalancing, {} degraded, {} unavailable</td><td>{}</td><td>{} of {} ({}%)</td><td class=\"rebuild\">{}</td></tr>",
            esc(&p.name),
            esc(&h.state),
            esc(&p.name),
            esc(pd),
            badge(&h.state),
            h.normal_pgs,
            h.rebuilding_pgs,
            h.rebalancing_pgs,
            h.degraded_pgs,
            h.unavailable_pgs,
            bar(used / 2, cap.usable_bytes),
            human(cap.provisioned_bytes),
            human(cap.usable_bytes),
            cap.provisioned_percent,
            esc(&progress)
        );
    }
    o.push_str("</table></section>");
}

fn resilience(o: &mut String, c: &ClusterStatus) {
    let Some(r) = &c.resilience else {
        return;
    };
    o.push_str("<section id=\"resilience\"><h2>What one more loss would do</h2>");
    if r.cannot_survive.is_empty() {
        let _ = write!(
            o,
            "<p>Any single SDS, fault set or device can be lost now without losing access to data.</p>"
        );
    } else {
        let _ = write!(
            o,
            "<p><strong>The cluster cannot survive losing {} right now</strong>: PGs would have no copy left.</p>",
            esc(&r.cannot_survive.join(", "))
        );
    }
    o.push_str("<table><tr><th scope=\"col\">Loss of</th><th scope=\"col\">PGs left with one copy</th><th scope=\"col\">PGs with none</th><th scope=\"col\">To rebuild</th></tr>");
    for l in r.losses.iter().take(8) {
        let time = l
            .rebuild_seconds
            .map_or("time unknown".to_string(), |s| format!("about {s} s"));
        let _ = write!(
            o,
            "<tr><td>{} {}</td><td>{}</td><td>{}</td><td>{} ({})</td></tr>",
            esc(&l.kind),
            esc(&l.name),
            l.pgs_single_copy,
            l.pgs_unavailable,
            human(l.rebuild_bytes),
            esc(&time)
        );
    }
    o.push_str("</table></section>");
}

fn sds(o: &mut String, s: &ClusterState, c: &ClusterStatus) {
    o.push_str("<section id=\"sds\"><h2>SDS</h2><table><tr><th scope=\"col\">SDS</th><th scope=\"col\">State</th><th scope=\"col\">Address</th><th scope=\"col\">Devices</th><th scope=\"col\">Stored of chunk space</th></tr>");
    for x in s.sds.values() {
        let state = if x.removing {
            "Removing".to_string()
        } else {
            format!("{:?}", x.state)
        };
        let failed = x
            .devices
            .iter()
            .filter(|d| d.state == DeviceState::Failed)
            .count();
        let devices = if failed > 0 {
            format!("{} ({failed} failed)", x.devices.len())
        } else {
            x.devices.len().to_string()
        };
        let space = proto::capacity::sds_capacity_bytes(x);
        let stored = c
            .sds_stats
            .get(&x.name)
            .map_or(0, |st| st.chunks_stored << 20);
        let _ = write!(
            o,
            "<tr data-sds=\"{}\" data-state=\"{}\"><th scope=\"row\">{}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&x.name),
            esc(&state),
            esc(&x.name),
            badge(&state),
            esc(&x.addr),
            esc(&devices),
            bar(stored, space)
        );
    }
    o.push_str("</table></section>");
}

fn sdcs(o: &mut String, s: &ClusterState, c: &ClusterStatus) {
    o.push_str("<section id=\"sdcs\"><h2>SDCs and volumes</h2><table><tr><th scope=\"col\">SDC</th><th scope=\"col\">Session</th><th scope=\"col\">IP</th><th scope=\"col\">Mapped volumes</th></tr>");
    for x in s.sdcs.values() {
        let connected = c
            .sdc_last_seen_ms
            .get(&x.id)
            .is_some_and(|ms| *ms <= SDC_SESSION_MS);
        let vols: Vec<String> = s
            .mappings
            .iter()
            .filter(|m| m.sdc == x.id)
            .filter_map(|m| s.volumes.get(&m.volume))
            .map(|v| format!("{} ({})", v.name, human(v.size_bytes)))
            .collect();
        let _ = write!(
            o,
            "<tr><th scope=\"row\">{}</th><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&x.name),
            badge(if connected {
                "Connected"
            } else {
                "Disconnected"
            }),
            esc(&x.ip),
            esc(&if vols.is_empty() {
                "(none)".to_string()
            } else {
                vols.join(", ")
            })
        );
    }
    let _ = write!(
        o,
        "</table><p class=\"muted\">{} volumes ({} snapshots), {} mapped.</p></section>",
        s.volumes.len(),
        s.volumes.values().filter(|v| v.snapshot.is_some()).count(),
        s.volumes
            .keys()
            .filter(|v| s.mappings.iter().any(|m| m.volume == **v))
            .count()
    );
}

fn plots(o: &mut String, r: &super::Rest, s: &ClusterState, now: u64) {
    let Ok(h) = r.svc.history.lock() else {
        return;
    };
    o.push_str("<section id=\"io\"><h2>I/O over the last hour</h2><p class=\"muted\">Sampled by this leader every few seconds since it took office.</p><table class=\"plots\"><caption class=\"muted\">Pools and volumes: what hosts asked for. SDS: their devices' I/O, copies and rebuild included.</caption>");
    o.push_str(PLOT_HEAD);
    for p in s.pools.values() {
        o.push_str(&plot_row(
            &format!("pool {}", p.name),
            &h.series(Subject::Pool(p.id)),
            now,
        ));
    }
    for x in s.sds.values() {
        o.push_str(&plot_row(
            &format!("SDS {}", x.name),
            &h.series(Subject::Sds(x.id)),
            now,
        ));
    }
    let mut vols: Vec<(f32, &proto::model::Volume)> = s
        .volumes
        .values()
        .map(|v| {
            let last = h.latest(Subject::Volume(v.id)).map_or(0.0, |p| p.iops());
            (last, v)
        })
        .collect();
    vols.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.name.cmp(&b.1.name)));
    for (_, v) in vols.iter().take(PLOTTED_VOLUMES) {
        o.push_str(&plot_row(
            &format!("volume {}", v.name),
            &h.series(Subject::Volume(v.id)),
            now,
        ));
    }
    o.push_str("</table>");
    if vols.len() > PLOTTED_VOLUMES {
        let _ = write!(
            o,
            "<p class=\"muted\">{} quieter volumes are not plotted (GET /api/v1/history?volume=NAME has them).</p>",
            vols.len() - PLOTTED_VOLUMES
        );
    }
    o.push_str("</section>");
}

fn events_table(o: &mut String, events: &[proto::model::Event]) {
    o.push_str("<section id=\"events\"><h2>Latest events</h2><table><tr><th scope=\"col\">Time (UTC)</th><th scope=\"col\">Severity</th><th scope=\"col\">By</th><th scope=\"col\">What</th></tr>");
    for e in events {
        let sev = format!("{:?}", e.severity);
        let shown = match e.severity {
            Severity::Info => "Info",
            _ => sev.as_str(),
        };
        let _ = write!(
            o,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&proto::clock::rfc3339(e.unix)),
            badge(shown),
            esc(&e.actor),
            esc(&e.message)
        );
    }
    o.push_str("</table></section>");
}

const LOGIN_PAGE: &str = "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Meshblock: log in</title><style>body{font:15px system-ui,sans-serif;background:#f6f7f9;display:flex;justify-content:center;padding-top:80px}form{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:20px 28px}label{display:block;margin:10px 0 4px}input{font-size:15px;padding:4px;width:240px}button{margin-top:14px;font-size:15px}.err{color:#cf222e}</style></head><body><form method=\"post\" action=\"/login\"><h1>Meshblock</h1>MESSAGE<label for=\"u\">User</label><input id=\"u\" name=\"username\" autocomplete=\"username\" required><label for=\"p\">Password</label><input id=\"p\" name=\"password\" type=\"password\" autocomplete=\"current-password\" required><br><button type=\"submit\">Log in</button></form></body></html>";

#[derive(Deserialize)]
struct LoginQuery {
    expired: Option<String>,
    /// A one-time link's ticket (`POST /api/v1/dashboard-link`).
    ticket: Option<String>,
}

async fn login_form(
    State(r): State<Shared>,
    q: Result<axum::extract::Query<LoginQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = q.map(|q| q.0).unwrap_or(LoginQuery {
        expired: None,
        ticket: None,
    });
    if let Some(ticket) = &q.ticket {
        return match r.redeem_ticket(ticket) {
            Some(token) => (
                StatusCode::SEE_OTHER,
                [
                    (header::SET_COOKIE, session_cookie(&token, 8 * 3600)),
                    (header::LOCATION, "/".to_string()),
                ],
            )
                .into_response(),
            None => (
                StatusCode::UNAUTHORIZED,
                Html(LOGIN_PAGE.replace(
                    "MESSAGE",
                    "<p class=\"err\" role=\"alert\">That link was used or has expired; log in.</p>",
                )),
            )
                .into_response(),
        };
    }
    let msg = if q.expired.is_some() {
        "<p class=\"err\" role=\"alert\">Your session ended; log in again.</p>"
    } else {
        ""
    };
    Html(LOGIN_PAGE.replace("MESSAGE", msg)).into_response()
}

#[derive(Deserialize)]
struct LoginFields {
    username: String,
    password: String,
}

async fn login(
    State(r): State<Shared>,
    from: Client,
    form: Result<Form<LoginFields>, axum::extract::rejection::FormRejection>,
) -> Response {
    let failed = |msg: &str| {
        (
            StatusCode::UNAUTHORIZED,
            Html(LOGIN_PAGE.replace(
                "MESSAGE",
                &format!("<p class=\"err\" role=\"alert\">{}</p>", esc(msg)),
            )),
        )
            .into_response()
    };
    let Ok(Form(f)) = form else {
        return failed("Give a user name and a password.");
    };
    match r
        .svc
        .login_from(from.0 .0.ip(), &f.username, &f.password, None)
    {
        Ok(MdmResponse::Session {
            token,
            expires_unix,
            ..
        }) => {
            let max_age = expires_unix.saturating_sub(proto::clock::now_unix());
            (
                StatusCode::SEE_OTHER,
                [
                    (header::SET_COOKIE, session_cookie(&token, max_age)),
                    (header::LOCATION, "/".to_string()),
                ],
            )
                .into_response()
        }
        Ok(_) => failed("Unexpected answer from the MDM."),
        Err(e) => failed(&e.message),
    }
}

async fn logout() -> Response {
    (
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, session_cookie("", 0)),
            (header::LOCATION, "/login".to_string()),
        ],
    )
        .into_response()
}
