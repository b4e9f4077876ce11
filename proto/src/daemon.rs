//! What every Meshblock daemon does the same way at its edges: the panic hook (log version and
//! backtrace, then abort so the supervisor restarts us into a known state), tracing setup, the
//! allocator's tuning, the CPU wake-latency request, the async runtime, waiting for SIGTERM or
//! Ctrl-C, and telling systemd when the daemon serves and when it stops ([`notify`]).

/// The kernel's PM QoS interface for CPU wake latency (root only).
pub const CPU_DMA_LATENCY: &str = "/dev/cpu_dma_latency";

/// A config value of `cpu_wake_latency_us` that leaves the machine's idle policy alone.
pub const CPU_WAKE_LATENCY_UNCHANGED: i64 = -1;

/// Largest `cpu_wake_latency_us` accepted (one second).
pub const CPU_WAKE_LATENCY_MAX_US: i64 = 1_000_000;

/// Ask the kernel (PM QoS) to let idle CPUs use only idle states they wake from within `us`
/// microseconds, for as long as the returned file stays open: the kernel drops the request
/// when it is closed, also when the process dies. 0 keeps idle CPUs polling.
///
/// A request crossing the data path waits for about nine thread wakes (SDC, both SDS, their
/// device threads, the client); waking a halted CPU, on a VM in particular, costs tens of
/// microseconds each, most of a 4 KiB write's latency at queue depth 1.
pub fn hold_cpu_wake_latency(us: u32) -> std::io::Result<std::fs::File> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(CPU_DMA_LATENCY)?;
    let v = i32::try_from(us).unwrap_or(i32::MAX);
    f.write_all(&v.to_ne_bytes())?;
    Ok(f)
}

/// Apply a daemon's `cpu_wake_latency_us` setting: hold the request (keep the returned file
/// for the daemon's lifetime) or, for [`CPU_WAKE_LATENCY_UNCHANGED`], do nothing. A refusal
/// (not root, no such device) is logged and the daemon runs on.
pub fn apply_cpu_wake_latency(setting: i64) -> Option<std::fs::File> {
    let us = u32::try_from(setting).ok()?;
    match hold_cpu_wake_latency(us) {
        Ok(f) => {
            tracing::info!(
                us,
                "holding CPU wake latency at {us} us (PM QoS); set cpu_wake_latency_us = -1 to leave the idle policy alone"
            );
            Some(f)
        }
        Err(e) => {
            tracing::warn!(
                "cannot hold CPU wake latency at {us} us through {CPU_DMA_LATENCY} ({e}): idle CPUs wake slower; run as root or set cpu_wake_latency_us = -1 to silence this"
            );
            None
        }
    }
}

/// Check a `cpu_wake_latency_us` value; the problem in words.
pub fn check_cpu_wake_latency(setting: i64) -> Result<(), String> {
    if (CPU_WAKE_LATENCY_UNCHANGED..=CPU_WAKE_LATENCY_MAX_US).contains(&setting) {
        Ok(())
    } else {
        Err(format!(
            "cpu_wake_latency_us: {setting} is not -1 (leave the idle policy alone) or 0..={CPU_WAKE_LATENCY_MAX_US} microseconds"
        ))
    }
}

/// CPUs per runtime thread when a daemon's `worker_threads` is 0 (automatic).
pub const CPUS_PER_WORKER: usize = 4;

/// The runtime threads a `worker_threads` setting asks for: the setting itself, or for 0 one
/// thread per [`CPUS_PER_WORKER`] CPUs, at least one.
pub fn worker_threads(setting: usize) -> usize {
    if setting > 0 {
        return setting;
    }
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    (cpus / CPUS_PER_WORKER).max(1)
}

/// Largest `worker_threads` accepted.
pub const MAX_WORKER_THREADS: usize = 1024;

/// Check a `worker_threads` value; the problem in words.
pub fn check_worker_threads(setting: usize) -> Result<(), String> {
    if setting <= MAX_WORKER_THREADS {
        Ok(())
    } else {
        Err(format!(
            "worker_threads: {setting} is more than {MAX_WORKER_THREADS}; use 0 (one per 4 CPUs) or the number of threads wanted"
        ))
    }
}

