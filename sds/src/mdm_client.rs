//! The SDS's link to the MDM: registration, device reports and map following.
//!
//! Two loops, both for the life of the process:
//! - **hello**: at start and every `hello_interval`, `SdsHello { name, devices, stats, boot }`
//!   (CONTROL frame, JSON). The SDS identifies itself by its certificate; the answer
//!   `SdsWelcome { id, map_version, lease_ms }` gives its id and renews its lease (see
//!   [`MapCache`]) for `lease_ms` from when the hello was sent: the MDM leader derives it from
//!   its own down timeout, so the two cannot disagree ([`effective_lease`]).
//!   Device reports carry `failed: true` once a device has failed; `stats` carries the checksum
//!   counters and scrub progress. The hello doubles as the SDS's heartbeat.
//! - **map**: every `map_poll_interval`, or at once when the data path asks
//!   ([`MapCache::request_refresh`]), `GetMap { known_version }`; a newer map is installed in
//!   the [`MapCache`].
//!
//! [`MdmClient`] (proto) follows `NotLeader` redirects (the error names the leader's `ip:port`,
//! or nothing) and tries every configured address.
//!
//! Logging: a failing MDM is logged at WARN once per outage, not once per attempt.

use crate::routing::MapCache;
use proto::client::MdmClient;
use proto::model::ClusterState;
use proto::msg::{DeviceReport, MdmRequest, MdmResponse, SdsStats};
use proto::{Epoch, PgId, PoolId, SdsId, WireError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The lease an answer from an MDM that sends none (older than `SdsWelcome::lease_ms`) grants:
/// what SDS used to assume, below such an MDM's default 1.5 s down timeout.
pub const LEGACY_LEASE: Duration = Duration::from_millis(1200);
/// No lease is longer, whatever an answer says (a sanity bound on a value from the network).
pub const LEASE_MAX: Duration = Duration::from_secs(600);

/// The lease an answer granting `granted_ms` gives an SDS whose own bound is `cap` (the
/// `lease_ms` config key; `Duration::MAX` when unset): the MDM's length, never longer than
/// the bound, [`LEGACY_LEASE`] from an MDM that sends none.
pub fn effective_lease(granted_ms: u64, cap: Duration) -> Duration {
    let granted = match granted_ms {
        0 => LEGACY_LEASE,
        ms => Duration::from_millis(ms),
    };
    granted.min(cap).min(LEASE_MAX)
}

/// Produces the device reports of the next hello.
pub type DeviceReports = Arc<dyn Fn() -> Vec<DeviceReport> + Send + Sync>;

/// Produces the integrity counters and scrub progress of the next hello.
pub type StatsReport = Arc<dyn Fn() -> SdsStats + Send + Sync>;

/// Called after every hello with whether it succeeded (for a metrics gauge).
pub type HelloObserver = Arc<dyn Fn(bool) + Send + Sync>;

/// Timing of the link.
#[derive(Clone, Debug)]
pub struct LinkOptions {
    pub hello_interval: Duration,
    pub map_poll_interval: Duration,
    /// How long one request may keep trying (leader changes included).
    pub request_timeout: Duration,
    /// Serve only under the lease each answered hello grants, at most this long (see
    /// [`MapCache`], [`effective_lease`]; `Duration::MAX`: as long as the MDM grants); `None`
    /// serves without one (tests that drive the map by hand).
    pub lease: Option<Duration>,
    /// The boot of this host ([`proto::daemon::boot_id`]), sent with every hello: a new one
    /// tells the MDM that the devices may have lost unflushed writes.
    pub boot: String,
}

impl Default for LinkOptions {
    fn default() -> Self {
        LinkOptions {
            hello_interval: Duration::from_secs(1),
            map_poll_interval: Duration::from_millis(500),
            request_timeout: Duration::from_secs(2),
            lease: None,
            boot: String::new(),
        }
    }
}

/// Why a request to the MDM failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("MDM: {0}")]
    Mdm(#[from] WireError),
    #[error("the MDM answered {0} with an unexpected response")]
    Unexpected(&'static str),
}

/// Runs before a newer map is installed (the device set follows the map: a device the map
/// adds must be open before any request routed by that map arrives).
pub type MapHook = Arc<
    dyn Fn(&ClusterState) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

pub struct MdmLink {
    client: MdmClient,
    before_install: Option<MapHook>,
    name: String,
    map: Arc<MapCache>,
    devices: DeviceReports,
    opts: LinkOptions,
    on_hello: Option<HelloObserver>,
    stats: Option<StatsReport>,
    /// Whether a lease shorter than the hello interval was reported already.
    warned_short_lease: AtomicBool,
}

impl MdmLink {
    /// A link for the SDS `name`; `devices` is asked for fresh reports at every hello.
    pub fn new(
        client: MdmClient,
        name: String,
        map: Arc<MapCache>,
        devices: DeviceReports,
        opts: LinkOptions,
    ) -> MdmLink {
        if opts.lease.is_some() {
            map.require_lease();
        }
        MdmLink {
            client,
            before_install: None,
            name,
            map,
            devices,
            opts,
            on_hello: None,
            stats: None,
            warned_short_lease: AtomicBool::new(false),
        }
    }

    /// Report `f()` in every hello.
    pub fn with_stats(mut self, f: StatsReport) -> MdmLink {
        self.stats = Some(f);
        self
    }

    /// Run `f(map)` to completion before installing each newer map.
    pub fn before_install(mut self, f: MapHook) -> MdmLink {
        self.before_install = Some(f);
        self
    }

    /// Call `f(succeeded)` after every hello.
    pub fn on_hello(mut self, f: HelloObserver) -> MdmLink {
        self.on_hello = Some(f);
        self
    }

    /// Send one hello; on welcome, record the id.
    pub async fn hello(&self) -> Result<SdsId, LinkError> {
        let req = MdmRequest::SdsHello {
            name: self.name.clone(),
            devices: (self.devices)(),
            stats: self.stats.as_ref().map(|f| f()).unwrap_or_default(),
            boot: self.opts.boot.clone(),
        };
        let sent = std::time::Instant::now();
        // A hello that takes longer than the lease grants nothing.
        let timeout = match self.opts.lease {
            Some(l) => self.opts.request_timeout.min(l),
            None => self.opts.request_timeout,
        };
        match self.client.request(&req, timeout).await? {
            MdmResponse::SdsWelcome {
                id,
                map_version,
                lease_ms,
            } => {
                if self.map.me() != Some(id) {
                    tracing::info!(sds_id = %id, name = %self.name, "welcomed by the MDM");
                    self.map.set_me(id);
                }
                if let Some(cap) = self.opts.lease {
                    let lease = effective_lease(lease_ms, cap);
                    if lease <= self.opts.hello_interval
                        && !self.warned_short_lease.swap(true, Ordering::Relaxed)
                    {
                        tracing::warn!(
                            lease_ms = lease.as_millis() as u64,
                            hello_interval_ms = self.opts.hello_interval.as_millis() as u64,
                            "the lease is not longer than the hello interval: it lapses between hellos (raise the MDM's sds_down_timeout_ms or lower hello_interval_ms)"
                        );
                    }
                    self.map.grant_lease(sent, lease, map_version);
                }
                if self.map.version() < map_version {
                    self.map.request_refresh();
                }
                Ok(id)
            }
            _ => Err(LinkError::Unexpected("SdsHello")),
        }
    }

    /// Ask once for a map newer than the cached one; returns whether one was installed.
    pub async fn poll_map(&self) -> Result<bool, LinkError> {
        let req = MdmRequest::GetMap {
            known_version: self.map.version(),
            sdc: None,
            throttled_ms: Vec::new(),
            io: Vec::new(),
        };
        match self.client.request(&req, self.opts.request_timeout).await? {
            MdmResponse::Map { state: Some(s) } => {
                let version = s.version;
                if let Some(f) = &self.before_install {
                    if version > self.map.version() {
                        f(&s).await;
                    }
                }
                let installed = self.map.install(*s);
                if installed {
                    tracing::debug!(version, "installed a newer cluster map");
                }
                Ok(installed)
            }
            MdmResponse::Map { state: None } => Ok(false),
            _ => Err(LinkError::Unexpected("GetMap")),
        }
    }

    /// Tell the MDM this SDS (the PG's primary) finished copying `pg` onto `target`. Retries
    /// until the MDM answers; `Ok(false)` when it refused (the assignment changed meanwhile).
    pub async fn report_rebuilt(
        &self,
        pool: PoolId,
        pg: PgId,
        target: SdsId,
        rebuild: Epoch,
    ) -> Result<bool, LinkError> {
        let req = MdmRequest::PgRebuilt {
            name: self.name.clone(),
            pool,
            pg,
            target,
            rebuild,
        };
        match self.client.request(&req, self.opts.request_timeout).await {
            Ok(MdmResponse::Done { .. }) => {
                self.map.request_refresh();
                Ok(true)
            }
            Ok(_) => Err(LinkError::Unexpected("PgRebuilt")),
            Err(e) if e.code == proto::ErrorCode::Conflict => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn hello_loop(&self) {
        let mut tick = tokio::time::interval(self.opts.hello_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Consecutive failed hellos (0: the last one was answered): the first failure is a
        // warning, and every `REMIND_EVERY`th again, so an SDS that never reaches the MDM says
        // why in its log.
        const REMIND_EVERY: u64 = 30;
        let mut failed = 0u64;
        loop {
            tick.tick().await;
            let r = self.hello().await;
            let ok = r.is_ok();
            match r {
                Ok(_) if failed > 0 => tracing::info!(failed, "the MDM answers again"),
                Err(e) if failed.is_multiple_of(REMIND_EVERY) => tracing::warn!(
                    failed = failed + 1,
                    "failed to report to the MDM: {e}; retrying"
                ),
                Err(e) => tracing::debug!("failed to report to the MDM: {e}"),
                Ok(_) => {}
            }
            failed = if ok { 0 } else { failed + 1 };
            if let Some(f) = &self.on_hello {
                f(ok);
            }
        }
    }

    async fn map_loop(&self) {
        let mut tick = tokio::time::interval(self.opts.map_poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.map.refresh_requested() => {}
            }
            if let Err(e) = self.poll_map().await {
                tracing::debug!("failed to fetch the cluster map: {e}");
            }
        }
    }

    /// Run both loops until the process ends.
    pub async fn run(self: Arc<Self>) {
        tokio::join!(self.hello_loop(), self.map_loop());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_comes_from_the_mdm_within_the_sds_bound() {
        let ms = Duration::from_millis;
        assert_eq!(effective_lease(1200, Duration::MAX), ms(1200));
        assert_eq!(effective_lease(8000, Duration::MAX), ms(8000));
        assert_eq!(effective_lease(8000, ms(1000)), ms(1000), "the bound caps");
        assert_eq!(effective_lease(500, ms(1000)), ms(500), "never longer");
        assert_eq!(
            effective_lease(0, Duration::MAX),
            LEGACY_LEASE,
            "an old MDM"
        );
        assert_eq!(effective_lease(0, ms(300)), ms(300));
        assert_eq!(effective_lease(u64::MAX, Duration::MAX), LEASE_MAX);
    }
}
