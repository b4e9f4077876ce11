//! What every Meshblock daemon does the same way at its edges: the panic hook (log version and
//! backtrace, then abort so the supervisor restarts us into a known state), tracing setup, the
//! allocator's tuning, and waiting for SIGTERM or Ctrl-C.

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
