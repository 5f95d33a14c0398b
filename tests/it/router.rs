//! `shardlite router` as a real process in front of stub pods: small in-test HTTP servers on
//! 127.0.0.10, 127.0.0.11, 127.0.0.12 (all loopback on Linux) sharing one port, so
//! `cluster.peer_url_template = "http://127.0.0.1{ordinal}:PORT"` names them. Each stub echoes
//! which pod it is and what it received, and counts its requests, so a test sees exactly where
//! every request went.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use shardlite::ownership::Topology;

use crate::harness::{command, wait_for};

const SHARDS: u32 = 8;
const PARTITIONS: u32 = 64;
const PODS: u32 = 3;

/// What a stub pod answers.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// 200 (or the status in `x-stub-status`) with the echo.
    Echo,
    /// 503 for the next N requests (`u32::MAX`: always), then `Echo`.
    Unavailable(u32),
    /// 421: the pod computes another owner.
    Misdirected,
}

struct StubState {
    pod: u32,
    hits: AtomicU32,
    mode: Mutex<Mode>,
}

/// One stub pod: its state outlives stops and restarts on the same address.
struct StubPod {
    state: Arc<StubState>,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

fn stub_ip(pod: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + pod as u8))
}

async fn stub_handler(State(stub): State<Arc<StubState>>, request: Request) -> Response {
    stub.hits.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = request.into_parts();
    let body: Bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    // Connection: close, so a stopped stub is really gone: no pooled connection outlives it.
    let close = [(header::CONNECTION, "close")];
    let mode = {
        let mut mode = stub.mode.lock().unwrap();
        let now = *mode;
        if let Mode::Unavailable(n) = now
            && n != u32::MAX
        {
            *mode = if n <= 1 {
                Mode::Echo
            } else {
                Mode::Unavailable(n - 1)
            };
        }
        now
    };
    match mode {
        Mode::Unavailable(_) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                close,
                [("x-stub-pod", stub.pod.to_string())],
                axum::Json(json!({"error": {"code": "stub_unavailable", "message": "starting"}})),
            )
                .into_response();
        }
        Mode::Misdirected => {
            return (
                StatusCode::MISDIRECTED_REQUEST,
                close,
                axum::Json(json!({"error": {"code": "not_owner", "pod": stub.pod}})),
            )
                .into_response();
        }
        Mode::Echo => {}
    }
    if parts.uri.path() == "/v1/ownership"
        && header("authorization").as_deref() == Some("Bearer bad")
    {
        return (StatusCode::UNAUTHORIZED, close, "no").into_response();
    }
    let status = header("x-stub-status")
        .map(|s| StatusCode::from_u16(s.parse().unwrap()).unwrap())
        .unwrap_or(StatusCode::OK);
    (
        status,
        close,
        [("x-stub-pod", stub.pod.to_string())],
        axum::Json(json!({
            "pod": stub.pod,
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "request_id": header("x-request-id"),
            "authorization": header("authorization"),
            "body": String::from_utf8_lossy(&body),
        })),
    )
        .into_response()
}

