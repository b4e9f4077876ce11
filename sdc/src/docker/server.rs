//! The plugin's HTTP face: `POST /Plugin.Activate` and `POST /VolumeDriver.*` on a unix socket
//! (axum), JSON in and out as the Docker volume plugin protocol describes. Malformed JSON is a
//! 400 with a JSON `Err`, an unknown endpoint a 404 with a JSON `Err`; every answer is counted
//! in the SDC's metrics. Owns no behaviour: each endpoint calls the [`Driver`].

use super::api::{self, *};
use super::driver::{Driver, DriverError};
use crate::metrics::SdcMetrics;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone)]
struct App {
    driver: Arc<Driver>,
    metrics: Arc<SdcMetrics>,
}

/// Binds the socket now (so Docker finds the plugin at once) and returns the server to run.
pub fn bind(
    socket: &Path,
    driver: Arc<Driver>,
    metrics: Arc<SdcMetrics>,
) -> std::io::Result<impl std::future::Future<Output = std::io::Result<()>>> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket)?;
    let app = Router::new()
        .route("/Plugin.Activate", post(activate))
        .route("/VolumeDriver.Capabilities", post(capabilities))
        .route("/VolumeDriver.Create", post(create))
        .route("/VolumeDriver.Remove", post(remove))
        .route("/VolumeDriver.Mount", post(mount))
        .route("/VolumeDriver.Unmount", post(unmount))
        .route("/VolumeDriver.Path", post(path))
        .route("/VolumeDriver.Get", post(get))
        .route("/VolumeDriver.List", post(list))
        .fallback(unknown)
        .with_state(App { driver, metrics });
    Ok(async move { axum::serve(listener, app).await })
}

/// Binds the socket and answers every volume call with `problem` (a managed plugin whose
/// settings or certificate are wrong): Docker's commands fail at once with what to fix instead
/// of waiting for a plugin that never comes up.
pub fn bind_failed(
    socket: &Path,
    problem: String,
) -> std::io::Result<impl std::future::Future<Output = std::io::Result<()>>> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket)?;
    let message = Arc::new(format!("the Meshblock plugin cannot work: {problem}"));
    let refuse = move || {
        let m = message.clone();
        async move { err_json(StatusCode::OK, m.to_string()) }
    };
    let app = Router::new()
        .route(
            "/Plugin.Activate",
            post(|| async {
                Json(ActivateResponse {
                    Implements: vec!["VolumeDriver".into()],
                })
            }),
        )
        .route(
            "/VolumeDriver.Capabilities",
            post(|| async {
                Json(CapabilitiesResponse {
                    Capabilities: Capabilities {
                        Scope: "global".into(),
                    },
                })
            }),
        )
        .fallback(refuse);
    Ok(async move { axum::serve(listener, app).await })
}

fn err_json(status: StatusCode, msg: String) -> Response {
    (status, Json(ErrResponse { Err: msg })).into_response()
}

/// Counts the request and turns a driver error into the protocol's `Err`.
fn finish<T: serde::Serialize>(
    app: &App,
    endpoint: &str,
    start: Instant,
    r: Result<T, DriverError>,
) -> Response {
    let secs = start.elapsed().as_secs_f64();
    match r {
        Ok(v) => {
            app.metrics.plugin_request(endpoint, "ok", secs);
            Json(v).into_response()
        }
        Err(e) => {
            app.metrics.plugin_request(endpoint, e.kind(), secs);
            tracing::info!(endpoint, "refused: {e}");
            err_json(StatusCode::OK, e.to_string())
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(
    app: &App,
    endpoint: &str,
    body: &Bytes,
) -> Result<T, Box<Response>> {
    api::decode(body).map_err(|e| {
        app.metrics.plugin_request(endpoint, "malformed", 0.0);
        Box::new(err_json(StatusCode::BAD_REQUEST, e))
    })
}

async fn unknown(State(app): State<App>, uri: Uri) -> Response {
    app.metrics.plugin_request("unknown", "not_found", 0.0);
    err_json(
        StatusCode::NOT_FOUND,
        format!(
            "unknown endpoint {}: this is the Meshblock volume plugin (Plugin.Activate, VolumeDriver.*)",
            uri.path()
        ),
    )
}

async fn activate(State(app): State<App>) -> Response {
    app.metrics.plugin_request("Plugin.Activate", "ok", 0.0);
    Json(ActivateResponse {
        Implements: vec!["VolumeDriver".into()],
    })
    .into_response()
}

async fn capabilities(State(app): State<App>) -> Response {
    app.metrics.plugin_request("Capabilities", "ok", 0.0);
    Json(CapabilitiesResponse {
        Capabilities: Capabilities {
            Scope: "global".into(),
        },
    })
    .into_response()
}

async fn create(State(app): State<App>, body: Bytes) -> Response {
    let t = Instant::now();
    let req: CreateRequest = match decode(&app, "Create", &body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let opts = req.Opts.unwrap_or_default();
    let r = app.driver.create(&req.Name, &opts).await;
    finish(&app, "Create", t, r.map(|()| ErrResponse::default()))
}

async fn remove(State(app): State<App>, body: Bytes) -> Response {
    let t = Instant::now();
    let req: NameRequest = match decode(&app, "Remove", &body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let r = app.driver.remove(&req.Name).await;
    finish(&app, "Remove", t, r.map(|()| ErrResponse::default()))
}

async fn mount(State(app): State<App>, body: Bytes) -> Response {
    let t = Instant::now();
    let req: MountRequest = match decode(&app, "Mount", &body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let r = app.driver.mount(&req.Name, &req.ID).await;
    finish(
        &app,
        "Mount",
        t,
        r.map(|p| MountResponse {
            Mountpoint: p.display().to_string(),
            Err: String::new(),
        }),
    )
}

async fn unmount(State(app): State<App>, body: Bytes) -> Response {
    let t = Instant::now();
    let req: MountRequest = match decode(&app, "Unmount", &body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let r = app.driver.unmount(&req.Name, &req.ID).await;
    finish(&app, "Unmount", t, r.map(|()| ErrResponse::default()))
}

async fn path(State(app): State<App>, body: Bytes) -> Response {
    let t = Instant::now();
    let req: NameRequest = match decode(&app, "Path", &body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let p = app.driver.path(&req.Name).await;
    finish(
        &app,
        "Path",
        t,
        Ok(MountResponse {
            Mountpoint: p.map(|p| p.display().to_string()).unwrap_or_default(),
            Err: String::new(),
        }),
    )
}

async fn get(State(app): State<App>, body: Bytes) -> Response {
    let t = Instant::now();
    let req: NameRequest = match decode(&app, "Get", &body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let r = app.driver.get(&req.Name).await;
    finish(
        &app,
        "Get",
        t,
        r.map(|v| GetResponse {
            Volume: Some(v),
            Err: String::new(),
        }),
    )
}

async fn list(State(app): State<App>) -> Response {
    let t = Instant::now();
    let r = app.driver.list().await;
    finish(
        &app,
        "List",
        t,
        r.map(|v| ListResponse {
            Volumes: v,
            Err: String::new(),
        }),
    )
}