/// The daemon's async runtime for a `worker_threads` setting (see [`worker_threads`]).
///
/// One thread gets a current-thread runtime: every task runs on the thread that reads the
/// sockets, so handing a request from task to task (connection reader, request, writer) is a
/// queue push, not a futex wake of another thread and a context switch. On the 2-CPU lab host,
/// where five data-path processes share two CPUs, that made 4 KiB writes 25% faster than two
/// threads per daemon (queue depth 1 and 32 alike) at equal 1 MiB throughput. Hosts with many
/// CPUs per daemon get a multi-thread runtime instead, so one daemon can use several of them.
pub fn runtime(setting: usize, thread_name: &str) -> std::io::Result<tokio::runtime::Runtime> {
    let n = worker_threads(setting);
    let mut b = if n == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(n);
        b
    };
    let rt = b.enable_all().thread_name(thread_name).build()?;
    if n == 1 {
        tracing::info!("runtime: one thread (current-thread; worker_threads = {setting})");
    } else {
        tracing::info!("runtime: {n} worker threads (worker_threads = {setting})");
    }
    Ok(rt)
}

/// Keep large allocations on the heap and freed memory in the process.
///
/// The data path allocates and frees megabyte buffers (frames of whole chunks) all the time.
/// glibc's defaults serve such sizes with `mmap` and give freed heap tops back to the kernel,
/// so each one costs page faults and zeroing of fresh pages (about 5% of an SDS's CPU at 1 MiB
/// writes). Raising both thresholds trades that for memory the process keeps for reuse.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    {
        /// Allocations up to this size come from the heap.
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        /// Free memory kept at a heap's top before it is given back.
        const TRIM_THRESHOLD: libc::c_int = 128 << 20;
        // SAFETY: mallopt only changes allocator parameters; called before any thread starts.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    }
}

/// Log to stderr at the level `RUST_LOG` asks for (`info` without it). Colours only on a
/// terminal: a log a supervisor or journald keeps is plain text, greppable for `key=value`.
pub fn init_logging() {
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// An error and its causes on one line, `outer: cause: cause`, leaving out a cause whose text
/// the message before it already ends with (many errors name their cause in their own message,
/// so `{:#}` would print it twice).
pub fn error_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut next = Some(err);
    while let Some(cause) = next {
        next = cause.source();
        let text = cause.to_string();
        if out.is_empty() {
            out = text;
        } else if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

/// The exit of a command-line `main`: success, or the error on one line ([`error_line`]) and
/// failure.
pub fn exit_with<E: AsRef<dyn std::error::Error + 'static>>(
    result: Result<(), E>,
) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {}", error_line(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Install the panic hook: a panic is a bug; report it and abort.
pub fn install_panic_hook(daemon: &'static str) {
    std::panic::set_hook(Box::new(move |info| {
        let bt = std::backtrace::Backtrace::force_capture();
        eprintln!(
            "{daemon} {} panicked: {info}\n{bt}\nThis is a bug; please report it.",
            env!("CARGO_PKG_VERSION")
        );
        std::process::abort();
    }));
}

/// Resolve when the process is asked to stop (SIGTERM or Ctrl-C).
pub async fn shutdown_signal() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The environment variable systemd sets for a `Type=notify` service: where to send its state.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// `READY=1`: the daemon serves (sent once, when it does).
pub const NOTIFY_READY: &str = "READY=1";

/// `STOPPING=1`: the daemon is shutting down gracefully.
pub const NOTIFY_STOPPING: &str = "STOPPING=1";

/// Tell the service manager our state (`READY=1`, `STOPPING=1`, `STATUS=...`; several lines
/// may go in one message) through the socket in `$NOTIFY_SOCKET`, systemd's sd_notify
/// protocol. Without the variable (not started by systemd as `Type=notify`) this does nothing.
/// A failure to send is logged, not returned: the daemon serves either way, and systemd then
/// reports the start as timed out.
pub fn notify(state: &str) {
    let Some(socket) = std::env::var_os(NOTIFY_SOCKET) else {
        return;
    };
    if let Err(e) = notify_to(&socket, state) {
        tracing::warn!(
            "cannot tell systemd '{}' through {}: {e}",
            state.replace('\n', " "),
            socket.to_string_lossy()
        );
    }
}

/// Send `state` as one datagram to the unix socket `socket`: a path, or an abstract socket
/// name when it starts with `@`.
pub fn notify_to(socket: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let bytes = socket.as_bytes();
    let addr = match bytes.split_first() {
        Some((b'@', name)) => SocketAddr::from_abstract_name(name)?,
        Some(_) => SocketAddr::from_pathname(std::path::Path::new(socket))?,
        None => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "empty socket address",
            ))
        }
    };
    let sock = UnixDatagram::unbound()?;
    let sent = sock.send_to_addr(state.as_bytes(), &addr)?;
    if sent != state.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            format!("sent {sent} of {} bytes", state.len()),
        ));
    }
    Ok(())
}