impl StubPod {
    async fn bind(pod: u32, port: u16, state: Arc<StubState>) -> std::io::Result<StubPod> {
        let listener = tokio::net::TcpListener::bind((stub_ip(pod), port)).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = Router::new()
            .fallback(stub_handler)
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    // A dropped sender stops the stub too.
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Ok(StubPod {
            state,
            addr,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Stops serving and waits until the socket and every connection are closed.
    async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // The receiver lives until the server stops; an error means it already stopped.
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }

    /// Serves again on the same address, with the same state.
    async fn restart(&mut self) {
        self.stop().await;
        let again = StubPod::bind(self.state.pod, self.addr.port(), self.state.clone())
            .await
            .expect("rebind the stub pod on its port");
        *self = again;
    }

    fn hits(&self) -> u32 {
        self.state.hits.load(Ordering::SeqCst)
    }

    fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }
}

/// `PODS` stub pods on 127.0.0.10+k, one port for all (a free port of 127.0.0.10, tried on the
/// others; a new one if some address has it taken).
async fn start_stubs() -> (Vec<StubPod>, u16) {
    'port: for _ in 0..50 {
        let first_state = Arc::new(StubState {
            pod: 0,
            hits: AtomicU32::new(0),
            mode: Mutex::new(Mode::Echo),
        });
        let first = StubPod::bind(0, 0, first_state).await.unwrap();
        let port = first.addr.port();
        let mut pods = vec![first];
        for pod in 1..PODS {
            let state = Arc::new(StubState {
                pod,
                hits: AtomicU32::new(0),
                mode: Mutex::new(Mode::Echo),
            });
            match StubPod::bind(pod, port, state).await {
                Ok(stub) => pods.push(stub),
                Err(_) => continue 'port,
            }
        }
        return (pods, port);
    }
    panic!("no port free on 127.0.0.10..=12");
}

fn config_text(pods: u32, port: u16) -> String {
    format!(
        "[discord]\nshards = {SHARDS}\n[cluster]\npods = {pods}\npartitions = {PARTITIONS}\n\
         peer_url_template = \"http://127.0.0.1{{ordinal}}:{port}\"\n\
         [http]\nlisten = \"127.0.0.1:0\"\n"
    )
}

/// A running `shardlite router` (or `run` in router mode); killed on drop.
struct RouterProcess {
    child: Option<Child>,
    dir: tempfile::TempDir,
    config: PathBuf,
    base: String,
}

impl RouterProcess {
    /// Writes the config for `pods` stub pods on `port` and starts `shardlite ARGS --config …`.
    async fn start(pods: u32, port: u16) -> RouterProcess {
        Self::start_with(&["router"], &[], pods, port).await
    }

    async fn start_with(
        args: &[&str],
        env: &[(&str, &str)],
        pods: u32,
        port: u16,
    ) -> RouterProcess {
        Self::start_config(args, env, &config_text(pods, port)).await
    }

