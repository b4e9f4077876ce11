//! The MDM's HTTPS REST API and web dashboard, driven by real clients: curl (trusting the
//! cluster CA) and headless Chromium.
//!
//! - Through an SDS failure and its rebuild, the API answers what scli answers (pool, SDS,
//!   resilience), the events name the failure, and the dashboard rendered by Chromium shows the
//!   degraded pool and the rebuild's progress (a screenshot goes to
//!   `target/test-artifacts/`); later, the rebuild's event with its duration and the I/O plots.
//! - Any MDM but the leader redirects to the leader's API.
//! - Bad input: no token, a forged or expired one, a Monitor trying changes, malformed JSON,
//!   unknown fields, a huge body, unknown paths and methods, plain HTTP: a JSON error with the
//!   right status, nothing changed, the MDM still serving.
//! - `docs/api/openapi.json` is what the server serves, and every operation it lists answers
//!   one of its documented statuses with the documented fields.

use meshblock_tests::nbd::Nbd;
use meshblock_tests::*;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// An HTTPS client of one MDM's API: curl, trusting the cluster CA, reaching the certificate's
/// name (`meshblock`) at the MDM's address. Tokens and bodies go through files, never argv.
struct Api {
    addr: SocketAddr,
    ca: PathBuf,
    dir: PathBuf,
}

/// An answer: status, headers (lower-cased names), body.
struct Answer {
    status: u16,
    headers: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    /// A JSON error of `status` whose code is `code`.
    fn error(&self, status: u16, code: &str) -> String {
        assert_eq!(self.status, status, "status of {}", self.body);
        let v = self.json();
        assert_eq!(v["error"]["code"], code, "{v}");
        let msg = v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(!msg.is_empty(), "an error says what is wrong: {v}");
        msg
    }
}

impl Api {
    fn new(c: &Cluster, addr: SocketAddr) -> Api {
        Api {
            addr,
            ca: c.dir.join("certs/mdm/ca.pem"),
            dir: c.dir.path.clone(),
        }
    }

    fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<&[u8]>) -> Answer {
        let ask_first = body.is_some_and(|b| b.len() > 64 << 10);
        self.call_with(method, path, token, body, ask_first)
    }

    /// `call`, choosing whether curl asks with `Expect: 100-continue` before sending the body
    /// (`false` sends it straight away, as many clients do).
    fn call_with(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&[u8]>,
        ask_first: bool,
    ) -> Answer {
        let n: u32 = rand::random();
        let out = self.dir.join(format!("curl-{n}.body"));
        let head = self.dir.join(format!("curl-{n}.head"));
        let mut args: Vec<String> = vec![
            "-sS".into(),
            "--max-time".into(),
            "60".into(),
            "-o".into(),
            out.display().to_string(),
            "-D".into(),
            head.display().to_string(),
            "-w".into(),
            "%{http_code}".into(),
            "--cacert".into(),
            self.ca.display().to_string(),
            "--connect-to".into(),
            format!("meshblock:443:{}:{}", self.addr.ip(), self.addr.port()),
            "-X".into(),
            method.into(),
        ];
        let auth = self.dir.join(format!("curl-{n}.auth"));
        if let Some(t) = token {
            std::fs::write(&auth, format!("Authorization: Bearer {t}\n")).expect("auth file");
            args.extend(["-H".into(), format!("@{}", auth.display())]);
        }
        let req = self.dir.join(format!("curl-{n}.req"));
        if let Some(b) = body {
            if ask_first {
                // The server then refuses an over-limit body before curl sends it.
                args.extend([
                    "-H".into(),
                    "Expect: 100-continue".into(),
                    "--expect100-timeout".into(),
                    "60".into(),
                ]);
            } else {
                // No `Expect` (curl would add one for large bodies): the server reads the body
                // it refuses, up to its drain limit, so the client gets to read the answer.
                args.extend(["-H".into(), "Expect:".into()]);
            }
            std::fs::write(&req, b).expect("body file");
            args.extend([
                "-H".into(),
                "Content-Type: application/json".into(),
                "--data-binary".into(),
                format!("@{}", req.display()),
            ]);
        }
        args.push(format!("https://meshblock{path}"));
        let o = Command::new("curl").args(&args).output().expect("run curl");
        let status: u16 = String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        let answer = Answer {
            status,
            headers: std::fs::read_to_string(&head).unwrap_or_default(),
            body: std::fs::read_to_string(&out).unwrap_or_default(),
        };
        for f in [&out, &head, &auth, &req] {
            let _ = std::fs::remove_file(f);
        }
        assert!(
            status != 0,
            "curl {method} {path}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        answer
    }

    fn get(&self, path: &str, token: &str) -> Answer {
        self.call("GET", path, Some(token), None)
    }

    fn send(&self, method: &str, path: &str, token: &str, body: &Value) -> Answer {
        self.call(method, path, Some(token), Some(body.to_string().as_bytes()))
    }

    fn login(&self, user: &str, password: &str) -> String {
        let a = self.call(
            "POST",
            "/api/v1/login",
            None,
            Some(
                json!({"username": user, "password": password})
                    .to_string()
                    .as_bytes(),
            ),
        );
        assert_eq!(a.status, 200, "login as {user}: {}", a.body);
        a.json()["token"].as_str().expect("token").to_string()
    }
}

