//! The registry of this crate's fail points (`fail` crate). They compile to nothing unless the
//! `failpoints` feature is on; names follow `sds::module::before_action`.

/// Before a chunk's meta page is written (its data write runs in parallel).
pub const CHUNK_STORE_BEFORE_META_WRITE: &str = "sds::chunk_store::before_meta_write";
/// A whole chunk written out of place is durable in its new slot; its `Relocate` record is not
/// written yet.
pub const CHUNK_STORE_BEFORE_RELOCATE_RECORD: &str = "sds::chunk_store::before_relocate_record";
/// Before the primary forwards a write to the secondary (its local write runs in parallel).
pub const SERVICE_BEFORE_FORWARD: &str = "sds::service::before_forward";
/// After the local write and the forward both succeeded, before the primary acknowledges.
pub const SERVICE_AFTER_FORWARD_BEFORE_ACK: &str = "sds::service::after_forward_before_ack";
/// A secondary got a forwarded write or trim and has not applied it yet (armed with
/// `return(MS)` it waits MS milliseconds there, as a forward held up in the network would).
pub const SERVICE_BEFORE_REPLICA_APPLY: &str = "sds::service::before_replica_apply";
/// A write or trim (client or forwarded) holds its blocks' range lock and has not re-checked
/// the lease yet (armed with `return(MS)` it waits MS milliseconds there, as a write queued
/// behind others would).
pub const SERVICE_AFTER_RANGE_LOCK: &str = "sds::service::after_range_lock";
/// In the middle of installing a newer cluster map (epoch floors raised, map not yet swapped).
pub const ROUTING_DURING_MAP_UPDATE: &str = "sds::routing::during_map_update";

/// Configure fail points from `name=action;name=action` (the `fail` crate's actions, e.g.
/// `1*panic`, `50%sleep(200)`); an error names what could not be parsed. Without the
/// `failpoints` feature this refuses anything but an empty list.
pub fn configure(spec: &str) -> Result<(), String> {
    for item in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, action) = item
            .split_once('=')
            .ok_or_else(|| format!("fail point '{item}': expected NAME=ACTION"))?;
        if !cfg!(feature = "failpoints") {
            return Err(format!(
                "fail point {name}: this sds was built without the `failpoints` feature"
            ));
        }
        fail::cfg(name.trim(), action.trim()).map_err(|e| format!("fail point {name}: {e}"))?;
    }
    Ok(())
}

/// Follow `path` for the life of the process: whenever its content changes, arm the fail points
/// it names (the same `NAME=ACTION;...` spec) and disarm those it no longer names. Lets a test
/// arm a fail point in a running SDS that already holds the role the point needs, instead of
/// restarting it armed. A missing file means no fail points. Refused without the `failpoints`
/// feature.
pub fn watch_file(path: std::path::PathBuf) -> Result<(), String> {
    if !cfg!(feature = "failpoints") {
        return Err(format!(
            "fail points file {}: this sds was built without the `failpoints` feature",
            path.display()
        ));
    }
    let spawned = std::thread::Builder::new()
        .name("failpoints-file".into())
        .spawn(move || {
            let mut last = String::new();
            loop {
                let now = std::fs::read_to_string(&path).unwrap_or_default();
                if now != last {
                    for gone in names(&last).filter(|n| !names(&now).any(|m| m == *n)) {
                        fail::remove(gone);
                    }
                    match configure(&now) {
                        Ok(()) => {
                            tracing::warn!("fail points armed from {}: {now}", path.display())
                        }
                        Err(e) => tracing::error!("fail points file {}: {e}", path.display()),
                    }
                    last = now;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        });
    spawned
        .map(|_| ())
        .map_err(|e| format!("start the fail points watcher: {e}"))
}

/// The fail point names of a spec.
fn names(spec: &str) -> impl Iterator<Item = &str> {
    spec.split(';')
        .filter_map(|item| item.split_once('='))
        .map(|(name, _)| name.trim())
}

/// Evaluate the fail point `name` (a no-op without the `failpoints` feature).
#[inline]
pub fn fail_point(name: &str) {
    let _ = name;
    fail::fail_point!(name);
}

/// Evaluate the delay fail point `name`: armed with `return(MS)`, wait MS milliseconds
/// without blocking the thread (a no-op without the `failpoints` feature).
pub async fn delay_point(name: &str) {
    #[cfg(feature = "failpoints")]
    if let Some(Some(ms)) = fail::eval(name, |arg| arg.and_then(|a| a.trim().parse::<u64>().ok())) {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        tracing::warn!("fail point {name} held a request {ms} ms; it goes on now");
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}
