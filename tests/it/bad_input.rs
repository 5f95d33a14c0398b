//! Bad config and bad files: a clear error naming what is wrong, the right exit code, and nothing
//! stored is touched.

use shardlite::simulator::{SimConfig, Simulator};

use crate::harness::{TOKEN, command};

fn run_with(config: &str, dir: &std::path::Path) -> std::process::Output {
    let path = dir.join("bad.toml");
    std::fs::write(&path, config).unwrap();
    command()
        .args(["run", "--config"])
        .arg(&path)
        .env("DISCORD_TOKEN", TOKEN)
        .output()
        .unwrap()
}

#[test]
fn invalid_config_exits_2_naming_the_key_and_rule() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[cluster]\npartitions = 48\n", "cluster.partitions"),
        (
            "[discord]\nshards = 8\n[cluster]\npartitions = 4\n",
            "discord.shards",
        ),
        (
            "[cluster]\npods = 2\nordinal = 2\n[discord]\nshards = 2\n",
            "cluster.ordinal",
        ),
        ("[discord]\nshardz = 2\n", "shardz"),
        ("[discord]\nshards = \"two\"\n", "shards"),
    ];
    for (config, key) in cases {
        let out = run_with(config, dir.path());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{config:?} → {stderr}");
        assert!(
            stderr.contains(key),
            "{config:?}: error names {key}: {stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
}

#[test]
fn config_check_prints_the_effective_config_redacted() {
    let out = command()
        .args(["config", "check"])
        .env("DISCORD_TOKEN", "very-secret-token")
        .env("SHARDLITE_DISCORD__SHARDS", "8")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("shards = 8"), "{stdout}");
    assert!(
        !stdout.contains("very-secret-token"),
        "token leaked: {stdout}"
    );
}

#[test]
fn missing_token_exits_2() {
    let out = command().args(["run"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("DISCORD_TOKEN"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_file_that_is_not_a_database_stops_start_and_is_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig {
        guilds: 10,
        shards: 1,
        messages: 10,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("partitions")).unwrap();
    let bad = data.join("partitions/p0003.sqlite3");
    let garbage = vec![0x5a_u8; 4096];
    std::fs::write(&bad, &garbage).unwrap();
    let config = format!(
        "[discord]\ngateway_url = \"{}\"\napi_url = \"{}\"\nshards = 1\n[cluster]\npartitions = 4\n\
         [storage]\ndata_dir = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n",
        sim.gateway_url(),
        sim.api_url(),
        data.display()
    );
    let out = tokio::task::spawn_blocking({
        let dir = dir.path().to_owned();
        move || run_with(&config, &dir)
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("p0003.sqlite3"),
        "error names the file: {stderr}"
    );
    assert_eq!(
        std::fs::read(&bad).unwrap(),
        garbage,
        "the bad file is untouched"
    );
}