/// The leader's API.
fn leader_api(c: &Cluster) -> Api {
    let i = c.wait_leader(Duration::from_secs(120));
    Api::new(c, c.mdms[i].api)
}

/// Headless Chromium in a namespace of its own on the test's network: `--dump-dom` of `url`
/// (or a screenshot to `shot`).
fn chromium(net: &netns::Net, dir: &Path, url: &str, shot: Option<&Path>) -> String {
    let node = net.node("browser");
    let home = dir.join("chromium-home");
    std::fs::create_dir_all(&home).expect("chromium home");
    let mut args: Vec<String> = netns::Net::exec_prefix(&node);
    args.extend([
        "env".into(),
        format!("HOME={}", home.display()),
        "timeout".into(),
        "180".into(),
        "chromium".into(),
        "--headless".into(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--no-first-run".into(),
        "--disable-dev-shm-usage".into(),
        "--ignore-certificate-errors".into(),
        format!("--user-data-dir={}", home.join("profile").display()),
        "--window-size=1280,1900".into(),
    ]);
    match shot {
        Some(p) => args.push(format!("--screenshot={}", p.display())),
        None => args.push("--dump-dom".into()),
    }
    args.push(url.into());
    let o = Command::new("ip")
        .args(&args)
        .output()
        .expect("run chromium");
    assert!(
        o.status.success(),
        "chromium {url}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A one-time dashboard link for `token`, its host replaced by the MDM's address.
fn dashboard_link(api: &Api, token: &str) -> String {
    let a = api.call("POST", "/api/v1/dashboard-link", Some(token), None);
    assert_eq!(a.status, 200, "{}", a.body);
    let url = a.json()["url"].as_str().expect("url").to_string();
    assert!(url.starts_with("https://"), "{url}");
    url
}

fn artifacts() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&p).expect("artifacts dir");
    p
}

/// The field values that must agree between scli and the API.
fn pool_core(v: &Value) -> Value {
    json!([
        v["state"],
        v["normal_pgs"],
        v["rebuilding_pgs"],
        v["degraded_pgs"],
        v["unavailable_pgs"],
        v["volumes"]
    ])
}

#[test]
fn the_api_and_dashboard_follow_an_sds_failure_and_its_rebuild() {
    let net = match netns::Net::new() {
        Ok(n) => std::sync::Arc::new(n),
        Err(e) => panic!("network namespaces are needed here: {e}"),
    };
    let mut dc = DataCluster::start_opts(
        "rest-rebuild",
        &DataOpts {
            net: Some(net.clone()),
            mdm_extra: vec!["--history-sample-secs".into(), "1".into()],
            ..DataOpts::default()
        },
    );
    let api = leader_api(&dc.c);
    let token = api.login("admin", ADMIN_PASSWORD);

    // I/O through the SDC, so the history has something to plot.
    let mut nbd = Nbd::connect(&dc.socket, "vol1").expect("connect");
    let fill = vec![0x5Au8; 1 << 20];
    for mib in 0..64u64 {
        nbd.write_at(mib << 20, &fill).expect("write");
    }
    nbd.flush().expect("flush");
    let points = wait_for(
        "the leader's history to show the writes",
        Duration::from_secs(120),
        || {
            let a = api.get("/api/v1/history?volume=vol1", &token);
            let v = a.json();
            let pts = v.as_array()?.clone();
            pts.iter()
                .any(|p| {
                    p["write_iops"].as_f64() > Some(0.0) && p["write_bps"].as_f64() > Some(0.0)
                })
                .then_some(pts)
        },
    );
    let pool_points = api.get("/api/v1/history?storage_pool=sp1", &token).json();
    assert!(
        pool_points
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["write_iops"].as_f64() > Some(0.0))),
        "the pool sums its volumes: {pool_points}"
    );
    nbd.disconnect();

    // An SDS dies mid-service; the rebuild is throttled so its state lasts.
    dc.set_rebuild_policy(&["--concurrency", "1", "--bandwidth_mib_s", "1"]);
    dc.sds[2].kill();
    wait_sds_state(&dc, "sds3", "Down");
    let scli_pool = wait_for("pool sp1 rebuilding", Duration::from_secs(300), || {
        let v = pool_state(&dc.c, "sp1");
        (v["rebuilding_pgs"].as_u64() > Some(0)).then_some(v)
    });
    assert!(scli_pool["rebuild"]["pgs_left"].as_u64() > Some(0));

    // The API answers what scli answers: asked between two equal scli answers.
    let (rest_pool, scli_pool) = wait_for(
        "the API's pool between two equal scli answers",
        Duration::from_secs(120),
        || {
            let before = pool_state(&dc.c, "sp1");
            let rest = api.get("/api/v1/storage-pools/sp1", &token).json();
            let after = pool_state(&dc.c, "sp1");
            (pool_core(&before) == pool_core(&after)).then_some((rest, after))
        },
    );
    assert_eq!(
        pool_core(&rest_pool),
        pool_core(&scli_pool),
        "REST {rest_pool} scli {scli_pool}"
    );
    let sds3 = api.get("/api/v1/sds/sds3", &token).json();
    assert_eq!(sds3["state"], "Down", "{sds3}");
    let listed = api.get("/api/v1/storage-pools", &token).json();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    // The same for the resilience view (its losses change as PGs finish copying).
    let (res, scli_res) = wait_for(
        "the API's resilience between two equal scli answers",
        Duration::from_secs(120),
        || {
            let before = dc.c.must_scli(&["--query_resilience", "--json"]).json();
            let rest = api.get("/api/v1/resilience", &token).json();
            let after = dc.c.must_scli(&["--query_resilience", "--json"]).json();
            (before["cannot_survive"] == after["cannot_survive"]
                && before["pgs_single_copy_now"] == after["pgs_single_copy_now"])
                .then_some((rest, after))
        },
    );
    assert!(
        !res["cannot_survive"]
            .as_array()
            .is_none_or(|a| a.is_empty()),
        "mid-rebuild some single loss is fatal: {res}"
    );
    assert_eq!(res["cannot_survive"], scli_res["cannot_survive"]);
    assert_eq!(res["pgs_single_copy_now"], scli_res["pgs_single_copy_now"]);
    let events = api.get("/api/v1/events", &token).json();
    let messages: Vec<String> = events
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["message"].as_str().map(str::to_string))
        .collect();
    assert!(
        messages.iter().any(|m| m.contains("SDS sds3 is down")),
        "{messages:#?}"
    );

    // The dashboard, as a browser renders it.
    let dom = chromium(&net, &dc.c.dir.path, &dashboard_link(&api, &token), None);
    assert!(dom.contains("data-health=\"Degraded\""), "{dom}");
    assert!(
        dom.contains("data-sds=\"sds3\" data-state=\"Down\""),
        "{dom}"
    );
    assert!(
        dom.contains("data-pool=\"sp1\" data-state=\"Rebuilding\""),
        "{dom}"
    );
    assert!(
        dom.contains("SDS sds3 is down"),
        "headline and events: {dom}"
    );
    assert!(dom.contains("PGs left"), "rebuild progress: {dom}");
    assert!(dom.contains("cannot survive losing"), "resilience: {dom}");
    assert!(dom.contains("volume vol1"), "I/O plots: {dom}");
    let shot = artifacts().join("dashboard-degraded.png");
    chromium(
        &net,
        &dc.c.dir.path,
        &dashboard_link(&api, &token),
        Some(&shot),
    );
    let png = std::fs::read(&shot).expect("screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
    // A used link does not work twice; without a session the dashboard asks for a login.
    let link = dashboard_link(&api, &token);
    let path = link
        .split_once("/login")
        .map(|(_, p)| format!("/login{p}"))
        .expect("path");
    assert_eq!(api.call("GET", &path, None, None).status, 303);
    assert_eq!(api.call("GET", &path, None, None).status, 401);
    let anon = api.call("GET", "/", None, None);
    assert_eq!(anon.status, 303);
    assert_eq!(anon.header("location").as_deref(), Some("/login"));

    // The rebuild ends; its event carries the duration.
    dc.set_rebuild_policy(&["--concurrency", "4", "--bandwidth_mib_s", "0"]);
    wait_pool(&dc, "Normal");
    let finished = wait_for("the rebuild's event", Duration::from_secs(120), || {
        let events = api.get("/api/v1/events", &token).json();
        events.as_array()?.iter().find_map(|e| {
            let m = e["message"].as_str()?;
            (m.contains("rebuild finished in")).then(|| m.to_string())
        })
    });
    let dom = chromium(&net, &dc.c.dir.path, &dashboard_link(&api, &token), None);
    assert!(dom.contains("rebuild finished in"), "{dom}");
    summary(&format!(
        "REST/dashboard: {} history points of vol1 (first write rate {} IOPS); mid-rebuild the API and scli agree on {}; {finished}",
        points.len(),
        points
            .iter()
            .find_map(|p| p["write_iops"].as_f64().filter(|v| *v > 0.0))
            .unwrap_or(0.0),
        pool_core(&rest_pool)
    ));
}

