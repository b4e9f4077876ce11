//! The HTTP stack every Meshblock daemon serves with: a hardened accept loop around hyper's
//! HTTP/1.1 connection driver and an axum router.
//!
//! What it owns:
//! - [`serve`]: accept connections for as long as the process runs. At most
//!   [`Limits::max_connections`] are served at once (extra ones are answered `503` and closed);
//!   a client gets [`Limits::header_timeout`] to send each request head (a request split over
//!   several packets is fine; one that never finishes is dropped); a connection lives at most
//!   [`Limits::connection_lifetime`]. An accept error (out of file descriptors, for one) is
//!   logged and retried after a pause: it never ends the server.
//! - [`metrics_router`]: `GET /metrics` (the exact path; a query string is ignored) answers the
//!   Prometheus text a daemon renders; other paths are `404`, other methods `405`. The daemons
//!   render with `prometheus-client`, which writes OpenMetrics (a counter's family is named
//!   without its `_total`, and the text ends with `# EOF`); [`prometheus_text`] turns that into
//!   the classic text format 0.0.4 the content type announces, which `promtool check metrics`
//!   and every scraper read.
//! - [`serve_metrics`]: bind and serve that router, what every daemon's `metrics_listen` runs.
//! - [`serve_tls`]: the same over TLS (the MDM's HTTPS API and dashboard). Handlers may take
//!   `Extension<ConnectInfo<SocketAddr>>` to learn who connected.

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Renders the metrics text (may refresh gauges first).
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The Prometheus text format's content type.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How much of the machine one HTTP endpoint may take.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; one more is answered `503 Service Unavailable` and closed.
    pub max_connections: usize,
    /// Time a client gets to send a request's head, from the connection's start or from the
    /// previous answer.
    pub header_timeout: Duration,
    /// The longest a connection is kept (keep-alive included); a scraper simply reconnects.
    pub connection_lifetime: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 32,
            header_timeout: Duration::from_secs(5),
            connection_lifetime: Duration::from_secs(60),
        }
    }
}

/// Pause after a failed accept (EMFILE and the like) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serve `router` on `listener` until the process ends (see the module doc).
pub async fn serve(listener: TcpListener, router: Router, limits: Limits) {
    accept_loop(listener, router, limits, None).await
}

/// Serve `router` over TLS (HTTPS) on `listener` until the process ends, with the same
/// limits; the TLS handshake must finish within [`Limits::header_timeout`]. A connection over
/// the cap is closed without an answer (a plain `503` would be garbage to a TLS client).
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    limits: Limits,
) {
    accept_loop(listener, router, limits, Some(TlsAcceptor::from(tls))).await
}

async fn accept_loop(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    tls: Option<TlsAcceptor>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("HTTP accept failed (retrying): {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "HTTP connection refused: {} already served", limits.max_connections);
            if tls.is_none() {
                tokio::spawn(refuse_busy(sock));
            }
            continue;
        };
        // Handlers see who connected (`ConnectInfo<SocketAddr>`).
        let service = TowerToHyperService::new(
            router
                .clone()
                .layer(axum::Extension(axum::extract::ConnectInfo(peer))),
        );
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(sock, service, peer, limits).await,
                Some(acceptor) => {
                    match tokio::time::timeout(limits.header_timeout, acceptor.accept(sock)).await {
                        Ok(Ok(stream)) => serve_connection(stream, service, peer, limits).await,
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
}

/// Drive one connection's requests until it ends or reaches its lifetime.
async fn serve_connection<S>(
    stream: S,
    service: TowerToHyperService<Router>,
    peer: SocketAddr,
    limits: Limits,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(64 << 10);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(limits.connection_lifetime, conn).await {
        Ok(Err(e)) => tracing::debug!(%peer, "HTTP connection ended: {e}"),
        Ok(Ok(())) => {}
        Err(_) => tracing::debug!(%peer, "HTTP connection closed at its lifetime"),
    }
}

/// Answer a connection over the cap with `503` without reading it.
async fn refuse_busy(mut sock: tokio::net::TcpStream) {
    let body = "too many connections; retry\n";
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = sock.write_all(head.as_bytes()).await;
        let _ = sock.shutdown().await;
    })
    .await;
}

/// `GET /metrics` answering what `render` produces (see [`prometheus_text`]); every other path
/// is a 404.
pub fn metrics_router(render: Render) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let render = render.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
                        prometheus_text(&render()),
                    )
                }
            }),
        )
        .fallback(not_found)
}

/// OpenMetrics text as `prometheus-client` writes it, in the Prometheus text format 0.0.4: a
/// counter family's `# HELP` and `# TYPE` take the `_total` name its samples carry, and the
/// OpenMetrics-only `# UNIT` and `# EOF` lines go. Everything else passes unchanged.
pub fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .filter(|name| !name.ends_with("_total"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + counters.len() * 16);
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|kind| {
            let rest = line.strip_prefix(kind)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{kind}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

async fn not_found() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        "not found; metrics are at GET /metrics\n",
    )
}

/// Bind `addr` and serve [`metrics_router`] with the default [`Limits`] until the process ends.
pub async fn serve_metrics(addr: SocketAddr, render: Render) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    serve(listener, metrics_router(render), Limits::default()).await;
    Ok(())
}

#[cfg(test)]
mod tests;
