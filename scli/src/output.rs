//! Query output: ScaleIO-style text, or JSON (`--json`) for scripts. JSON output is
//! deterministic (maps are ordered) so scripts can diff it.

use crate::args::Args;
use anyhow::anyhow;
use proto::capacity::{human, pool_capacity, CapacityState, PoolCapacity};
use proto::model::{ClusterState, StoragePool, Volume};
use proto::msg::{ClusterStatus, MdmStatus, Query};
use proto::views;
use serde_json::{json, Value};
use std::fmt::Write;

fn gb(bytes: u64) -> String {
    let g = bytes as f64 / (1u64 << 30) as f64;
    if g.fract() == 0.0 {
        format!("{g:.0} GB")
    } else {
        format!("{g:.2} GB")
    }
}

fn mdm_line(m: &MdmStatus) -> String {
    let status = if m.active { "Normal" } else { "Disconnected" };
    format!(
        "    Name: {}, ID: 0x{:016x}, Address: {}, Status: {status}\n",
        m.name, m.id.0, m.addr
    )
}

fn cluster_text(c: &ClusterStatus) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "Cluster:\n    Mode: {}, State: {}, Active: {}/{}, Term: {}",
        c.mode, c.state, c.active, c.total, c.term
    );
    o.push_str("Master MDM:\n");
    match &c.leader {
        Some(l) => o.push_str(&mdm_line(&MdmStatus {
            active: true,
            ..l.clone()
        })),
        None => o.push_str("    (none)\n"),
    }
    if !c.followers.is_empty() {
        o.push_str("Slave MDMs:\n");
        c.followers.iter().for_each(|m| o.push_str(&mdm_line(m)));
    }
    if !c.standbys.is_empty() {
        o.push_str("Standby MDMs:\n");
        c.standbys.iter().for_each(|m| o.push_str(&mdm_line(m)));
    }
    o.trim_end().to_string()
}

/// ", rebuilding: N PGs copying, at most X left at Y/s, ETA Zs" while a rebuild runs.
fn rebuild_line(r: &Value) -> String {
    let active = r["pgs_copying"].as_u64().unwrap_or(0);
    let pgs_left = r["pgs_left"].as_u64().unwrap_or(0);
    if active == 0 && pgs_left == 0 {
        return String::new();
    }
    let mib = |b: u64| format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64);
    let eta = match r["eta_seconds"].as_u64() {
        Some(s) => format!("ETA {s} s"),
        None => "ETA unknown".into(),
    };
    format!(
        "\n    Rebuild/rebalance: {pgs_left} PGs left, {active} copying now, at most {} left to copy at {}/s, {eta}",
        mib(r["bytes_left_at_most"].as_u64().unwrap_or(0)),
        mib(r["bytes_per_sec"].as_u64().unwrap_or(0))
    )
}

/// The pool's capacity lines: its state before it runs out, what uses it, and thick volumes'
/// chunks that found no space.
fn capacity_text(c: &PoolCapacity) -> String {
    let mut o = format!(
        "\n    Capacity: {}, {}% used (raw {}: thin data {}, reserved by thick volumes {}, free {}); fullest SDS {}% full",
        c.state,
        c.used_percent,
        human(c.raw_bytes),
        human(c.thin_used_bytes),
        human(c.thick_reserved_bytes),
        human(c.free_bytes),
        c.fullest_sds_percent
    );
    let _ = write!(
        o,
        "\n    Provisioned: {} in volumes and snapshots against {} usable ({}%{})",
        human(c.provisioned_bytes),
        human(c.usable_bytes),
        c.provisioned_percent,
        if c.provisioned_percent > 100 {
            ": thin provisioning promised more than the pool holds"
        } else {
            ""
        }
    );
    if c.state >= CapacityState::Warning {
        o.push_str("\n    WARNING: the pool is running out of space; thin volumes' writes get ENOSPC when it is full. Add capacity or remove volumes");
    }
    if c.thick_chunks_no_space > 0 {
        let _ = write!(o, "\n    WARNING: {} chunks of thick volumes found no free space on their SDS: writes to them can fail with ENOSPC", c.thick_chunks_no_space);
    }
    if c.sds_unreported > 0 {
        let _ = write!(
            o,
            "\n    ({} SDS have not reported their usage to this MDM yet)",
            c.sds_unreported
        );
    }
    o
}

