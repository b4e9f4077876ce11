//! The REST API under `/api/v1`, described by `docs/api/openapi.json` (served at
//! `/api/v1/openapi.json`; the suite checks the two against each other).
//!
//! Reads answer the same JSON views as `scli --json` ([`proto::views`]); changes are scli's
//! commands, run through the same path ([`Service::command_as`]): the same validation, role
//! check and events. Bodies are JSON objects of at most [`BODY_LIMIT`] bytes; an unknown field
//! is refused, so a typo never passes as a default.

use super::{token, ApiError, Client, Shared};
use crate::service::Service;
use axum::extract::{FromRequest, Path, Query as UrlQuery, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use proto::model::ClusterState;
use proto::msg::{ClusterStatus, Command, MdmResponse, Query, RemoveMode, SdcSelector};
use proto::views;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// The largest request body taken, bytes.
pub const BODY_LIMIT: usize = 64 << 10;

/// The OpenAPI description of this API.
pub const OPENAPI: &str = include_str!("../../../docs/api/openapi.json");

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/login", post(login))
        .route("/api/v1/dashboard-link", post(dashboard_link))
        .route("/api/v1/cluster", get(cluster))
        .route("/api/v1/protection-domains", get(pds))
        .route("/api/v1/protection-domains/{name}", get(pd))
        .route("/api/v1/storage-pools", get(pools))
        .route("/api/v1/storage-pools/{name}", get(pool))
        .route(
            "/api/v1/storage-pools/{name}/rebuild-policy",
            put(set_rebuild_policy),
        )
        .route("/api/v1/sds", get(all_sds))
        .route("/api/v1/sds/{name}", get(one_sds))
        .route("/api/v1/sdcs", get(sdcs))
        .route("/api/v1/sdcs/{name}", get(sdc))
        .route("/api/v1/volumes", get(volumes).post(add_volume))
        .route("/api/v1/volumes/{name}", get(volume).delete(remove_volume))
        .route("/api/v1/volumes/{name}/rename", post(rename_volume))
        .route("/api/v1/volumes/{name}/resize", post(resize_volume))
        .route("/api/v1/volumes/{name}/map", post(map_volume))
        .route("/api/v1/volumes/{name}/unmap", post(unmap_volume))
        .route("/api/v1/volumes/{name}/limits", post(set_limits))
        .route("/api/v1/snapshots", post(snapshot))
        .route("/api/v1/snapshot-policies", get(policies))
        .route("/api/v1/events", get(events))
        .route("/api/v1/resilience", get(resilience))
        .route("/api/v1/history", get(history))
}

/// The most of a refused (over-limit) body that is read and thrown away before the `413`, so
/// that a client which sends its body without asking first (`Expect: 100-continue`) is done
/// sending and reads the answer, instead of a reset connection. A longer body is refused
/// unread, and so is any body whose client asked first (it then never sends it).
pub const DRAIN_LIMIT: usize = 1 << 20;

/// How long the server keeps reading a refused body.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// A JSON body of at most [`BODY_LIMIT`] bytes, decoded strictly.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        let too_large = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "PayloadTooLarge",
                format!("the request body is larger than {BODY_LIMIT} bytes"),
            )
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let asked_first = req
            .headers()
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let mut body = req.into_body();
        let drain = !asked_first && declared.is_none_or(|n| n <= DRAIN_LIMIT as u64);
        if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
            if drain {
                discard(&mut body, DRAIN_LIMIT).await;
            }
            return Err(too_large());
        }
        let mut bytes = Vec::new();
        loop {
            match next_data(&mut body).await {
                None => break,
                Some(Err(())) => {
                    return Err(ApiError::bad_request("the request body could not be read"))
                }
                Some(Ok(chunk)) if bytes.len() + chunk.len() > BODY_LIMIT => {
                    if drain {
                        discard(&mut body, DRAIN_LIMIT.saturating_sub(bytes.len())).await;
                    }
                    return Err(too_large());
                }
                Some(Ok(chunk)) => bytes.extend_from_slice(&chunk),
            }
        }
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))
    }
}