/// This host's boot id (`/proc/sys/kernel/random/boot_id`): it changes with every boot, so a
/// daemon that finds a new one knows its host restarted (and disks may have lost what they had
/// not flushed). Empty when unreadable.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[derive(Debug, thiserror::Error)]
    #[error("open /dev/x: {source}")]
    struct Names {
        source: std::io::Error,
    }

    #[test]
    fn error_line_names_each_cause_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let named = anyhow::Error::new(Names { source: io() }).context("open device /dev/x");
        assert_eq!(
            error_line(named.as_ref()),
            "open device /dev/x: open /dev/x: no such file"
        );
        let plain = anyhow::Error::new(io()).context("read the config");
        assert_eq!(error_line(plain.as_ref()), "read the config: no such file");
    }

    /// The machine-wide limit the kernel applies now.
    fn current_limit() -> std::io::Result<i32> {
        let mut b = [0u8; 4];
        std::fs::File::open(CPU_DMA_LATENCY)?.read_exact(&mut b)?;
        Ok(i32::from_ne_bytes(b))
    }

    #[test]
    fn wake_latency_is_held_while_the_file_is_open() {
        if current_limit().is_err() {
            eprintln!("skipped: {CPU_DMA_LATENCY} is not readable here");
            return;
        }
        let held = hold_cpu_wake_latency(3).expect("hold the request");
        let now = current_limit().expect("read the limit");
        assert!(now <= 3, "the kernel applies {now} us while 3 us is held");
        drop(held);
        assert!(apply_cpu_wake_latency(CPU_WAKE_LATENCY_UNCHANGED).is_none());
    }

    #[test]
    fn worker_threads_follow_the_setting_or_the_cpus() {
        assert_eq!(worker_threads(3), 3);
        assert_eq!(worker_threads(1), 1);
        // Automatic: at least one thread, never more than one per CPU.
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let auto = worker_threads(0);
        assert!(auto >= 1 && auto <= cpus, "{auto} threads for {cpus} CPUs");
        assert!(check_worker_threads(0).is_ok());
        assert!(check_worker_threads(MAX_WORKER_THREADS + 1).is_err());
        // Both kinds of runtime run tasks and timers.
        for n in [1, 2] {
            let rt = runtime(n, "test-worker").expect("build the runtime");
            let v = rt.block_on(async {
                let t = tokio::spawn(async {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    7
                });
                t.await.expect("the task finishes")
            });
            assert_eq!(v, 7);
        }
    }

    #[test]
    fn notify_sends_one_datagram_to_a_path_or_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        let name = format!("mb-notify-{}-{}", std::process::id(), rand::random::<u32>());
        let path = std::env::temp_dir().join(&name);
        let server = UnixDatagram::bind(&path).expect("bind");
        notify_to(path.as_os_str(), "READY=1\nSTATUS=serving").expect("send");
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).expect("receive");
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
        drop(server);
        std::fs::remove_file(&path).expect("remove the socket");
        assert!(
            notify_to(path.as_os_str(), NOTIFY_STOPPING).is_err(),
            "nobody listens"
        );

        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract");
        let server = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        notify_to(std::ffi::OsStr::new(&format!("@{name}")), NOTIFY_STOPPING).expect("send");
        let n = server.recv(&mut buf).expect("receive");
        assert_eq!(&buf[..n], NOTIFY_STOPPING.as_bytes());
        assert!(notify_to(std::ffi::OsStr::new(""), NOTIFY_READY).is_err());
    }

    #[test]
    fn wake_latency_settings_are_checked() {
        assert!(check_cpu_wake_latency(-1).is_ok());
        assert!(check_cpu_wake_latency(0).is_ok());
        assert!(check_cpu_wake_latency(CPU_WAKE_LATENCY_MAX_US).is_ok());
        assert!(check_cpu_wake_latency(-2).is_err());
        assert!(check_cpu_wake_latency(CPU_WAKE_LATENCY_MAX_US + 1).is_err());
    }
}
