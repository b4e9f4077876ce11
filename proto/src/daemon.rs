//! What every Meshblock daemon does the same way at its edges: the panic hook (log version and
//! backtrace, then abort so the supervisor restarts us into a known state), tracing setup, and
//! waiting for SIGTERM or Ctrl-C.

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