fn pool_text(s: &ClusterState, c: &ClusterStatus, p: &StoragePool) -> String {
    let j = views::pool(s, c, p);
    let capacity = capacity_text(&pool_capacity(s, &c.sds_stats, p.id));
    format!(
        "Storage Pool {} (Id: {}) has {} volumes\n    State: {} (PGs: {} normal, {} rebalancing, {} rebuilding, {} degraded, {} unavailable){}\n    Rebuild/rebalance policy per SDS: {} concurrent copies, {}, adaptive {}\n    Protection Domain: {}, Media type: {}\n    PGs: {} ({} fully placed), map epoch {}\n    Raw capacity: {}, usable (2 copies): {}, reserved by thick volumes: {}{capacity}",
        p.name, p.id, j["volumes"].as_array().map_or(0, |v| v.len()), j["state"].as_str().unwrap_or("?"),
        j["normal_pgs"], j["rebalancing_pgs"], j["rebuilding_pgs"], j["degraded_pgs"], j["unavailable_pgs"], rebuild_line(&j["rebuild"]),
        p.rebuild_policy.concurrency,
        if p.rebuild_policy.bandwidth_mib_s == 0 { "unlimited bandwidth".to_string() } else { format!("{} MiB/s", p.rebuild_policy.bandwidth_mib_s) },
        if p.rebuild_policy.adaptive { "on" } else { "off" },
        j["protection_domain"].as_str().unwrap_or("?"), p.media_type,
        p.pg_count, j["pgs_fully_placed"], p.epoch.0, gb(j["raw_capacity_bytes"].as_u64().unwrap_or(0)),
        gb(j["usable_capacity_bytes"].as_u64().unwrap_or(0)), gb(j["thick_reserved_bytes"].as_u64().unwrap_or(0)))
}

fn volume_text(s: &ClusterState, c: &ClusterStatus, v: &Volume) -> String {
    let mut o = format!(
        "Volume ID: {} Name: {}\n    Size: {}, {} provisioned, Storage Pool: {}\n",
        v.id,
        v.name,
        gb(v.size_bytes),
        if v.thin { "Thin" } else { "Thick" },
        s.pools.get(&v.pool).map(|p| p.name.as_str()).unwrap_or("?")
    );
    if let Some(d) = proto::docker::stored_name(&v.labels) {
        let _ = writeln!(o, "    Docker volume: {d}");
    }
    let cap = views::volume_capacity(s, c, v);
    if let Some(a) = cap["allocated_bytes"].as_u64() {
        let _ = writeln!(
            o,
            "    Allocated: {} of {} ({}%), {} free",
            human(a),
            human(v.size_bytes),
            cap["allocated_percent"],
            human(cap["free_bytes"].as_u64().unwrap_or(0))
        );
    } else if let Some(a) = cap["vtree_allocated_bytes"].as_u64() {
        let _ = writeln!(
            o,
            "    Allocated: {} in its V-tree with its snapshots (--query_vtree splits it)",
            human(a)
        );
    }
    if v.created_unix > 0 {
        let _ = writeln!(o, "    Created: {}", proto::clock::rfc3339(v.created_unix));
    }
    if v.preempt {
        o.push_str("    Preemptible: another host may take it over while its host is alive\n");
    }
    if let Some(x) = &v.snapshot {
        let of = s
            .volumes
            .get(&x.volume)
            .map_or("(removed)", |o| o.name.as_str());
        let _ = writeln!(
            o,
            "    Snapshot of {of} taken {}, consistency group {}{} (see --query_vtree)",
            proto::clock::rfc3339(x.unix),
            x.group,
            x.policy
                .as_ref()
                .map(|(p, r)| format!(", snapshot policy {p} run {r}"))
                .unwrap_or_default()
        );
    }
    let l: Vec<String> = v
        .labels
        .iter()
        .filter(|(k, _)| !proto::docker::is_name_label(k))
        .map(|(k, x)| format!("{k}={x}"))
        .collect();
    if !l.is_empty() {
        let _ = writeln!(o, "    Labels: {}", l.join(", "));
    }
    let maps: Vec<_> = s.mappings_of(v.id).collect();
    if maps.is_empty() {
        o.push_str("    Not mapped to any SDC");
    }
    for m in maps {
        let sdc = s.sdcs.get(&m.sdc);
        let lim = |x: u64| {
            if x == 0 {
                "unlimited".to_string()
            } else {
                x.to_string()
            }
        };
        let throttled = match views::throttled_ms(c, m.sdc, v.id) {
            Some(ms) => format!("{:.1} s", ms as f64 / 1000.0),
            None => "not reported".into(),
        };
        let _ = writeln!(
            o,
            "    Mapped to SDC {} (IP {}, mapping generation {}), IOPS limit: {}, bandwidth limit: {} KB/s, throttled: {throttled}",
            sdc.map(|c| c.name.as_str()).unwrap_or("?"),
            sdc.map(|c| c.ip.as_str()).unwrap_or("?"),
            m.generation,
            lim(m.iops_limit),
            lim(m.bandwidth_limit_kbps)
        );
    }
    o.trim_end().to_string()
}