#[test]
fn any_mdm_but_the_leader_redirects_to_the_leaders_api() {
    let c = Cluster::start("rest-redirect", 3, &[]);
    let leader = c.wait_leader(Duration::from_secs(120));
    let follower = (0..3).find(|i| *i != leader).expect("a follower");
    let f = Api::new(&c, c.mdms[follower].api);
    let a = f.call("GET", "/api/v1/cluster?x=1", None, None);
    assert_eq!(a.status, 307, "{}", a.body);
    let want = format!("https://{}/api/v1/cluster?x=1", c.mdms[leader].api);
    assert_eq!(a.header("location").as_deref(), Some(want.as_str()));
    // The dashboard too.
    let d = f.call("GET", "/", None, None);
    assert_eq!(d.status, 307);
    let want = format!("https://{}/", c.mdms[leader].api);
    assert_eq!(d.header("location").as_deref(), Some(want.as_str()));
    let l = Api::new(&c, c.mdms[leader].api);
    let token = l.login("admin", ADMIN_PASSWORD);
    let cluster = l.get("/api/v1/cluster", &token).json();
    assert_eq!(cluster["total"], 3, "{cluster}");
    assert_eq!(cluster["leader"]["name"], c.mdms[leader].name.as_str());
}

#[test]
fn bad_input_gets_a_json_error_and_changes_nothing() {
    let c = Cluster::start("rest-bad", 1, &[]);
    let api = leader_api(&c);
    for a in [
        api.call("GET", "/api/v1/volumes", None, None),
        api.call("POST", "/api/v1/volumes", None, Some(b"{}")),
    ] {
        a.error(401, "Unauthenticated");
        assert!(a.header("www-authenticate").is_some());
    }
    api.get("/api/v1/volumes", "garbage")
        .error(401, "Unauthenticated");
    let token = api.login("admin", ADMIN_PASSWORD);
    let forged = format!("{}00", token);
    api.get("/api/v1/volumes", &forged)
        .error(401, "Unauthenticated");
    api.call(
        "POST",
        "/api/v1/login",
        None,
        Some(
            json!({"username": "admin", "password": "wrong-one"})
                .to_string()
                .as_bytes(),
        ),
    )
    .error(401, "Unauthenticated");

    c.must_scli(&["--add_protection_domain", "--protection_domain_name", "pd1"]);
    c.must_scli(&[
        "--add_storage_pool",
        "--protection_domain_name",
        "pd1",
        "--storage_pool_name",
        "sp1",
    ]);
    let pw = c.password_file("monitor-pw");
    c.must_scli(&[
        "--add_user",
        "--username",
        "watcher",
        "--user_role",
        "Monitor",
        "--password_file",
        &pw.display().to_string(),
    ]);
    let before = c.query_all();
    let monitor = api.login("watcher", "monitor-pw");
    let new_volume = json!({"name": "v1", "storage_pool": "sp1", "size_bytes": 8u64 << 30});
    let m = api
        .send("POST", "/api/v1/volumes", &monitor, &new_volume)
        .error(403, "PermissionDenied");
    assert!(m.contains("Monitor"), "{m}");
    api.send(
        "PUT",
        "/api/v1/storage-pools/sp1/rebuild-policy",
        &monitor,
        &json!({"concurrency": 2}),
    )
    .error(403, "PermissionDenied");
    api.call("DELETE", "/api/v1/volumes/v1", Some(&monitor), None)
        .error(403, "PermissionDenied");
    // A Monitor reads; the dashboard's cookie does not carry changes.
    assert_eq!(api.get("/api/v1/storage-pools/sp1", &monitor).status, 200);

    for (body, what) in [
        (&b"{\"name\": \"v1\", "[..], "malformed"),
        (&b"[1, 2]"[..], "an array"),
        (&b"not json"[..], "text"),
        (&b""[..], "empty"),
    ] {
        let msg = api
            .call("POST", "/api/v1/volumes", Some(&token), Some(body))
            .error(400, "BadRequest");
        assert!(msg.contains("malformed JSON"), "{what}: {msg}");
    }
    let msg = api
        .send(
            "POST",
            "/api/v1/volumes",
            &token,
            &json!({"name": "v1", "storage_pool": "sp1", "size_bytes": 8u64 << 30, "size_gb": 8}),
        )
        .error(400, "BadRequest");
    assert!(msg.contains("size_gb"), "names the unknown field: {msg}");
    api.send(
        "POST",
        "/api/v1/volumes",
        &token,
        &json!({"name": "v1", "storage_pool": "sp1", "size_bytes": "big"}),
    )
    .error(400, "BadRequest");
    let huge = vec![b' '; 1 << 20];
    api.call_with("POST", "/api/v1/volumes", Some(&token), Some(&huge), true)
        .error(413, "PayloadTooLarge");
    api.call_with("POST", "/api/v1/volumes", Some(&token), Some(&huge), false)
        .error(413, "PayloadTooLarge");
    api.send(
        "POST",
        "/api/v1/volumes",
        &token,
        &json!({"name": "bad name!", "storage_pool": "sp1", "size_bytes": 8u64 << 30}),
    )
    .error(400, "BadRequest");
    api.send(
        "POST",
        "/api/v1/volumes",
        &token,
        &json!({"name": "v1", "storage_pool": "nope", "size_bytes": 8u64 << 30}),
    )
    .error(404, "NotFound");
    api.send(
        "POST",
        "/api/v1/volumes/v1/map",
        &token,
        &json!({"sdc_name": "a", "sdc_ip": "1.2.3.4"}),
    )
    .error(400, "BadRequest");
    api.call(
        "DELETE",
        "/api/v1/volumes/v1?remove_mode=everything",
        Some(&token),
        None,
    )
    .error(400, "BadRequest");
    api.call("GET", "/api/v1/events?since=yesterday", Some(&token), None)
        .error(400, "BadRequest");
    api.call("GET", "/api/v1/history?volume=a&sds=b", Some(&token), None)
        .error(400, "BadRequest");
    api.get("/api/v1/nothing-here", &token)
        .error(404, "NotFound");
    api.call("DELETE", "/api/v1/cluster", Some(&token), None)
        .error(405, "MethodNotAllowed");
    api.get("/api/v1/volumes/none", &token)
        .error(404, "NotFound");

    // Plain HTTP on the HTTPS port: no answer, and the server carries on.
    let plain = http_get(c.mdms[0].api, "/api/v1/cluster").unwrap_or_default();
    assert!(!plain.contains("\"cluster\""), "{plain}");
    assert_eq!(
        c.query_all()["state"]["volumes"],
        before["state"]["volumes"],
        "nothing changed"
    );
    assert_eq!(
        c.query_all()["state"]["version"],
        before["state"]["version"],
        "no command applied"
    );

    // A valid change still works; a short session expires.
    let created = api.send("POST", "/api/v1/volumes", &token, &new_volume);
    assert_eq!(created.status, 201, "{}", created.body);
    assert!(created.json()["id"].as_str().is_some());
    let a = api.call(
        "POST",
        "/api/v1/login",
        None,
        Some(
            json!({"username": "admin", "password": ADMIN_PASSWORD, "ttl_secs": 2})
                .to_string()
                .as_bytes(),
        ),
    );
    let short = a.json()["token"].as_str().expect("token").to_string();
    let expired = wait_for("the session to expire", Duration::from_secs(120), || {
        let a = api.get("/api/v1/cluster", &short);
        (a.status == 401).then_some(a)
    });
    let msg = expired.error(401, "Unauthenticated");
    assert!(msg.contains("expired"), "{msg}");
}

