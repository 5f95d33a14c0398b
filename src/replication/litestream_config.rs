//! `litestream.yml`, rendered from shardlite's config for the partitions a pod owns (DESIGN §6).
//!
//! Litestream 0.5 silently ignores unknown keys and silently falls back to a *file* replica when a
//! replica has no `type`, so the file is rendered from typed structs (a misspelled key cannot
//! compile) and every replica says `type: s3`. Credentials never appear: Litestream reads
//! `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (or `LITESTREAM_*`) from its own environment.

use std::path::PathBuf;

use serde::Serialize;

use super::generations::Epochs;
pub use super::generations::replica_path;
use crate::config::Config;
use crate::ownership::PartitionId;
use crate::store::PartitionStore;

/// Litestream's shutdown-sync-timeout: how long its final sync may take after SIGTERM.
pub const SHUTDOWN_SYNC_TIMEOUT_SECS: u64 = 30;

/// The rendered file's name under `storage.data_dir`.
pub const FILE_NAME: &str = "litestream.yml";

/// Litestream's control socket under `storage.data_dir` (for `litestream sync -wait`, `info`).
pub const SOCKET_NAME: &str = "litestream.sock";

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct File {
    logging: Logging,
    snapshot: Snapshot,
    shutdown_sync_timeout: String,
    socket: Socket,
    dbs: Vec<Db>,
}

#[derive(Serialize)]
struct Logging {
    level: &'static str,
    r#type: &'static str,
}

/// One snapshot an hour bounds how many incremental files a restore must apply.
#[derive(Serialize)]
struct Snapshot {
    interval: &'static str,
    retention: &'static str,
}

#[derive(Serialize)]
struct Socket {
    enabled: bool,
    path: PathBuf,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Db {
    path: PathBuf,
    /// Litestream takes short write locks to checkpoint; the same 5 s the app uses.
    busy_timeout: &'static str,
    replica: Replica,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Replica {
    r#type: &'static str,
    bucket: String,
    path: String,
    endpoint: String,
    region: String,
    force_path_style: bool,
    sync_interval: String,
}

/// The replica of generation `epoch` of `partition` as a Litestream URL, for `litestream restore`
/// without a config file: `s3://BUCKET/PREFIX/partitions/p0003/e00000002?endpoint=…&region=…&force-path-style=true`
/// (the key prefix is [`replica_path`]'s, byte for byte).
pub fn replica_url(config: &Config, partition: PartitionId, epoch: u64) -> String {
    let r = &config.replication;
    let base = format!(
        "s3://{}/{}",
        r.bucket.as_deref().unwrap_or_default(),
        replica_path(config, partition, epoch)
    );
    let params = [
        ("endpoint", r.endpoint.clone().unwrap_or_default()),
        ("region", r.region.clone()),
        ("force-path-style", r.path_style.to_string()),
    ];
    reqwest::Url::parse_with_params(&base, &params).map_or(base, String::from)
}

/// `data_dir` as an absolute path (Litestream resolves relative paths against its own working
/// directory, which a sidecar does not share).
pub fn absolute_data_dir(config: &Config) -> PathBuf {
    let dir = &config.storage.data_dir;
    if dir.is_absolute() {
        dir.clone()
    } else {
        std::env::current_dir().map_or_else(|_| dir.clone(), |cwd| cwd.join(dir))
    }
}

/// Renders `litestream.yml` for the partitions of `epochs` (this pod's), each replicating to the
/// generation of its lease epoch, with a header saying where the file came from.
///
/// # Panics
/// Never: the structs always serialize.
pub fn render(config: &Config, epochs: &Epochs) -> String {
    let r = &config.replication;
    let data_dir = absolute_data_dir(config);
    let file = File {
        logging: Logging {
            level: "info",
            r#type: "text",
        },
        snapshot: Snapshot {
            interval: "1h",
            retention: "24h",
        },
        shutdown_sync_timeout: format!("{SHUTDOWN_SYNC_TIMEOUT_SECS}s"),
        socket: Socket {
            enabled: true,
            path: data_dir.join(SOCKET_NAME),
        },
        dbs: epochs
            .iter()
            .map(|(&p, &epoch)| Db {
                path: PartitionStore::path_in(&data_dir, p),
                busy_timeout: "5s",
                replica: Replica {
                    r#type: "s3",
                    bucket: r.bucket.clone().unwrap_or_default(),
                    path: replica_path(config, p, epoch),
                    endpoint: r.endpoint.clone().unwrap_or_default(),
                    region: r.region.clone(),
                    force_path_style: r.path_style,
                    sync_interval: format!("{}ms", r.sync_interval_ms),
                },
            })
            .collect(),
    };
    let yaml = serde_yaml::to_string(&file).expect("litestream config serializes");
    format!(
        "# litestream.yml rendered by shardlite for pod {} of {} ({} partitions). Do not edit: change\n\
         # shardlite's config and render again (`shardlite litestream config`).\n\
         # Credentials are not in this file: Litestream reads AWS_ACCESS_KEY_ID and\n\
         # AWS_SECRET_ACCESS_KEY (or LITESTREAM_ACCESS_KEY_ID / LITESTREAM_SECRET_ACCESS_KEY) itself.\n{yaml}",
        config.cluster.ordinal,
        config.cluster.pods,
        epochs.len()
    )
}