fn sds_text(s: &ClusterState, c: &ClusterStatus, x: &proto::model::Sds) -> String {
    let j = views::sds(s, c, x);
    let cert = match &x.cert_name {
        Some(n) => format!(" (certificate sds:{n})"),
        None => String::new(),
    };
    let mut o = format!("SDS ID: {} Name: {}{cert} IP: {} State: {:?}{}\n    Protection Domain: {}, Fault Set: {}, PG copies: {}\n",
        x.id, x.name, x.addr, x.state, if x.removing { " (removing: its copies are being moved off)" } else { "" }, j["protection_domain"].as_str().unwrap_or("?"), j["fault_set_name"].as_str().unwrap_or("(none)"), j["pg_copies"]);
    if let Some(st) = c.sds_stats.get(&x.name) {
        let pct = if st.scrub_chunks_total == 0 {
            100.0
        } else {
            100.0 * st.scrub_chunks_done as f64 / st.scrub_chunks_total as f64
        };
        let _ = writeln!(
            o,
            "    Checksum errors: {} found, {} repaired, {} unrecoverable; Scrubber: {} passes, current pass {}/{} chunks ({pct:.0}%) at {} MiB/s",
            st.checksum_errors, st.repaired_blocks, st.unrecoverable_blocks, st.scrub_passes,
            st.scrub_chunks_done, st.scrub_chunks_total, st.scrub_rate_bytes >> 20
        );
        let space = proto::capacity::sds_capacity_bytes(x);
        let stored = st.chunks_stored << 20;
        let _ = writeln!(
            o,
            "    Stored: {} chunks ({}), of which {} of thick volumes; chunk space {}, free {} ({}% used)",
            st.chunks_stored,
            human(stored),
            st.thick_chunks_stored,
            human(space),
            human(space.saturating_sub(stored)),
            proto::capacity::percent(stored, space)
        );
        if st.thick_chunks_no_space > 0 {
            let _ = writeln!(
                o,
                "    WARNING: {} chunks of thick volumes found no free space here (devices full): writes to them can fail with ENOSPC",
                st.thick_chunks_no_space
            );
        }
        if st.chunks_draining > 0 {
            let _ = writeln!(
                o,
                "    Device removal: {} chunks ({} MiB) left to move to the SDS's other devices",
                st.chunks_draining, st.chunks_draining
            );
        }
    }
    for d in &x.devices {
        let _ = writeln!(
            o,
            "    Device {} Path: {} Pool: {} Capacity: {} State: {:?}",
            d.id,
            d.path,
            s.pools.get(&d.pool).map(|p| p.name.as_str()).unwrap_or("?"),
            gb(d.capacity_bytes),
            d.state
        );
    }
    o.trim_end().to_string()
}