/// Fill in a path's `{name}` with an object the cluster has.
fn concrete(path: &str) -> String {
    let name = if path.starts_with("/api/v1/protection-domains/") {
        "pd1"
    } else if path.starts_with("/api/v1/storage-pools/") {
        "sp1"
    } else if path.starts_with("/api/v1/sds/") {
        "sds1"
    } else if path.starts_with("/api/v1/sdcs/") {
        "sdc1"
    } else {
        "docvol"
    };
    path.replace("{name}", name)
}

/// A valid body for each operation that takes one.
fn sample_body(method: &str, path: &str) -> Option<Value> {
    Some(match (method, path) {
        ("post", "/api/v1/login") => json!({"username": "admin", "password": ADMIN_PASSWORD}),
        ("post", "/api/v1/volumes") => {
            json!({"name": "docvol", "storage_pool": "sp1", "size_bytes": 8u64 << 30})
        }
        ("put", p) if p.ends_with("/rebuild-policy") => json!({"concurrency": 4}),
        ("post", p) if p.ends_with("/rename") => json!({"new_name": "docvol2"}),
        ("post", p) if p.ends_with("/resize") => json!({"size_bytes": 16u64 << 30}),
        ("post", p) if p.ends_with("/map") => json!({"sdc_name": "sdc1", "allow_multi_map": true}),
        ("post", p) if p.ends_with("/unmap") => json!({"sdc_name": "sdc1"}),
        ("post", p) if p.ends_with("/limits") => {
            json!({"sdc_name": "sdc1", "iops_limit": 1000})
        }
        ("post", "/api/v1/snapshots") => json!({"volumes": ["docvol"]}),
        _ => return None,
    })
}

