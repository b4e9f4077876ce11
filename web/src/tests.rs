//! The HTTP stack against raw TCP clients: split requests, exact paths, slow clients, the cap.

use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn start(limits: Limits) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let render: Render = Arc::new(|| "# HELP up Up.\n# TYPE up gauge\nup 1\n".to_string());
    tokio::spawn(serve(listener, metrics_router(render), limits));
    addr
}

/// Send `parts` one write each (with a pause between, so they travel as separate segments)
/// and read the whole answer (the request asks the server to close).
async fn ask(addr: SocketAddr, parts: &[&str]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        s.write_all(p.as_bytes()).await.expect("send");
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
}

#[tokio::test]
async fn metrics_answer_on_the_exact_path_only() {
    let addr = start(Limits::default()).await;
    let ok = ask(addr, &[&get("/metrics")]).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains("text/plain; version=0.0.4"), "{ok}");
    assert!(ok.ends_with("up 1\n"), "{ok}");
    let query = ask(addr, &[&get("/metrics?x=1")]).await;
    assert!(query.starts_with("HTTP/1.1 200"), "{query}");
    for path in ["/metricsX", "/metrics/x", "/", "/metric"] {
        let r = ask(addr, &[&get(path)]).await;
        assert!(r.starts_with("HTTP/1.1 404"), "{path}: {r}");
    }
    let post = ask(
        addr,
        &["POST /metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"],
    )
    .await;
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    let garbage = ask(addr, &["\x16\x03\x01 not http at all\r\n\r\n"]).await;
    assert!(
        garbage.is_empty() || garbage.starts_with("HTTP/1.1 400"),
        "{garbage}"
    );
    // The server is still there after the garbage.
    assert!(ask(addr, &[&get("/metrics")])
        .await
        .starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn a_request_split_over_several_packets_is_served() {
    let addr = start(Limits::default()).await;
    let r = ask(
        addr,
        &[
            "GET /met",
            "rics HTTP/1.1\r\nho",
            "st: x\r\nconnection: close\r\n",
            "\r\n",
        ],
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

#[tokio::test]
async fn a_client_that_never_finishes_its_request_is_dropped() {
    let addr = start(Limits {
        header_timeout: Duration::from_millis(200),
        ..Limits::default()
    })
    .await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\n")
        .await
        .expect("send");
    let mut out = Vec::new();
    // The server ends the connection (perhaps with a 408); it does not wait forever.
    let n = tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut out))
        .await
        .expect("the server kept a connection that never sent its request");
    assert!(n.is_ok() || out.is_empty(), "{n:?}");
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}

#[tokio::test]
async fn connections_over_the_cap_get_503_until_one_is_freed() {
    let addr = start(Limits {
        max_connections: 2,
        header_timeout: Duration::from_secs(600),
        ..Limits::default()
    })
    .await;
    // Two idle connections hold both slots (the server has accepted them once a third is
    // refused; it may still be accepting them when the third arrives, so ask until it is).
    let idle = [
        TcpStream::connect(addr).await.expect("connect"),
        TcpStream::connect(addr).await.expect("connect"),
    ];
    let mut busy = String::new();
    for _ in 0..1000 {
        busy = ask(addr, &[&get("/metrics")]).await;
        if busy.starts_with("HTTP/1.1 503") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(busy.starts_with("HTTP/1.1 503"), "{busy}");
    drop(idle);
    // Once the server sees them closed, the slots are free again.
    let mut ok = String::new();
    for _ in 0..1000 {
        ok = ask(addr, &[&get("/metrics")]).await;
        if ok.starts_with("HTTP/1.1 200") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
}

#[test]
fn openmetrics_counters_become_prometheus_text_families() {
    let om =
        "# HELP a_requests Requests.\n# TYPE a_requests counter\na_requests_total{x=\"1\"} 3\n\
              # HELP a_up Up.\n# TYPE a_up gauge\na_up 1\n# UNIT a_up_seconds seconds\n# EOF\n";
    assert_eq!(
        prometheus_text(om),
        "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\n\
         a_requests_total{x=\"1\"} 3\n# HELP a_up Up.\n# TYPE a_up gauge\na_up 1\n"
    );
}