/// The body's next piece of data (trailers are skipped); `None` at its end.
async fn next_data(body: &mut axum::body::Body) -> Option<Result<bytes::Bytes, ()>> {
    use axum::body::HttpBody;
    loop {
        let frame = std::future::poll_fn(|cx| std::pin::Pin::new(&mut *body).poll_frame(cx)).await;
        match frame? {
            Err(_) => return Some(Err(())),
            Ok(f) => {
                if let Ok(data) = f.into_data() {
                    return Some(Ok(data));
                }
            }
        }
    }
}

/// Read and drop up to `max` more bytes of `body`, for at most [`DRAIN_TIME`].
async fn discard(body: &mut axum::body::Body, max: usize) {
    let mut left = max;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while let Some(Ok(chunk)) = next_data(body).await {
            left = left.saturating_sub(chunk.len());
            if left == 0 {
                break;
            }
        }
    })
    .await;
}

fn need_token(headers: &HeaderMap, cookie_ok: bool) -> Result<String, ApiError> {
    token(headers, cookie_ok).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Unauthenticated",
            if cookie_ok {
                "log in first: POST /api/v1/login, then send Authorization: Bearer TOKEN"
            } else {
                "changes need Authorization: Bearer TOKEN (from POST /api/v1/login); the \
                 dashboard's cookie is accepted for reads only"
            },
        )
    })
}

/// The leader's view for a logged-in user: status and (redacted) state.
fn view(
    svc: &Service,
    headers: &HeaderMap,
    query: &Query,
) -> Result<(ClusterStatus, ClusterState), ApiError> {
    let t = need_token(headers, true)?;
    match svc.query_as(&t, query)? {
        MdmResponse::View { status, state } => Ok((*status, *state)),
        _ => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal",
            "unexpected answer to a query",
        )),
    }
}

/// The session token of a change: from the `Authorization` header only (see [`super`]).
/// Taken before the body, so a request without one is refused before anything else.
pub struct Bearer(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Bearer {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, ApiError> {
        need_token(&parts.headers, false).map(Bearer)
    }
}

/// Run a command for the user whose session `token` is.
async fn run(
    svc: &Service,
    token: &Bearer,
    from: &Client,
    command: Command,
    created: bool,
) -> Result<impl IntoResponse, ApiError> {
    match svc
        .command_as(from.0 .0, &token.0, command, Vec::new())
        .await?
    {
        MdmResponse::Done { message, object_id } => Ok((
            if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            Json(json!({"message": message, "id": object_id})),
        )),
        _ => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal",
            "unexpected answer to a command",
        )),
    }
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    username: String,
    password: String,
    /// A shorter session than the MDM's `session_ttl_secs`, in seconds.
    ttl_secs: Option<u64>,
}

async fn login(
    State(r): State<Shared>,
    from: Client,
    Body(b): Body<LoginBody>,
) -> Result<Json<Value>, ApiError> {
    match r
        .svc
        .login_from(from.0 .0.ip(), &b.username, &b.password, b.ttl_secs)?
    {
        MdmResponse::Session {
            token,
            role,
            expires_unix,
        } => Ok(Json(
            json!({"token": token, "role": role, "expires_unix": expires_unix}),
        )),
        _ => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal",
            "unexpected answer to a login",
        )),
    }
}

/// A link that logs a browser into the dashboard once, within a minute, with the caller's
/// session (for a browser on another machine, or a headless one).
async fn dashboard_link(
    State(r): State<Shared>,
    Bearer(t): Bearer,
) -> Result<Json<Value>, ApiError> {
    // Only a valid session gets a link (any role may look at the dashboard).
    r.svc.authorize(&t, proto::model::Role::Monitor)?;
    let ticket = r.issue_ticket(&t);
    let base = r.svc.api_url.get().cloned().unwrap_or_default();
    Ok(Json(json!({
        "url": format!("{base}/login?ticket={ticket}"),
        "expires_in_seconds": super::TICKET_TTL.as_secs(),
    })))
}

async fn cluster(State(r): State<Shared>, h: HeaderMap) -> Result<Json<Value>, ApiError> {
    let (c, _) = view(&r.svc, &h, &Query::Cluster)?;
    Ok(Json(serde_json::to_value(c).unwrap_or(Value::Null)))
}

async fn pds(State(r): State<Shared>, h: HeaderMap) -> Result<Json<Value>, ApiError> {
    let (c, s) = view(&r.svc, &h, &Query::All)?;
    Ok(Json(Value::Array(
        s.pds
            .values()
            .map(|pd| views::protection_domain(&s, &c, pd))
            .collect(),
    )))
}