/// `value` has the `required` properties of `schema` (following `$ref`s and array items).
fn check_schema(doc: &Value, schema: &Value, value: &Value, at: &str) {
    let schema = match schema["$ref"].as_str() {
        Some(r) => doc
            .pointer(r.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("{at}: dangling {r}")),
        None => schema,
    };
    if schema["type"] == "array" {
        let items = value
            .as_array()
            .unwrap_or_else(|| panic!("{at}: not an array: {value}"));
        for v in items {
            check_schema(doc, &schema["items"], v, at);
        }
        return;
    }
    if let Some(req) = schema["required"].as_array() {
        for k in req.iter().filter_map(Value::as_str) {
            assert!(value.get(k).is_some(), "{at}: no {k} in {value}");
        }
    }
}

#[test]
fn the_openapi_document_is_what_the_server_serves_and_does() {
    let dc = DataCluster::start("rest-openapi", 3, 1);
    let api = leader_api(&dc.c);
    let token = api.login("admin", ADMIN_PASSWORD);
    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/api/openapi.json"),
        )
        .expect("docs/api/openapi.json"),
    )
    .expect("the document is JSON");
    let served = api.call("GET", "/api/v1/openapi.json", None, None);
    assert_eq!(served.status, 200);
    assert_eq!(
        served.json(),
        file,
        "the server serves docs/api/openapi.json"
    );

    // Every operation, in an order that keeps its objects around: reads, then creation, the
    // changes, and removal last.
    let mut ops: Vec<(String, String, Value)> = Vec::new();
    for (path, item) in file["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("operations") {
            ops.push((method.clone(), path.clone(), op.clone()));
        }
    }
    let rank = |m: &str, p: &str| match (m, p) {
        ("get", _) => 0,
        ("post", "/api/v1/volumes") => 1,
        (_, p) if p.ends_with("/map") => 2,
        (_, p) if p.ends_with("/unmap") => 4,
        (_, p) if p.ends_with("/rename") => 5,
        ("delete", _) => 6,
        _ => 3,
    };
    ops.sort_by_key(|(m, p, _)| (rank(m, p), p.clone()));
    let mut checked = 0;
    for (method, path, op) in &ops {
        let mut p = concrete(path);
        if method == "get" {
            // Reads come first: they find the cluster's own volume.
            p = p.replace("docvol", "vol1");
        }
        if rank(method, path) == 6 {
            p = p.replace("docvol", "docvol2");
        }
        if path == "/api/v1/history" {
            p.push_str("?storage_pool=sp1");
        }
        let body = sample_body(method, path);
        let a = api.call(
            &method.to_uppercase(),
            &p,
            Some(&token),
            body.as_ref().map(|b| b.to_string().into_bytes()).as_deref(),
        );
        let documented = &op["responses"][a.status.to_string()];
        assert!(
            !documented.is_null(),
            "{method} {p} answered {}, not documented: {}",
            a.status,
            a.body
        );
        assert!(
            a.status < 300,
            "{method} {p} with a valid request failed: {} {}",
            a.status,
            a.body
        );
        if let Some(schema) = documented.pointer("/content/application~1json/schema") {
            check_schema(&file, schema, &a.json(), &format!("{method} {p}"));
        }
        // A method the document does not list on the path is refused.
        for other in ["get", "post", "put", "delete"] {
            if file["paths"][path.as_str()][other].is_null() {
                let r = api.call(&other.to_uppercase(), &p, Some(&token), None);
                assert_eq!(r.status, 405, "{other} {p}: {}", r.body);
            }
        }
        checked += 1;
    }
    summary(&format!(
        "OpenAPI: {checked} operations checked against the server"
    ));
}
