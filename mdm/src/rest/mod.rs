//! The MDM's HTTPS face, in the PowerFlex Gateway's role: a REST API under `/api/v1`
//! ([`api`]) and a web dashboard at `/` ([`dashboard`]), served with the `web` crate's limits.
//!
//! Trust: TLS with the MDM's certificate (from the cluster CA, or `api_cert_dir`); no client
//! certificate is asked. Every request but the login pages and `POST /api/v1/login` needs a
//! user's session token — the same users, roles and tokens as scli — sent as
//! `Authorization: Bearer TOKEN`. The dashboard and read-only API calls also take it from the
//! `meshblock_session` cookie the login form sets (HttpOnly, Secure, SameSite=Strict); calls
//! that change anything take only the header, so a page from elsewhere cannot make a browser
//! change the cluster. Role checks are scli's ([`Service::role_needed`]): a Monitor reads only.
//!
//! Only the leader answers (it holds the soft state: sessions of SDCs, rebuild rates, the I/O
//! history). Any other MDM answers `307 Temporary Redirect` to the same path on the leader's
//! `api_url`, which it learns by asking the leader (`Identify`) and caches per leader.

pub mod api;
pub mod dashboard;
mod error;

pub use error::ApiError;

use crate::service::{call_control, Service};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Router};
use proto::msg::{MdmRequest, MdmResponse};
use proto::{ErrorCode, WireError};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The session cookie the dashboard's login form sets.
pub const SESSION_COOKIE: &str = "meshblock_session";

/// Shared by every handler.
pub struct Rest {
    pub svc: Arc<Service>,
    /// The API URL of each leader asked so far, by MDM id.
    leader_urls: Mutex<HashMap<u64, String>>,
    /// One-time dashboard login tickets: ticket → (session token, when it was made).
    tickets: Mutex<HashMap<String, (String, Instant)>>,
}

/// How long a dashboard link works (once).
pub const TICKET_TTL: Duration = Duration::from_secs(60);
/// Dashboard links outstanding at most; the oldest goes first.
const TICKETS_MAX: usize = 64;

impl Rest {
    /// A one-time ticket that logs a browser in with `token` (see `POST /api/v1/dashboard-link`).
    pub fn issue_ticket(&self, token: &str) -> String {
        let ticket = crate::auth::random_hex(24);
        if let Ok(mut t) = self.tickets.lock() {
            t.retain(|_, (_, at)| at.elapsed() < TICKET_TTL);
            while t.len() >= TICKETS_MAX {
                let Some(oldest) = t
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                t.remove(&oldest);
            }
            t.insert(ticket.clone(), (token.to_string(), Instant::now()));
        }
        ticket
    }

    /// The session token of `ticket`, once, while it is fresh.
    pub fn redeem_ticket(&self, ticket: &str) -> Option<String> {
        let (token, at) = self.tickets.lock().ok()?.remove(ticket)?;
        (at.elapsed() < TICKET_TTL).then_some(token)
    }
}

pub type Shared = Arc<Rest>;

/// Who connected (the `web` crate puts it in every request).
pub type Client = Extension<ConnectInfo<SocketAddr>>;

/// The whole HTTPS router: API, dashboard, and JSON 404/405 answers.
pub fn router(svc: Arc<Service>) -> Router {
    let rest = Arc::new(Rest {
        svc,
        leader_urls: Mutex::new(HashMap::new()),
        tickets: Mutex::new(HashMap::new()),
    });
    Router::new()
        .merge(api::routes())
        .merge(dashboard::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            rest.clone(),
            leader_only,
        ))
        .with_state(rest)
}

/// Bind `addr` and serve the router over TLS until the process ends.
pub async fn serve(
    svc: Arc<Service>,
    addr: SocketAddr,
    tls: rustls::ServerConfig,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "REST API and dashboard on https://{addr}");
    web::serve_tls(
        listener,
        Arc::new(tls),
        router(svc),
        web::Limits {
            max_connections: 64,
            ..web::Limits::default()
        },
    )
    .await;
    Ok(())
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!(
            "no such resource: {} (the API is under /api/v1, described by /api/v1/openapi.json)",
            req.uri().path()
        ),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

/// Serve on the leader; elsewhere redirect to it (or answer 503 while there is none).
async fn leader_only(State(rest): State<Shared>, req: Request, next: Next) -> Response {
    let st = rest.svc.raft.shared.status();
    if st.is_leader && st.leader_ready {
        return next.run(req).await;
    }
    if st.is_leader || st.leader_id == 0 {
        return ApiError::from(WireError::new(
            ErrorCode::Unavailable,
            "no MDM leader is ready yet; retry in a moment",
        ))
        .into_response();
    }
    match rest.leader_url(st.leader_id).await {
        Some(url) => {
            let path = req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string();
            Redirect::temporary(&format!("{}{path}", url.trim_end_matches('/'))).into_response()
        }
        None => ApiError::from(WireError::new(
            ErrorCode::Unavailable,
            "this MDM is not the leader and the leader's API address is unknown (it may \
             serve no API: see api_listen); retry, or use the leader's address",
        ))
        .into_response(),
    }
}

impl Rest {
    /// The API URL of MDM `leader`, asked once over the cluster transport.
    async fn leader_url(&self, leader: u64) -> Option<String> {
        if let Some(u) = self.leader_urls.lock().ok()?.get(&leader).cloned() {
            return Some(u);
        }
        let addr: SocketAddr = self.svc.peer_addr(leader)?.parse().ok()?;
        let client = tokio::time::timeout(Duration::from_secs(5), self.svc.endpoint.connect(addr))
            .await
            .ok()?
            .ok()?;
        let answer = call_control(&client, &MdmRequest::Identify).await;
        client.close();
        let MdmResponse::Identity {
            api_url: Some(url), ..
        } = answer.ok()?
        else {
            return None;
        };
        self.leader_urls.lock().ok()?.insert(leader, url.clone());
        Some(url)
    }
}

/// The session token: the `Authorization: Bearer` header, or (when `cookie_ok`) the session
/// cookie.
pub fn token(headers: &HeaderMap, cookie_ok: bool) -> Option<String> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.to_str().ok()?;
        let t = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))?;
        return Some(t.trim().to_string());
    }
    if !cookie_ok {
        return None;
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == SESSION_COOKIE).then(|| v.to_string())
        })
}

/// The `Set-Cookie` value of a session (`max_age` seconds; 0 clears it).
pub fn session_cookie(token: &str, max_age: u64) -> String {
    format!(
        "{SESSION_COOKIE}={token}; Path=/; Max-Age={max_age}; HttpOnly; Secure; SameSite=Strict"
    )
}