async fn pd(
    State(r): State<Shared>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (c, s) = view(&r.svc, &h, &Query::ProtectionDomain { name: name.clone() })?;
    let pd = s
        .pd_by_name(&name)
        .ok_or_else(|| missing("protection domain", &name))?;
    Ok(Json(views::protection_domain(&s, &c, pd)))
}

fn missing(what: &str, name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("Could not find the {what} {name}"),
    )
}

async fn pools(State(r): State<Shared>, h: HeaderMap) -> Result<Json<Value>, ApiError> {
    let (c, s) = view(&r.svc, &h, &Query::All)?;
    Ok(Json(Value::Array(
        s.pools.values().map(|p| views::pool(&s, &c, p)).collect(),
    )))
}

async fn pool(
    State(r): State<Shared>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (c, s) = view(&r.svc, &h, &Query::StoragePool { name: name.clone() })?;
    let p = s
        .pool_by_name(&name)
        .ok_or_else(|| missing("storage pool", &name))?;
    Ok(Json(views::pool(&s, &c, p)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyBody {
    concurrency: Option<u32>,
    bandwidth_mib_s: Option<u32>,
    adaptive: Option<bool>,
}

async fn set_rebuild_policy(
    State(r): State<Shared>,
    t: Bearer,
    from: Client,
    Path(pool): Path<String>,
    Body(b): Body<PolicyBody>,
) -> Result<impl IntoResponse, ApiError> {
    if b.concurrency.is_none() && b.bandwidth_mib_s.is_none() && b.adaptive.is_none() {
        return Err(ApiError::bad_request(
            "give at least one of concurrency, bandwidth_mib_s, adaptive",
        ));
    }
    let command = Command::SetRebuildPolicy {
        pool,
        concurrency: b.concurrency,
        bandwidth_mib_s: b.bandwidth_mib_s,
        adaptive: b.adaptive,
    };
    run(&r.svc, &t, &from, command, false).await
}

async fn all_sds(State(r): State<Shared>, h: HeaderMap) -> Result<Json<Value>, ApiError> {
    let (c, s) = view(&r.svc, &h, &Query::AllSds)?;
    Ok(Json(Value::Array(
        s.sds.values().map(|x| views::sds(&s, &c, x)).collect(),
    )))
}

async fn one_sds(
    State(r): State<Shared>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (c, s) = view(&r.svc, &h, &Query::Sds { name: name.clone() })?;
    let x = s.sds_by_name(&name).ok_or_else(|| missing("SDS", &name))?;
    Ok(Json(views::sds(&s, &c, x)))
}

async fn sdcs(State(r): State<Shared>, h: HeaderMap) -> Result<Json<Value>, ApiError> {
    let (c, s) = view(&r.svc, &h, &Query::Sdc { sdc: None })?;
    Ok(Json(Value::Array(
        s.sdcs.values().map(|x| views::sdc(&c, x)).collect(),
    )))
}

async fn sdc(
    State(r): State<Shared>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let q = Query::Sdc {
        sdc: Some(SdcSelector::Name(name.clone())),
    };
    let (c, s) = view(&r.svc, &h, &q)?;
    let x = s
        .sdcs
        .values()
        .find(|x| x.name == name)
        .ok_or_else(|| missing("SDC", &name))?;
    Ok(Json(views::sdc(&c, x)))
}

async fn volumes(State(r): State<Shared>, h: HeaderMap) -> Result<Json<Value>, ApiError> {
    let (c, s) = view(&r.svc, &h, &Query::AllVolumes)?;
    Ok(Json(Value::Array(
        s.volumes
            .values()
            .map(|v| views::volume(&s, &c, v))
            .collect(),
    )))
}

async fn volume(
    State(r): State<Shared>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (c, s) = view(&r.svc, &h, &Query::Volume { name: name.clone() })?;
    let v =
        proto::docker::volume_by_either_name(&s, &name).ok_or_else(|| missing("volume", &name))?;
    Ok(Json(views::volume(&s, &c, v)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewVolume {
    name: String,
    storage_pool: String,
    size_bytes: u64,
    #[serde(default = "yes")]
    thin: bool,
    #[serde(default)]
    preempt: bool,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

async fn add_volume(
    State(r): State<Shared>,
    t: Bearer,
    from: Client,
    Body(b): Body<NewVolume>,
) -> Result<impl IntoResponse, ApiError> {
    let command = Command::AddVolume {
        pool: b.storage_pool,
        name: b.name,
        size_bytes: b.size_bytes,
        thin: b.thin,
        labels: b.labels,
        preempt: b.preempt,
    };
    run(&r.svc, &t, &from, command, true).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveParams {
    remove_mode: Option<String>,
}

async fn remove_volume(
    State(r): State<Shared>,
    t: Bearer,
    from: Client,
    Path(name): Path<String>,
    p: Result<UrlQuery<RemoveParams>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let UrlQuery(p) = p.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let mode: RemoveMode = match p.remove_mode {
        Some(m) => m.parse().map_err(ApiError::bad_request)?,
        None => RemoveMode::OnlyMe,
    };
    run(
        &r.svc,
        &t,
        &from,
        Command::RemoveVolume { name, mode },
        false,
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rename {
    new_name: String,
}

async fn rename_volume(
    State(r): State<Shared>,
    t: Bearer,
    from: Client,
    Path(name): Path<String>,
    Body(b): Body<Rename>,
) -> Result<impl IntoResponse, ApiError> {
    let command = Command::RenameVolume {
        name,
        new_name: b.new_name,
    };
    run(&r.svc, &t, &from, command, false).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resize {
    size_bytes: u64,
}

async fn resize_volume(
    State(r): State<Shared>,
    t: Bearer,
    from: Client,
    Path(name): Path<String>,
    Body(b): Body<Resize>,
) -> Result<impl IntoResponse, ApiError> {
    let command = Command::ModifyVolumeCapacity {
        name,
        size_bytes: b.size_bytes,
    };
    run(&r.svc, &t, &from, command, false).await
}

/// Exactly one of an SDC's name, IP or GUID.
fn selector(
    name: Option<String>,
    ip: Option<String>,
    guid: Option<String>,
) -> Result<SdcSelector, ApiError> {
    match (name, ip, guid) {
        (Some(n), None, None) => Ok(SdcSelector::Name(n)),
        (None, Some(i), None) => Ok(SdcSelector::Ip(i)),
        (None, None, Some(g)) => Ok(SdcSelector::Guid(g)),
        _ => Err(ApiError::bad_request(
            "name the SDC with exactly one of sdc_name, sdc_ip, sdc_guid",
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MapBody {
    sdc_name: Option<String>,
    sdc_ip: Option<String>,
    sdc_guid: Option<String>,
    #[serde(default)]
    allow_multi_map: bool,
}

async fn map_volume(
    State(r): State<Shared>,
    t: Bearer,
    from: Client,
    Path(volume): Path<String>,
    Body(b): Body<MapBody>,
) -> Result<impl IntoResponse, ApiError> {
    let command = Command::MapVolumeToSdc {
        volume,
        sdc: selector(b.sdc_name, b.sdc_ip, b.sdc_guid)?,
        allow_multi_map: b.allow_multi_map,
        takeover: false,
    };
    run(&r.svc, &t, &from, command, false).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnmapBody {
    sdc_name: Option<String>,
    sdc_ip: Option<String>,
    sdc_guid: Option<String>,
    #[serde(default)]
    all_sdcs: bool,
}

async fn unmap_volume(
    State(r): State<Shared>,
    t: Bearer,
    from: Client,
    Path(volume): Path<String>,
    Body(b): Body<UnmapBody>,
) -> Result<impl IntoResponse, ApiError> {
    let sdc = if b.all_sdcs {
        if b.sdc_name.is_some() || b.sdc_ip.is_some() || b.sdc_guid.is_some() {
            return Err(ApiError::bad_request(
                "give either all_sdcs or one SDC, not both",
            ));
        }
        None
    } else {
        Some(selector(b.sdc_name, b.sdc_ip, b.sdc_guid)?)
    };
    run(
        &r.svc,
        &t,
        &from,
        Command::UnmapVolumeFromSdc { volume, sdc },
        false,
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsBody {
    sdc_name: Option<String>,
    sdc_ip: Option<String>,
    sdc_guid: Option<String>,
    iops_limit: Option<u64>,
    bandwidth_limit_kbps: Option<u64>,
}

async fn set_limits(
    State(r): State<Shared>,
    t: Bearer,
    from: Client,
    Path(volume): Path<String>,
    Body(b): Body<LimitsBody>,
) -> Result<impl IntoResponse, ApiError> {
    if b.iops_limit.is_none() && b.bandwidth_limit_kbps.is_none() {
        return Err(ApiError::bad_request(
            "give iops_limit, bandwidth_limit_kbps or both (0 removes a limit)",
        ));
    }
    let command = Command::SetSdcVolumeLimits {
        volume,
        sdc: selector(b.sdc_name, b.sdc_ip, b.sdc_guid)?,
        iops_limit: b.iops_limit,
        bandwidth_limit_kbps: b.bandwidth_limit_kbps,
    };
    run(&r.svc, &t, &from, command, false).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    volumes: Vec<String>,
    #[serde(default)]
    names: Vec<String>,
}

async fn snapshot(
    State(r): State<Shared>,
    t: Bearer,
    from: Client,
    Body(b): Body<SnapshotBody>,
) -> Result<impl IntoResponse, ApiError> {
    if b.volumes.is_empty() {
        return Err(ApiError::bad_request(
            "volumes must name at least one volume",
        ));
    }
    if !b.names.is_empty() && b.names.len() != b.volumes.len() {
        return Err(ApiError::bad_request(
            "names must be empty or name one snapshot per volume",
        ));
    }
    let command = Command::SnapshotVolumes {
        volumes: b.volumes,
        names: b.names,
        labels: BTreeMap::new(),
    };
    run(&r.svc, &t, &from, command, true).await
}

async fn policies(State(r): State<Shared>, h: HeaderMap) -> Result<Json<Value>, ApiError> {
    let (_, s) = view(&r.svc, &h, &Query::SnapshotPolicy { name: None })?;
    Ok(Json(
        serde_json::to_value(&s.snapshot_policies).unwrap_or(Value::Null),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventParams {
    /// Unix seconds or RFC 3339.
    since: Option<String>,
}

async fn events(
    State(r): State<Shared>,
    h: HeaderMap,
    p: Result<UrlQuery<EventParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let UrlQuery(p) = p.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let since_unix = match p.since.as_deref() {
        None => None,
        Some(t) => Some(
            t.parse::<u64>()
                .ok()
                .or_else(|| proto::clock::parse_rfc3339(t))
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "since must be Unix seconds or RFC 3339 (2026-12-06T10:00:00Z); got {t:?}"
                    ))
                })?,
        ),
    };
    let (_, s) = view(&r.svc, &h, &Query::Events { since_unix })?;
    Ok(Json(serde_json::to_value(&s.events).unwrap_or(Value::Null)))
}

async fn resilience(State(r): State<Shared>, h: HeaderMap) -> Result<Json<Value>, ApiError> {
    let (c, _) = view(&r.svc, &h, &Query::Resilience)?;
    Ok(Json(
        serde_json::to_value(&c.resilience).unwrap_or(Value::Null),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryParams {
    storage_pool: Option<String>,
    sds: Option<String>,
    volume: Option<String>,
}

async fn history(
    State(r): State<Shared>,
    h: HeaderMap,
    p: Result<UrlQuery<HistoryParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    use crate::history::Subject;
    let UrlQuery(p) = p.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let (_, s) = view(&r.svc, &h, &Query::Cluster)?;
    let subject = match (p.storage_pool, p.sds, p.volume) {
        (Some(n), None, None) => Subject::Pool(
            s.pool_by_name(&n)
                .ok_or_else(|| missing("storage pool", &n))?
                .id,
        ),
        (None, Some(n), None) => {
            Subject::Sds(s.sds_by_name(&n).ok_or_else(|| missing("SDS", &n))?.id)
        }
        (None, None, Some(n)) => Subject::Volume(
            proto::docker::volume_by_either_name(&s, &n)
                .ok_or_else(|| missing("volume", &n))?
                .id,
        ),
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of storage_pool, sds, volume",
            ))
        }
    };
    let points = r
        .svc
        .history
        .lock()
        .map(|h| h.series(subject))
        .unwrap_or_default();
    Ok(Json(serde_json::to_value(points).unwrap_or(Value::Null)))
}