pub fn render(q: &Query, a: &Args, c: &ClusterStatus, s: &ClusterState) -> anyhow::Result<String> {
    let missing = |what: &str| anyhow!("MDM failed command.  Status: Could not find the {what}");
    let (text, value): (String, Value) = match q {
        Query::All => {
            let mut t = cluster_text(c);
            for pd in s.pds.values() {
                let _ = write!(t, "\nProtection Domain {} (Id: {})", pd.name, pd.id);
                for p in s.pools.values().filter(|p| p.pd == pd.id) {
                    let _ = write!(t, "\n{}", pool_text(s, c, p));
                }
            }
            let _ = write!(
                t,
                "\n{} SDS, {} volumes, {} SDCs",
                s.sds.len(),
                s.volumes.len(),
                s.sdcs.len()
            );
            (t, json!({"cluster": c, "state": s}))
        }
        Query::Cluster => (cluster_text(c), serde_json::to_value(c)?),
        Query::ProtectionDomain { name } => {
            let pd = s
                .pd_by_name(name)
                .ok_or_else(|| missing("protection domain"))?;
            let v = views::protection_domain(s, c, pd);
            let names = |key: &str| {
                v[key]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().or_else(|| x["name"].as_str()))
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default()
            };
            let t = format!(
                "Protection Domain {} (Id: {})\n    Storage pools: {}\n    Fault sets: {}\n    SDS: {}",
                pd.name,
                pd.id,
                names("storage_pools"),
                names("fault_sets"),
                names("sds")
            );
            (t, v)
        }
        Query::StoragePool { name } => {
            let p = s
                .pool_by_name(name)
                .ok_or_else(|| missing("storage pool"))?;
            (pool_text(s, c, p), views::pool(s, c, p))
        }
        Query::AllSds => {
            let t: Vec<String> = s.sds.values().map(|x| sds_text(s, c, x)).collect();
            let t = if t.is_empty() {
                "No SDS defined".to_string()
            } else {
                t.join("\n")
            };
            (
                t,
                Value::Array(s.sds.values().map(|x| views::sds(s, c, x)).collect()),
            )
        }
        Query::Sds { name } => {
            let x = s.sds_by_name(name).ok_or_else(|| missing("SDS"))?;
            (sds_text(s, c, x), views::sds(s, c, x))
        }
        Query::Sdc { sdc } => {
            let cs = c;
            let list: Vec<&proto::model::Sdc> = s
                .sdcs
                .values()
                .filter(|c| match sdc {
                    None => true,
                    Some(proto::msg::SdcSelector::Name(n)) => &c.name == n,
                    Some(proto::msg::SdcSelector::Ip(i)) => &c.ip == i,
                    Some(proto::msg::SdcSelector::Guid(g)) => c.guid.eq_ignore_ascii_case(g),
                    Some(proto::msg::SdcSelector::Id(i)) => &c.id == i,
                })
                .collect();
            let t: Vec<String> = list
                .iter()
                .map(|c| {
                    let vols: Vec<String> = s
                        .mappings
                        .iter()
                        .filter(|m| m.sdc == c.id)
                        .filter_map(|m| s.volumes.get(&m.volume).map(|v| v.name.clone()))
                        .collect();
                    let session = match cs.sdc_last_seen_ms.get(&c.id) {
                        Some(ms) if *ms <= proto::msg::SDC_SESSION_MS => "Connected".to_string(),
                        Some(ms) => format!("Disconnected (last heard {:.1} s ago)", *ms as f64 / 1000.0),
                        None => "Disconnected (not heard by this MDM leader)".to_string(),
                    };
                    let cert = match &c.cert_name {
                        Some(n) => format!(" (certificate sdc:{n})"),
                        None => String::new(),
                    };
                    format!(
                        "SDC ID: {} Name: {}{cert} IP: {} GUID: {}\n    Session: {session}\n    Mapped volumes: {}",
                        c.id,
                        c.name,
                        c.ip,
                        c.guid,
                        if vols.is_empty() {
                            "(none)".into()
                        } else {
                            vols.join(", ")
                        }
                    )
                })
                .collect();
            let t = if t.is_empty() {
                "No SDC registered".to_string()
            } else {
                t.join("\n")
            };
            let json: Vec<Value> = list.iter().map(|x| views::sdc(cs, x)).collect();
            (t, Value::Array(json))
        }
        Query::Volume { name } => {
            // A cluster name, or else the Docker name of a volume the Docker driver made.
            let v =
                proto::docker::volume_by_either_name(s, name).ok_or_else(|| missing("volume"))?;
            (volume_text(s, c, v), views::volume(s, c, v))
        }
        Query::SnapshotPolicy { name } => crate::vtree::policies(s, name.as_deref()),
        Query::Events { .. } => crate::events::render(s),
        Query::Resilience => crate::resilience::render(c)?,
        Query::Vtree { name } => {
            let v =
                proto::docker::volume_by_either_name(s, name).ok_or_else(|| missing("volume"))?;
            crate::vtree::render(s, c, v)
        }
        Query::AllVolumes => {
            let t: Vec<String> = s.volumes.values().map(|v| volume_text(s, c, v)).collect();
            let t = if t.is_empty() {
                "No volumes defined".to_string()
            } else {
                t.join("\n")
            };
            (
                t,
                Value::Array(s.volumes.values().map(|v| views::volume(s, c, v)).collect()),
            )
        }
    };
    if a.json {
        Ok(serde_json::to_string_pretty(&value)?)
    } else {
        Ok(text)
    }
}