    /// Starts `shardlite ARGS --config …` with `text` as the config file.
    async fn start_config(args: &[&str], env: &[(&str, &str)], text: &str) -> RouterProcess {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("router.toml");
        std::fs::write(&config, text).unwrap();
        let ready = dir.path().join("ready.json");
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let child = command()
            .args(args)
            .arg("--config")
            .arg(&config)
            .arg("--ready-file")
            .arg(&ready)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn shardlite router");
        let mut router = RouterProcess {
            child: Some(child),
            dir,
            config,
            base: String::new(),
        };
        let info: Value = wait_for(
            "the router's ready file",
            Duration::from_secs(30),
            async || {
                if let Some(status) = router.child.as_mut().unwrap().try_wait().unwrap() {
                    panic!(
                        "the router exited early with {status}:\n{}",
                        router.stderr()
                    );
                }
                serde_json::from_str(&std::fs::read_to_string(&ready).ok()?).ok()
            },
        )
        .await;
        router.base = format!("http://{}", info["http"].as_str().unwrap());
        router
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    fn config_path(&self) -> &Path {
        &self.config
    }

    /// SIGTERM, then the exit status within 10 s.
    async fn stop(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let pid = child.id().to_string();
        assert!(
            command_kill(&pid).success(),
            "kill -TERM {pid}: {}",
            self.stderr()
        );
        wait_for("the router to exit", Duration::from_secs(10), async || {
            child.try_wait().unwrap()
        })
        .await
    }
}

fn command_kill(pid: &str) -> std::process::ExitStatus {
    std::process::Command::new("kill")
        .args(["-TERM", pid])
        .status()
        .unwrap()
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Best effort: the test is finished or already failing.
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- router stderr ---\n{}", self.stderr());
        }
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// A guild owned by each pod under `pods` pods: `guilds[k]` is owned by pod k.
fn guild_per_pod(pods: u32) -> Vec<u64> {
    let topology = Topology::new(SHARDS, PARTITIONS, pods).unwrap();
    (0..pods)
        .map(|pod| {
            (0..u64::from(PARTITIONS) * 4)
                // A snowflake-like id: the key in the high bits, noise in the low 22.
                .map(|key| (key + 1_000_000) << 22 | 0x2a_b1c)
                .find(|&g| topology.pod_of_guild(g) == pod)
                .expect("every pod owns some guild")
        })
        .collect()
}

fn hits(stubs: &[StubPod]) -> Vec<u32> {
    stubs.iter().map(StubPod::hits).collect()
}

async fn json(response: reqwest::Response) -> (StatusCode, HeaderMap, Value) {
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status} {text:?}: {e}"));
    (status, headers, value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_forwards_each_guild_to_its_owner_only() {
    let (stubs, port) = start_stubs().await;
    let router = RouterProcess::start(PODS, port).await;
    let http = client();
    let topology = Topology::new(SHARDS, PARTITIONS, PODS).unwrap();
    // Guilds spread over the key space, and one per pod for certain.
    let mut guilds = guild_per_pod(PODS);
    guilds.extend((0..30u64).map(|i| (i * 7919 + 123) << 22 | i));
    for guild in guilds {
        let owner = topology.pod_of_guild(guild) as usize;
        let before = hits(&stubs);
        let (status, headers, body) = json(
            http.get(router.url(&format!("/v1/guilds/{guild}/messages?limit=5&before=99")))
                .header("authorization", "Bearer t0k")
                .header("x-request-id", format!("req-{guild}"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["pod"], owner, "guild {guild}: {body}");
        assert_eq!(body["path"], format!("/v1/guilds/{guild}/messages"));
        assert_eq!(body["query"], "limit=5&before=99");
        assert_eq!(body["authorization"], "Bearer t0k");
        assert_eq!(body["request_id"], format!("req-{guild}"));
        assert_eq!(headers["x-request-id"], format!("req-{guild}").as_str());
        assert_eq!(headers["x-stub-pod"], owner.to_string().as_str());
        let mut expected = before.clone();
        expected[owner] += 1;
        assert_eq!(
            hits(&stubs),
            expected,
            "guild {guild} reached its owner only"
        );
    }

    // No X-Request-Id: the router creates one, sends it to the pod and returns it. A body and
    // the pod's status pass through, with the path without a tail.
    let guild = guild_per_pod(PODS)[2];
    let response = http
        .post(router.url(&format!("/v1/guilds/{guild}")))
        .header("x-stub-status", "201")
        .body("{\"name\":\"x\"}")
        .send()
        .await
        .unwrap();
    let (status, headers, body) = json(response).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body["pod"], 2);
    assert_eq!(body["method"], "POST");
    assert_eq!(body["body"], "{\"name\":\"x\"}");
    let id = headers["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 32, "{id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    assert_eq!(body["request_id"], id);
    // A pod's 404 is the pod's answer, passed on.
    let response = http
        .delete(router.url(&format!("/v1/guilds/{guild}/jobs/7")))
        .header("x-stub-status", "404")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(json(response).await.2["method"], "DELETE");

    let metrics = http
        .get(router.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("shardlite_router_requests_total{status=\"200\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("shardlite_router_upstream_seconds_bucket{pod=\"2\""),
        "{metrics}"
    );
    let health = http.get(router.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(health.text().await.unwrap(), "ok");
    let ready = http.get(router.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    assert!(router.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_answers_503_for_a_stopped_owner_and_never_asks_another_pod() {
    let (mut stubs, port) = start_stubs().await;
    let router = RouterProcess::start(PODS, port).await;
    let http = client();
    let guilds = guild_per_pod(PODS);
    stubs[1].stop().await;
    let before = hits(&stubs);
    let started = Instant::now();
    let (status, headers, body) = json(
        http.get(router.url(&format!("/v1/guilds/{}/stats", guilds[1])))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(headers[header::RETRY_AFTER], "1");
    assert_eq!(body["error"]["code"], "owner_unavailable");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!("pod 1 (http://127.0.0.11:{port})")),
        "{message}"
    );
    // The retry bound is 2 s; a loaded machine gets a second more.
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(hits(&stubs), before, "no other pod was asked");

    stubs[1].restart().await;
    let (status, _, body) = json(
        http.get(router.url(&format!("/v1/guilds/{}/stats", guilds[1])))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["pod"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_retries_an_owners_503_then_passes_it_on() {
    let (stubs, port) = start_stubs().await;
    let router = RouterProcess::start(PODS, port).await;
    let http = client();
    let guild = guild_per_pod(PODS)[0];
    let url = router.url(&format!("/v1/guilds/{guild}"));

    // One 503, then the pod is back: the client sees the 200.
    stubs[0].set_mode(Mode::Unavailable(1));
    let (status, _, body) = json(http.get(&url).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(hits(&stubs), vec![2, 0, 0]);

    // Always 503: three attempts, then the pod's own 503 as it sent it.
    stubs[0].set_mode(Mode::Unavailable(u32::MAX));
    let (status, headers, body) = json(http.get(&url).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"]["code"], "stub_unavailable");
    assert_eq!(headers["x-stub-pod"], "0");
    assert_eq!(hits(&stubs), vec![5, 0, 0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_rejects_malformed_guild_ids_with_400() {
    let (stubs, port) = start_stubs().await;
    let router = RouterProcess::start(PODS, port).await;
    let http = client();
    for (path, raw) in [
        ("/v1/guilds/abc", "abc"),
        ("/v1/guilds/-1/messages", "-1"),
        ("/v1/guilds/18446744073709551616", "18446744073709551616"),
        ("/v1/guilds/", ""),
        ("/v1/guilds", ""),
        ("/v1/guilds//messages", ""),
        ("/v1/guilds/12%33", "12%33"),
    ] {
        let (status, _, body) = json(http.get(router.url(path)).send().await.unwrap()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(body["error"]["code"], "bad_guild_id", "{path}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("guild_id {raw:?}: ")),
            "{path}: {message}"
        );
    }
    let (status, _, body) = json(http.get(router.url("/v2/nothing")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "not_found");
    let (status, _, body) = json(http.post(router.url("/healthz")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(body["error"]["code"], "method_not_allowed");
    assert_eq!(hits(&stubs), vec![0, 0, 0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_ownership_shows_every_pod_and_a_down_one_as_data() {
    let (mut stubs, port) = start_stubs().await;
    let router = RouterProcess::start(PODS, port).await;
    let http = client();
    stubs[2].stop().await;
    let (status, _, body) = json(
        http.get(router.url("/v1/ownership"))
            .header("authorization", "Bearer good")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let pods = body["pods"].as_array().unwrap();
    assert_eq!(pods.len(), 3, "{body}");
    for (k, pod) in pods.iter().enumerate().take(2) {
        assert_eq!(pod["ordinal"], k);
        assert_eq!(pod["up"], true, "{pod}");
        assert_eq!(pod["status"], 200);
        assert_eq!(pod["url"], format!("http://127.0.0.1{k}:{port}"));
        assert_eq!(pod["ownership"]["pod"], k);
        assert_eq!(pod["ownership"]["path"], "/v1/ownership");
        assert_eq!(pod["ownership"]["authorization"], "Bearer good");
    }
    assert_eq!(pods[2]["up"], false, "{body}");
    assert!(pods[2]["error"].as_str().is_some_and(|e| !e.is_empty()));

    // Every pod that answers refuses the credentials: 401, but one down pod is not a refusal.
    stubs[2].restart().await;
    let response = http
        .get(router.url("/v1/ownership"))
        .header("authorization", "Bearer bad")
        .send()
        .await
        .unwrap();
    let (status, _, body) = json(response).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_421_rereads_the_config_and_retries_once() {
    let (stubs, port) = start_stubs().await;
    let router = RouterProcess::start(PODS, port).await;
    let http = client();
    // A guild whose owner differs between 3 pods and 2: the pods moved on to 2, the router's
    // file is rewritten, and the old owner answers 421.
    let three = Topology::new(SHARDS, PARTITIONS, 3).unwrap();
    let two = Topology::new(SHARDS, PARTITIONS, 2).unwrap();
    let guild = (0..u64::from(PARTITIONS))
        .map(|key| key << 22)
        .find(|&g| three.pod_of_guild(g) != two.pod_of_guild(g))
        .expect("some guild moves from 3 pods to 2");
    let (old, new) = (
        three.pod_of_guild(guild) as usize,
        two.pod_of_guild(guild) as usize,
    );
    stubs[old].set_mode(Mode::Misdirected);
    std::fs::write(router.config_path(), config_text(2, port)).unwrap();
    let (status, _, body) = json(
        http.get(router.url(&format!("/v1/guilds/{guild}/state")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["pod"], new);
    let mut expected = vec![0, 0, 0];
    expected[old] = 1;
    expected[new] = 1;
    assert_eq!(hits(&stubs), expected);

    // The new owner also answers 421 (the config agrees now, the pod does not): one retry after
    // reading the config again, then the 421 as the pod sent it.
    stubs[new].set_mode(Mode::Misdirected);
    let (status, _, body) = json(
        http.get(router.url(&format!("/v1/guilds/{guild}/state")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
    assert_eq!(body["error"]["code"], "not_owner");
    expected[new] += 2;
    assert_eq!(hits(&stubs), expected);
    assert!(router.stderr().contains("421"), "the drift is logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_mode_of_run_needs_no_token_and_bad_modes_exit_2() {
    let (_stubs, port) = start_stubs().await;
    // `run` with SERVICE_MODE=router: no DISCORD_TOKEN, no replication for 3 pods.
    let router =
        RouterProcess::start_with(&["run"], &[("SERVICE_MODE", "router")], PODS, port).await;
    let ready = client().get(router.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    assert_eq!(ready.json::<Value>().await.unwrap()["mode"], "router");
    assert!(router.stop().await.success());

    let out = command()
        .args(["run"])
        .env("SERVICE_MODE", "proxy")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("SERVICE_MODE") && stderr.contains("proxy"),
        "{stderr}"
    );
}

/// A port free on 127.0.0.10, .11 and .12 at once (checked by binding all three, then released).
fn port_free_on_three_loopback_addresses() -> u16 {
    for _ in 0..50 {
        let first = std::net::TcpListener::bind((stub_ip(0), 0)).unwrap();
        let port = first.local_addr().unwrap().port();
        let others: Vec<_> = (1..PODS)
            .map(|pod| std::net::TcpListener::bind((stub_ip(pod), port)))
            .collect();
        if others.iter().all(Result::is_ok) {
            return port;
        }
    }
    panic!("no port free on 127.0.0.10..=12");
}

/// The whole path, for real: 3 gateway pods (each with its Litestream child, leases in the local
/// S3 server) behind 2 routers, and the simulator. Every guild, asked through either router,
/// reaches its owner and answers what the simulator sent (channels, roles, messages); a stopped
/// owner gives 503 `owner_unavailable` within the retry bound while the other pods' guilds still
/// answer, and its guilds answer again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_in_front_of_three_real_pods_reach_every_guilds_owner() {
    use crate::harness::{API_TOKEN, NodeProcess, NodeSpec};
    use shardlite::simulator::{SimConfig, Simulator};

    const SHARDS: u32 = 4;
    const PARTITIONS: u32 = 8;
    let bucket = crate::s3::bucket("routers").await;
    let sim = Simulator::start(SimConfig {
        guilds: 60,
        shards: SHARDS,
        messages: 4_000,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let port = port_free_on_three_loopback_addresses();
    let template = format!("http://127.0.0.1{{ordinal}}:{port}");
    let spec = |ordinal: u32| NodeSpec {
        shards: SHARDS,
        partitions: PARTITIONS,
        cluster_toml: format!(
            "pods = {PODS}\nordinal = {ordinal}\npeer_url_template = \"{template}\"\n"
        ),
        extra_toml: crate::s3::replication_toml(&bucket, crate::s3::endpoint(), 60),
        http_listen: Some(format!("{}:{port}", stub_ip(ordinal))),
        ..NodeSpec::default()
    };
    let dirs: Vec<_> = (0..PODS).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut pods = Vec::new();
    for (ordinal, dir) in (0..PODS).zip(&dirs) {
        pods.push(NodeProcess::start(dir.path(), &sim, &spec(ordinal)).await);
    }
    sim.wait_all_sent(Duration::from_secs(120)).await.unwrap();
    let topology = Topology::new(SHARDS, PARTITIONS, PODS).unwrap();
    for (ordinal, pod) in (0..PODS).zip(&pods) {
        pod.wait_caught_up_on(
            &sim,
            &topology.shards_of_pod(ordinal),
            Duration::from_secs(60),
        )
        .await;
    }
    let router_config = format!(
        "[discord]\nshards = {SHARDS}\n[cluster]\npods = {PODS}\npartitions = {PARTITIONS}\n\
         peer_url_template = \"{template}\"\n[http]\nlisten = \"127.0.0.1:0\"\n"
    );
    let routers = [
        RouterProcess::start_config(&["router"], &[], &router_config).await,
        RouterProcess::start_config(&["router"], &[], &router_config).await,
    ];
    let client = client();
    let get = |router: &RouterProcess, path: String| {
        client.get(router.url(&path)).bearer_auth(API_TOKEN).send()
    };

    let expected = sim.expected();
    for (i, (&guild, want)) in expected.guilds.iter().enumerate() {
        let router = &routers[i % 2];
        let (status, _, body) =
            json(get(router, format!("/v1/guilds/{guild}")).await.unwrap()).await;
        assert_eq!(status, StatusCode::OK, "guild {guild}: {body}");
        assert_eq!(body["id"], guild.to_string());
        assert_eq!(
            body["channels"].as_array().unwrap().len() as u32,
            want.channels,
            "{body}"
        );
        assert_eq!(
            body["roles"].as_array().unwrap().len() as u32,
            want.roles,
            "{body}"
        );
        let (status, _, stats) = json(
            get(router, format!("/v1/guilds/{guild}/stats?group_by=channel"))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{stats}");
        assert_eq!(
            stats["total"].as_u64().unwrap() as u32,
            want.messages_created,
            "{stats}"
        );
    }
    let (_, _, ownership) = json(get(&routers[0], "/v1/ownership".into()).await.unwrap()).await;
    let up: Vec<bool> = ownership["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["up"].as_bool().unwrap())
        .collect();
    assert_eq!(up, [true, true, true], "{ownership}");

    // Pod 1 stops: its guilds get 503 within the retry bound, never another pod's 200.
    let of_pod = |pod: u32| {
        *expected
            .guilds
            .keys()
            .find(|&&g| topology.pod_of_guild(g) == pod)
            .unwrap()
    };
    let stopped = pods.remove(1);
    assert!(stopped.stop().await.success());
    let started = Instant::now();
    let (status, headers, body) = json(
        get(&routers[1], format!("/v1/guilds/{}", of_pod(1)))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "owner_unavailable", "{body}");
    assert!(headers.contains_key(header::RETRY_AFTER));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let (status, _, body) = json(
        get(&routers[1], format!("/v1/guilds/{}", of_pod(0)))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Back (same ordinal, same volume): its guilds answer again.
    pods.insert(1, NodeProcess::start(dirs[1].path(), &sim, &spec(1)).await);
    let (status, _, body) = json(
        get(&routers[0], format!("/v1/guilds/{}", of_pod(1)))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for pod in pods {
        assert!(pod.stop().await.success());
    }
}
