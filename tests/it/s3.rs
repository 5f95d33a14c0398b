//! The real external pieces of replication tests: Litestream and a local S3 server (moto), both
//! installed into `.tools/` by `scripts/install-tools`. Missing tools fail the test with the
//! command that installs them; they never skip.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The project-local tool directory.
fn tools() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/bin")
}

/// Path of the Litestream binary, or a panic naming the install command.
pub fn litestream() -> PathBuf {
    let bin = tools().join("litestream");
    assert!(
        bin.exists(),
        "{} is missing: run scripts/install-tools (scripts/test does)",
        bin.display()
    );
    bin
}

/// Base URL of the shared local S3 server, started on first use and stopped when the test process
/// exits (its parent-death signal is bound to a thread that lives as long as the process).
pub fn endpoint() -> &'static str {
    static ENDPOINT: OnceLock<String> = OnceLock::new();
    ENDPOINT.get_or_init(|| {
        let moto = tools().join("moto_server");
        assert!(
            moto.exists(),
            "{} is missing: run scripts/install-tools (scripts/test does)",
            moto.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::os::unix::process::CommandExt as _;
            let mut cmd = std::process::Command::new(moto);
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            // SAFETY: prctl in the forked child before exec; no memory of the parent is touched.
            #[allow(unsafe_code)]
            unsafe {
                cmd.pre_exec(|| {
                    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                        .map_err(std::io::Error::from)
                });
            }
            let child = cmd.spawn().expect("start moto_server");
            tx.send(()).unwrap();
            // This thread is the child's parent for the death signal: it must outlive every test.
            let _keep = child;
            loop {
                std::thread::park();
            }
        });
        rx.recv().unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen on {port} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        url
    })
}

/// Creates a fresh bucket (moto accepts unsigned requests) and returns its name.
pub async fn bucket(name: &str) -> String {
    let bucket = format!("{name}-{}", std::process::id());
    let resp = reqwest::Client::new()
        .put(format!("{}/{bucket}", endpoint()))
        .send()
        .await
        .unwrap();
    assert!(
        resp.status().is_success(),
        "create bucket {bucket}: {}",
        resp.status()
    );
    bucket
}

/// The `[replication]` section for a child-mode node on `bucket`.
pub fn replication_toml(bucket: &str, endpoint: &str, restore_timeout_secs: u64) -> String {
    format!(
        "[replication]\nmode = \"child\"\nendpoint = \"{endpoint}\"\nbucket = \"{bucket}\"\n\
         prefix = \"test\"\nsync_interval_ms = 200\nrequest_budget_per_sec = 1000\n\
         litestream_bin = \"{}\"\nrestore_timeout_secs = {restore_timeout_secs}\n",
        litestream().display()
    )
}

/// Keys of partition `p`'s replica objects in `bucket` under the tests' prefix `test` (moto
/// answers unsigned list requests); `None` if the listing could not be read.
pub async fn replica_keys(bucket: &str, p: u32) -> Option<BTreeSet<String>> {
    let url = format!(
        "{}/{bucket}?list-type=2&prefix=test/partitions/p{p:04}/",
        endpoint()
    );
    let body = reqwest::get(url).await.ok()?.text().await.ok()?;
    Some(
        body.split("<Key>")
            .skip(1)
            .filter_map(|k| k.split_once("</Key>").map(|(k, _)| k.to_owned()))
            .collect(),
    )
}

/// A signed client for `bucket` on the local S3 server (moto answers unsigned listings but
/// refuses unsigned object reads; it accepts any credentials).
pub fn client(bucket: &str) -> object_store::aws::AmazonS3 {
    object_store::aws::AmazonS3Builder::new()
        .with_endpoint(endpoint())
        .with_bucket_name(bucket)
        .with_region("us-east-1")
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .with_allow_http(true)
        .build()
        .unwrap()
}
