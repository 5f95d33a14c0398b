//! The typed config tree: figment sources, validation and redaction (DESIGN §11, §12).
//!
//! Sources, lowest to highest priority:
//!
//! 1. the built-in [`Default`] impls;
//! 2. the embedded `config/default.toml` ([`DEFAULT_TOML`]; a test keeps it equal to 1.);
//! 3. `--config FILE` (TOML, same keys; a missing file is an error);
//! 4. environment `SHARDLITE_SECTION__KEY` (`SHARDLITE_DISCORD__SHARDS=8` → `discord.shards`),
//!    except the non-config names in [`NON_CONFIG_ENV`];
//! 5. Kubernetes: `POD_ORDINAL` → `cluster.ordinal` (a number, or a StatefulSet pod name like
//!    `gateway-3` → 3), `NUM_GATEWAY_PODS` → `cluster.pods` and the seed deployments'
//!    `SERVICE_MODE` → `cluster.mode`.
//!
//! Every struct denies unknown fields, so a misspelled key (in a file or a `SHARDLITE_` variable)
//! is an error naming it rather than a silently ignored setting. The Discord token comes only from
//! `DISCORD_TOKEN` and is held as a [`Secret`] that never prints.
//!
//! This module depends on nothing of ours except [`crate::ownership`] for the topology rules.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ownership::Topology;

/// The text of `config/default.toml`, embedded at build time: every key with its default value and
/// a comment (meaning, unit, environment override). Also what `Config::default()` equals.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Prefix of the environment variables that override config keys: `SHARDLITE_SECTION__KEY`.
pub const ENV_PREFIX: &str = "SHARDLITE_";

/// `SHARDLITE_`-prefixed environment variables that are not config keys and are ignored by the
/// config loader (otherwise `deny_unknown_fields` would reject them): the API bearer token
/// (DESIGN §12, read by the HTTP layer itself), and the names the CLI may use for its own flags.
pub const NON_CONFIG_ENV: &[&str] = &["SHARDLITE_API_TOKEN", "SHARDLITE_CONFIG", "SHARDLITE_LOG"];

/// The only source of the Discord bot token (DESIGN §12).
pub const TOKEN_ENV: &str = "DISCORD_TOKEN";

/// Secrets of shardlite's own that it reads from the environment. Child processes that do not
/// need them (Litestream, a local S3 server) never inherit them.
pub const SECRET_ENV: &[&str] = &[TOKEN_ENV, API_TOKEN_ENV];

/// Kubernetes pod ordinal variable (→ `cluster.ordinal`): a number or a StatefulSet pod name.
pub const POD_ORDINAL_ENV: &str = "POD_ORDINAL";

/// Kubernetes pod count variable (→ `cluster.pods`).
pub const NUM_PODS_ENV: &str = "NUM_GATEWAY_PODS";

/// The seed deployments' process mode variable (→ `cluster.mode`): `all`, `gateway` or `router`.
pub const SERVICE_MODE_ENV: &str = "SERVICE_MODE";

/// What a [`Secret`] prints as, in `Debug`, `Display` and `Serialize`.
pub const REDACTED: &str = "<redacted>";

/// The whole configuration. Field names are the stable TOML sections of DESIGN §12.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[discord]`: the Discord side (URLs, shard total, intents, token).
    pub discord: DiscordConfig,
    /// `[cluster]`: pods, this pod's ordinal, partitions, peer URLs.
    pub cluster: ClusterConfig,
    /// `[storage]`: data directory and batching of partition writes.
    pub storage: StorageConfig,
    /// `[http]`: the HTTP listener.
    pub http: HttpConfig,
    /// `[replication]`: Litestream and the object store.
    pub replication: ReplicationConfig,
    /// `[supervision]`: restart policy and timeouts of the actor tree.
    pub supervision: SupervisionConfig,
}

/// `[discord]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiscordConfig {
    /// Gateway base URL like Discord's `wss://gateway.discord.gg` (the shard appends
    /// `/?v=10&encoding=json`). `None` (default) = use the `url` that `/gateway/bot` returns.
    /// Must start `ws://` or `wss://`, have a host, and have no trailing `/`, query or fragment.
    pub gateway_url: Option<String>,
    /// REST base URL without the API version, default `https://discord.com/api` (shardlite
    /// appends `/v10/gateway/bot`, …). `http://` or `https://`, no trailing `/`.
    pub api_url: String,
    /// Discord shard total S, default 1. A power of two, ≤ `cluster.partitions`.
    pub shards: u32,
    /// Gateway intents bitfield for IDENTIFY, default 33283 = GUILDS | GUILD_MEMBERS |
    /// GUILD_MESSAGES | MESSAGE_CONTENT.
    pub intents: u64,
    /// The bot token, read only from the `DISCORD_TOKEN` environment variable (empty or absent →
    /// `None`). Never deserialised from a file or `SHARDLITE_` variable (that is an error);
    /// serialises as `"<redacted>"` and is omitted when `None`.
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// Identifies of the daily `session_start_limit` that are never spent, default 10.
    pub identify_reserve: u32,
    /// Guard against clock skew between pods when they take turns to identify shards of one
    /// `max_concurrency` bucket, milliseconds, default 1000; 1..=60000. Two pods' identifies of a
    /// bucket stay ≥ 5 s apart while their wall clocks differ by less than this (plus the
    /// difference in their latency to Discord). Each identify window is 5 s + this + 100 ms long,
    /// so it also slows a multi-pod cold start; unused with one pod
    /// ([`crate::node::identify_queue`]).
    pub identify_clock_skew_ms: u64,
}

impl Default for DiscordConfig {
    fn default() -> Self {
        DiscordConfig {
            gateway_url: None,
            api_url: "https://discord.com/api".to_owned(),
            shards: 1,
            intents: DEFAULT_INTENTS,
            token: None,
            identify_reserve: 10,
            identify_clock_skew_ms: 1000,
        }
    }
}

/// Largest `discord.identify_clock_skew_ms`: a minute of skew means the clocks are not
/// synchronised at all, and it would stretch every identify window to over a minute.
pub const MAX_IDENTIFY_CLOCK_SKEW_MS: u64 = 60_000;

/// Default gateway intents: GUILDS (1 << 0) | GUILD_MEMBERS (1 << 1) | GUILD_MESSAGES (1 << 9) |
/// MESSAGE_CONTENT (1 << 15) = 33283 (Discord's intent bits).
pub const DEFAULT_INTENTS: u64 = 1 | 1 << 1 | 1 << 9 | 1 << 15;

/// `[cluster]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Pod count M, default 1; 1 ≤ M ≤ `discord.shards`. Overridden by `NUM_GATEWAY_PODS`.
    pub pods: u32,
    /// This pod's number k, default 0; k < `pods` (not checked in `router` mode, which owns
    /// nothing). Overridden by `POD_ORDINAL`.
    pub ordinal: u32,
    /// What this process runs, default [`ServiceMode::All`] (DESIGN §8). Overridden by
    /// `SERVICE_MODE`.
    pub mode: ServiceMode,
    /// Partition count P, default 64; a power of two ≥ `discord.shards`.
    pub partitions: u32,
    /// URL of pod `{ordinal}`'s HTTP server, default
    /// `http://gateway-{ordinal}.gateway-internal:3000`. Must contain `{ordinal}`; `http://` or
    /// `https://`, no trailing `/`.
    pub peer_url_template: String,
    /// How long a partition lease stays valid without a renewal, seconds, default 60 (DESIGN §7).
    /// The holder renews every third of it and stops writing a partition whose lease it could
    /// not renew before it runs out. With replication on, the renewals (partitions × 3 / TTL per
    /// second) must stay within 5 % of `replication.request_budget_per_sec`.
    pub lease_ttl_secs: u64,
    /// How long a superseded replica generation is kept once the current one has data, seconds,
    /// default 3600 (DESIGN §7 fence). Each lease epoch replicates to a prefix of its own; older
    /// epochs' prefixes are deleted after this, so the bucket does not grow with every restart
    /// or move, while a restore drill can still read the previous generation for a while.
    pub superseded_retention_secs: u64,
}

/// `cluster.mode` (DESIGN §8, the seed deployments' `SERVICE_MODE`): written `all`, `gateway` or
/// `router` in TOML and the environment.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ServiceMode {
    /// One process does everything: gateway shards, partitions and their `/v1` API.
    #[default]
    All,
    /// A gateway pod: shards, partitions and the `/v1` API of the guilds it owns.
    Gateway,
    /// The stateless router ([`crate::router`]): forwards `/v1/guilds/{id}/…` to the owning pod;
    /// needs no Discord token, no data directory and no replication.
    Router,
}

impl fmt::Display for ServiceMode {
    /// The TOML spelling: `all`, `gateway`, `router`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServiceMode::All => "all",
            ServiceMode::Gateway => "gateway",
            ServiceMode::Router => "router",
        })
    }
}

/// Share of `replication.request_budget_per_sec` that lease renewals may spend, in percent.
pub const LEASE_BUDGET_PERCENT: u64 = 5;

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            pods: 1,
            ordinal: 0,
            mode: ServiceMode::All,
            partitions: 64,
            peer_url_template: "http://gateway-{ordinal}.gateway-internal:3000".to_owned(),
            lease_ttl_secs: 60,
            superseded_retention_secs: 3600,
        }
    }
}

impl ClusterConfig {
    /// `peer_url_template` with `{ordinal}` replaced by `ordinal`.
    pub fn peer_url(&self, ordinal: u32) -> String {
        self.peer_url_template
            .replace("{ordinal}", &ordinal.to_string())
    }
}

/// `[storage]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Directory of `partitions/p{id:04}.sqlite3`, default `data`. Non-empty.
    pub data_dir: PathBuf,
    /// Most dispatches per transaction, default 1000; ≥ 1.
    pub batch_max: usize,
    /// Longest wait of a dispatch before its batch commits, milliseconds, default 20; ≥ 1.
    pub flush_interval_ms: u64,
    /// Interval of the shard's watermark to its partitions, milliseconds, default 200; ≥ 1.
    pub watermark_interval_ms: u64,
    /// Per shard: dispatches routed but not committed before the shard stops reading its socket,
    /// default 20000; ≥ `batch_max`.
    pub max_in_flight: usize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: PathBuf::from("data"),
            batch_max: 1000,
            flush_interval_ms: 20,
            watermark_interval_ms: 200,
            max_in_flight: 20000,
        }
    }
}

/// `[http]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address `IP:PORT`, default `127.0.0.1:3000`; port 0 picks a free port.
    pub listen: SocketAddr,
    /// The bearer token `/v1` requires (DESIGN §8), read only from the `SHARDLITE_API_TOKEN`
    /// environment variable (empty or absent → `None`: every `/v1` request then gets 503, the
    /// API is never open). Never deserialised from a file; serialises as `"<redacted>"`.
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub api_token: Option<Secret>,
}

/// The only source of the API's bearer token (DESIGN §8).
pub const API_TOKEN_ENV: &str = "SHARDLITE_API_TOKEN";

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 3000)),
            api_token: None,
        }
    }
}

/// `[replication]` (DESIGN §6).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// Who runs Litestream, default [`ReplicationMode::Off`].
    pub mode: ReplicationMode,
    /// S3-compatible endpoint URL (`http://` or `https://`); required unless mode is `off`.
    pub endpoint: Option<String>,
    /// Bucket name; required unless mode is `off`. A numeric name from the environment
    /// (`SHARDLITE_REPLICATION__BUCKET=2024`) is accepted as a string.
    #[serde(default, deserialize_with = "lenient_opt_string")]
    pub bucket: Option<String>,
    /// Bucket region, default `us-east-1`; non-empty.
    #[serde(deserialize_with = "lenient_string")]
    pub region: String,
    /// Key prefix in the bucket, default `shardlite`; replicas live at
    /// `{prefix}/partitions/p{id:04}`. Non-empty, no leading or trailing `/`.
    #[serde(deserialize_with = "lenient_string")]
    pub prefix: String,
    /// Path-style bucket addressing (MinIO, most local S3 servers), default true.
    pub path_style: bool,
    /// Litestream sync interval, milliseconds, default 1000; ≥ 1. Unless mode is `off`,
    /// `partitions × 1000 / sync_interval_ms ≤ request_budget_per_sec`.
    pub sync_interval_ms: u64,
    /// Object-store requests per second the sync may spend, default 100; ≥ 1 unless mode is `off`.
    pub request_budget_per_sec: u32,
    /// Litestream executable (path or name in `PATH`), default `litestream`.
    pub litestream_bin: PathBuf,
    /// Longest time one partition's restore may take, seconds, default 120; ≥ 1.
    pub restore_timeout_secs: u64,
    /// Partitions restored at once, default 4; ≥ 1.
    pub restore_parallelism: usize,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            mode: ReplicationMode::Off,
            endpoint: None,
            bucket: None,
            region: "us-east-1".to_owned(),
            prefix: "shardlite".to_owned(),
            path_style: true,
            sync_interval_ms: 1000,
            request_budget_per_sec: 100,
            litestream_bin: PathBuf::from("litestream"),
            restore_timeout_secs: 120,
            restore_parallelism: 4,
        }
    }
}

/// `replication.mode` (DESIGN §6): written `child`, `external` or `off` in TOML and env.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ReplicationMode {
    /// shardlite runs and supervises `litestream replicate` as a child process.
    Child,
    /// A sidecar container runs Litestream with the same rendered `litestream.yml`.
    External,
    /// No replication: a lost disk loses data.
    #[default]
    Off,
}

impl fmt::Display for ReplicationMode {
    /// The TOML spelling: `child`, `external`, `off`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReplicationMode::Child => "child",
            ReplicationMode::External => "external",
            ReplicationMode::Off => "off",
        })
    }
}

/// `[supervision]` (DESIGN §3).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SupervisionConfig {
    /// Restarts allowed within `window_secs` before a supervisor gives up, default 5.
    pub max_restarts: u32,
    /// Window for `max_restarts`, seconds, default 60; ≥ 1.
    pub window_secs: u64,
    /// First restart delay, milliseconds, default 100 (doubles per restart); ≥ 1.
    pub backoff_initial_ms: u64,
    /// Longest restart delay, milliseconds, default 10000; ≥ `backoff_initial_ms`.
    pub backoff_max_ms: u64,
    /// A shard silent (no heartbeat ACK, no dispatch) this long is restarted, seconds, default
    /// 120; ≥ 1.
    pub shard_silence_timeout_secs: u64,
    /// Graceful stop budget, seconds, default 30.
    pub shutdown_timeout_secs: u64,
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        SupervisionConfig {
            max_restarts: 5,
            window_secs: 60,
            backoff_initial_ms: 100,
            backoff_max_ms: 10000,
            shard_silence_timeout_secs: 120,
            shutdown_timeout_secs: 30,
        }
    }
}

/// A secret string (the Discord token). `Debug`, `Display` and `Serialize` print `<redacted>`;
/// only [`Secret::expose`] gives the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret value, for the one place that must send it (IDENTIFY, `Authorization`).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

/// Why the configuration could not be loaded or is invalid. Display is one lowercase message
/// naming the key (exit code 2, DESIGN §12).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A source could not be read or parsed, a key is unknown, or a value has the wrong type.
    /// Display is figment's message on one line, naming the key and the source (file path or
    /// environment variable), e.g. `invalid type: found string "two", expected u32 for key
    /// "discord.shards" in c.toml TOML file` or `… for key "SHARDLITE_CLUSTER__PODS" in
    /// `SHARDLITE_` environment variable(s)`; several errors are joined by `; `.
    ///
    /// Boxed because figment's error is large (clippy `result_large_err`); `?` converts a
    /// `figment::Error` directly.
    #[error("{}", one_line(.0))]
    Load(Box<figment::Error>),
    /// A value breaks a rule: `invalid config: cluster.partitions = 48: must be a power of two`.
    #[error("invalid config: {key} = {value}: {rule}")]
    Invalid {
        /// The TOML key, `section.key`.
        key: &'static str,
        /// The offending value as written (strings quoted; secrets `<redacted>`).
        value: String,
        /// The rule broken, phrased as a requirement.
        rule: String,
    },
}

impl From<figment::Error> for ConfigError {
    fn from(error: figment::Error) -> Self {
        ConfigError::Load(Box::new(error))
    }
}

impl ConfigError {
    /// The key an [`ConfigError::Invalid`] names (`None` for load errors).
    pub fn key(&self) -> Option<&'static str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::Load(_) => None,
        }
    }
}

/// figment's message, one line per error (its own line breaks collapsed), joined by `; `.
fn one_line(error: &figment::Error) -> String {
    error
        .clone()
        .into_iter()
        .map(|e| {
            e.to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn invalid(key: &'static str, value: impl fmt::Display, rule: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_string(),
        rule: rule.into(),
    }
}

impl Config {
    /// Loads the configuration from every source (defaults, embedded `default.toml`, `file`, the
    /// process environment), reads `DISCORD_TOKEN`, and validates. `file` is `--config FILE`.
    ///
    /// # Errors
    /// [`ConfigError::Load`] if `file` is missing or unparsable, a key is unknown or a value has
    /// the wrong type; [`ConfigError::Invalid`] if a rule of [`Config::validate`] is broken or a
    /// source sets `discord.token`.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Config::from_figment(Config::figment(file))
    }

    /// The merged sources, lowest to highest priority: `Config::default()`, the embedded
    /// `config/default.toml`, `file` (`Toml::file_exact`: no search, missing = error), `SHARDLITE_`
    /// environment nested with `__` (minus [`NON_CONFIG_ENV`]), then `POD_ORDINAL` /
    /// `NUM_GATEWAY_PODS` / `SERVICE_MODE`. Environment variables are read when the figment is
    /// extracted.
    pub fn figment(file: Option<&Path>) -> Figment {
        let mut figment =
            Figment::from(Serialized::defaults(Config::default())).merge(EmbeddedDefaults);
        if let Some(path) = file {
            figment = figment.merge(Keyed(Toml::file_exact(path), KeyStyle::Toml));
        }
        let env = Env::prefixed(ENV_PREFIX)
            .filter(|key| {
                !NON_CONFIG_ENV
                    .iter()
                    .any(|name| name[ENV_PREFIX.len()..].eq_ignore_ascii_case(key.as_str()))
            })
            .split("__");
        figment
            .merge(Keyed(env, KeyStyle::Env))
            .merge(KubernetesEnv)
    }

    /// Extracts a [`Config`] from `figment`, sets `discord.token` from `DISCORD_TOKEN` and
    /// `http.api_token` from `SHARDLITE_API_TOKEN` (trimmed; empty → `None`), and validates.
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        if figment.contains("discord.token") {
            let source = figment
                .find_metadata("discord.token")
                .map(describe_source)
                .unwrap_or_else(|| "a config source".to_owned());
            return Err(invalid(
                "discord.token",
                REDACTED,
                format!(
                    "is set in {source}, but the token is read only from the {TOKEN_ENV} environment variable"
                ),
            ));
        }
        let mut config: Config = figment.extract()?;
        let secret = |name| {
            std::env::var(name)
                .ok()
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty())
                .map(Secret)
        };
        config.discord.token = secret(TOKEN_ENV);
        config.http.api_token = secret(API_TOKEN_ENV);
        config.validate()?;
        Ok(config)
    }

    /// Checks every rule; returns the first broken one as [`ConfigError::Invalid`] naming the key.
    ///
    /// Rules: the topology rules of [`Topology::new`] (`discord.shards` a power of two ≥ 1,
    /// `cluster.partitions` a power of two, shards ≤ partitions, 1 ≤ pods ≤ shards);
    /// `cluster.ordinal < cluster.pods`; `cluster.peer_url_template` contains `{ordinal}` and is an
    /// http(s) URL; `discord.gateway_url` ws(s)://, `discord.api_url` http(s)://, both with a host
    /// and no trailing `/`, query or fragment; `discord.identify_clock_skew_ms` in
    /// 1..=[`MAX_IDENTIFY_CLOCK_SKEW_MS`]; `storage.data_dir` non-empty; `storage.batch_max`,
    /// `flush_interval_ms`, `watermark_interval_ms` ≥ 1; `storage.max_in_flight ≥ batch_max`;
    /// `replication.sync_interval_ms`, `restore_timeout_secs`, `restore_parallelism` ≥ 1,
    /// `region` non-empty, `prefix` non-empty without leading/trailing `/`, `endpoint` (if set) an
    /// http(s) URL, `bucket` (if set) non-empty without `/`; unless `replication.mode = off`:
    /// `bucket` and `endpoint` set, `request_budget_per_sec ≥ 1` and
    /// `partitions × 1000 / sync_interval_ms ≤ request_budget_per_sec` (DESIGN §6);
    /// `supervision.window_secs`, `backoff_initial_ms`, `shard_silence_timeout_secs` ≥ 1 and
    /// `backoff_max_ms ≥ backoff_initial_ms`. With `cluster.mode = router` the ordinal rule and
    /// the rules that depend on `replication.mode` (pods > 1 needs `child`; bucket, endpoint,
    /// request budget) do not apply: a router owns no partition.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for the first broken rule, in the order above.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let (d, c, s, r, v) = (
            &self.discord,
            &self.cluster,
            &self.storage,
            &self.replication,
            &self.supervision,
        );
        Topology::new(d.shards, c.partitions, c.pods)
            .map_err(|e| invalid(e.key(), e.value(), e.rule()))?;
        // A router owns no partition: its ordinal and the replication rules mean nothing to it.
        let router = c.mode == ServiceMode::Router;
        if !router && c.ordinal >= c.pods {
            return Err(invalid(
                "cluster.ordinal",
                c.ordinal,
                format!(
                    "must be less than cluster.pods = {} (ordinals are 0..pods)",
                    c.pods
                ),
            ));
        }
        if !c.peer_url_template.contains("{ordinal}") {
            return Err(invalid(
                "cluster.peer_url_template",
                format!("{:?}", c.peer_url_template),
                "must contain \"{ordinal}\"",
            ));
        }
        check_url(
            "cluster.peer_url_template",
            &c.peer_url_template,
            &["http://", "https://"],
        )?;
        if let Some(url) = &d.gateway_url {
            check_url("discord.gateway_url", url, &["ws://", "wss://"])?;
        }
        check_url("discord.api_url", &d.api_url, &["http://", "https://"])?;
        if !(1..=MAX_IDENTIFY_CLOCK_SKEW_MS).contains(&d.identify_clock_skew_ms) {
            return Err(invalid(
                "discord.identify_clock_skew_ms",
                d.identify_clock_skew_ms,
                format!(
                    "must be 1..={MAX_IDENTIFY_CLOCK_SKEW_MS} ms: no two pods' clocks agree \
                     exactly, and every identify window is 5.1 s plus this long"
                ),
            ));
        }

        if s.data_dir.as_os_str().is_empty() {
            return Err(invalid("storage.data_dir", "\"\"", "must not be empty"));
        }
        at_least_one("storage.batch_max", s.batch_max as u64)?;
        at_least_one("storage.flush_interval_ms", s.flush_interval_ms)?;
        at_least_one("storage.watermark_interval_ms", s.watermark_interval_ms)?;
        if s.max_in_flight < s.batch_max {
            return Err(invalid(
                "storage.max_in_flight",
                s.max_in_flight,
                format!(
                    "must be at least storage.batch_max = {} (a shard must be able to fill one batch)",
                    s.batch_max
                ),
            ));
        }

        at_least_one("replication.sync_interval_ms", r.sync_interval_ms)?;
        at_least_one("replication.restore_timeout_secs", r.restore_timeout_secs)?;
        at_least_one(
            "replication.restore_parallelism",
            r.restore_parallelism as u64,
        )?;
        if r.region.trim().is_empty() {
            return Err(invalid(
                "replication.region",
                format!("{:?}", r.region),
                "must not be empty",
            ));
        }
        if r.prefix.is_empty() || r.prefix.starts_with('/') || r.prefix.ends_with('/') {
            return Err(invalid(
                "replication.prefix",
                format!("{:?}", r.prefix),
                "must be non-empty with no leading or trailing '/'",
            ));
        }
        // Replicate reads the prefix from litestream.yml, restore from an s3:// URL: a '#' or
        // '?' cuts that URL, a '%' is decoded in it, a '$' was expanded in the file. Data would
        // be uploaded to one path and restored from another, and a lost disk would come back
        // empty. S3's safe key characters mean the same text on both sides.
        if let Some(bad) = r
            .prefix
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')))
        {
            return Err(invalid(
                "replication.prefix",
                format!("{:?}", r.prefix),
                format!(
                    "contains {bad:?}: use letters, digits, '-', '_', '.' and '/' only (the \
                     replica path must read the same in litestream.yml and in a restore URL)"
                ),
            ));
        }
        if r.prefix.contains("//") {
            return Err(invalid(
                "replication.prefix",
                format!("{:?}", r.prefix),
                "must not contain an empty segment ('//')",
            ));
        }
        if let Some(endpoint) = &r.endpoint {
            check_url("replication.endpoint", endpoint, &["http://", "https://"])?;
        }
        if let Some(bucket) = &r.bucket
            && (bucket.trim().is_empty() || bucket.contains('/'))
        {
            return Err(invalid(
                "replication.bucket",
                format!("{bucket:?}"),
                "must be a non-empty bucket name without '/'",
            ));
        }
        if !router && c.pods > 1 && r.mode == ReplicationMode::Off {
            return Err(invalid(
                "cluster.pods",
                c.pods,
                "must be 1 when replication.mode = \"off\": a shard moved to another pod takes its \
                 data along only through the object store, and only the store's leases can keep \
                 two pods from writing one partition (DESIGN §7)",
            ));
        }
        if !router && c.pods > 1 && r.mode == ReplicationMode::External {
            return Err(invalid(
                "replication.mode",
                "\"external\"",
                "must be \"child\" when cluster.pods > 1: shardlite cannot stop a sidecar's \
                 uploads when it loses a partition's lease to another pod (DESIGN §7)",
            ));
        }
        at_least_one("cluster.lease_ttl_secs", c.lease_ttl_secs)?;
        if !router && r.mode != ReplicationMode::Off {
            if r.bucket.is_none() {
                return Err(invalid(
                    "replication.bucket",
                    "(unset)",
                    format!("is required when replication.mode = {}", r.mode),
                ));
            }
            if r.endpoint.is_none() {
                return Err(invalid(
                    "replication.endpoint",
                    "(unset)",
                    format!("is required when replication.mode = {}", r.mode),
                ));
            }
            at_least_one(
                "replication.request_budget_per_sec",
                u64::from(r.request_budget_per_sec),
            )?;
            // One sync request per partition per interval (DESIGN §6): P·1000/interval req/s.
            let demand = u64::from(c.partitions) * 1000;
            let budget = u64::from(r.request_budget_per_sec);
            if demand > budget * r.sync_interval_ms {
                let minimum = demand.div_ceil(budget);
                return Err(invalid(
                    "replication.sync_interval_ms",
                    r.sync_interval_ms,
                    format!(
                        "must be at least {minimum} ms: {} partitions syncing every {} ms need {:.1} \
                         requests/s, over replication.request_budget_per_sec = {budget}",
                        c.partitions,
                        r.sync_interval_ms,
                        demand as f64 / r.sync_interval_ms as f64,
                    ),
                ));
            }
            // Each partition's lease is renewed three times per TTL (DESIGN §7): P·3/TTL req/s,
            // at most LEASE_BUDGET_PERCENT of the budget.
            let renewals = u64::from(c.partitions) * 3 * 100;
            if renewals > budget * LEASE_BUDGET_PERCENT * c.lease_ttl_secs {
                let minimum = renewals.div_ceil(budget * LEASE_BUDGET_PERCENT);
                return Err(invalid(
                    "cluster.lease_ttl_secs",
                    c.lease_ttl_secs,
                    format!(
                        "must be at least {minimum} s: renewing {} partition leases three times \
                         per TTL needs {:.1} requests/s, over {LEASE_BUDGET_PERCENT} % of \
                         replication.request_budget_per_sec = {budget}",
                        c.partitions,
                        (u64::from(c.partitions) * 3) as f64 / c.lease_ttl_secs as f64,
                    ),
                ));
            }
        }

        at_least_one("supervision.window_secs", v.window_secs)?;
        at_least_one("supervision.backoff_initial_ms", v.backoff_initial_ms)?;
        if v.backoff_max_ms < v.backoff_initial_ms {
            return Err(invalid(
                "supervision.backoff_max_ms",
                v.backoff_max_ms,
                format!(
                    "must be at least supervision.backoff_initial_ms = {}",
                    v.backoff_initial_ms
                ),
            ));
        }
        at_least_one(
            "supervision.shard_silence_timeout_secs",
            v.shard_silence_timeout_secs,
        )?;
        Ok(())
    }

    /// The ownership topology `(discord.shards, cluster.partitions, cluster.pods)`.
    ///
    /// # Panics
    /// If the config breaks the topology rules, i.e. was not [`Config::validate`]d.
    pub fn topology(&self) -> Topology {
        Topology::new(
            self.discord.shards,
            self.cluster.partitions,
            self.cluster.pods,
        )
        .expect("Config::topology on a config that failed validate()")
    }

    /// The effective configuration as TOML, for `shardlite config check`: every key with its
    /// value; unset optional keys (`gateway_url`, `endpoint`, `bucket`) are absent; the token, if
    /// any, appears as `token = "<redacted>"`.
    pub fn to_toml_redacted(&self) -> String {
        toml::to_string(self).expect("Config always serialises to TOML")
    }

    /// Discord URLs that would carry the bot token in plain text to another machine: `ws://`
    /// `discord.gateway_url` or `http://` `discord.api_url` whose host is not loopback, as
    /// `(key, url)`. Allowed (a simulator or proxy on another host is legitimate), but `run`
    /// logs a warning for each: anyone on the path can read the token and the traffic.
    pub fn plaintext_discord_urls(&self) -> Vec<(&'static str, String)> {
        let d = &self.discord;
        [
            ("discord.gateway_url", d.gateway_url.as_deref(), "ws://"),
            ("discord.api_url", Some(d.api_url.as_str()), "http://"),
        ]
        .into_iter()
        .filter_map(|(key, url, plain)| {
            let url = url?;
            let remote =
                url.starts_with(plain) && !url_host(url).is_some_and(|h| is_loopback_host(&h));
            remote.then(|| (key, url.to_owned()))
        })
        .collect()
    }
}

fn at_least_one(key: &'static str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(invalid(key, 0, "must be at least 1"));
    }
    Ok(())
}

/// A base URL: one of `schemes`, a non-empty host, no whitespace, no trailing '/', no query or
/// fragment (callers append paths like `/v10/…` and `/?v=10…`).
/// The host of `url` (after the scheme, before any port or path), lowercased; IPv6 hosts keep
/// their brackets.
fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let host = if authority.starts_with('[') {
        authority.split_inclusive(']').next()?
    } else {
        authority.split(':').next()?
    };
    Some(host.to_ascii_lowercase())
}

/// Whether `host` is on this machine: `localhost`, 127.0.0.0/8 or `[::1]`.
fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host == "[::1]"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn check_url(key: &'static str, url: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    let fail = |rule: String| Err(invalid(key, format!("{url:?}"), rule));
    let Some(rest) = schemes.iter().find_map(|s| url.strip_prefix(s)) else {
        return fail(format!("must start with {}", schemes.join(" or ")));
    };
    if rest.is_empty() || rest.starts_with('/') {
        return fail("must name a host after the scheme".to_owned());
    }
    let authority = rest.split('/').next().unwrap_or_default();
    if let Some((_, host)) = authority.rsplit_once('@') {
        // The value is not echoed: it holds a secret.
        let scheme = &url[..url.len() - rest.len()];
        return Err(invalid(
            key,
            format!("\"{scheme}<redacted>@{host}…\""),
            "must not contain credentials (user:password@); set AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY in the environment instead"
                .to_owned(),
        ));
    }
    if url.chars().any(char::is_whitespace) {
        return fail("must not contain whitespace".to_owned());
    }
    if url.contains('?') || url.contains('#') {
        return fail("must be a base URL without query or fragment".to_owned());
    }
    if url.ends_with('/') {
        return fail("must not end with '/' (paths are appended to it)".to_owned());
    }
    Ok(())
}

fn describe_source(md: &Metadata) -> String {
    match &md.source {
        Some(source) => format!("{source} {}", md.name),
        None => md.name.to_string(),
    }
}

/// How a wrapped provider's error messages spell a key.
#[derive(Clone, Copy)]
enum KeyStyle {
    /// `discord.shards` (figment's default would be `default.discord.shards`).
    Toml,
    /// `SHARDLITE_DISCORD__SHARDS` (figment's default would be `DISCORD.SHARDS`).
    Env,
}

fn toml_key(_: &Profile, path: &[&str]) -> String {
    path.join(".")
}

fn env_key(_: &Profile, path: &[&str]) -> String {
    format!("{ENV_PREFIX}{}", path.join("__").to_ascii_uppercase())
}

/// A provider whose errors name keys the way the operator wrote them.
struct Keyed<P>(P, KeyStyle);

impl<P: Provider> Provider for Keyed<P> {
    fn metadata(&self) -> Metadata {
        let metadata = self.0.metadata();
        match self.1 {
            KeyStyle::Toml => metadata.interpolater(toml_key),
            KeyStyle::Env => metadata.interpolater(env_key),
        }
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        self.0.data()
    }
}

/// The embedded `config/default.toml`, named so errors say where a bad value came from.
struct EmbeddedDefaults;

impl Provider for EmbeddedDefaults {
    fn metadata(&self) -> Metadata {
        Metadata::named("built-in config/default.toml").interpolater(toml_key)
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Toml::string(DEFAULT_TOML).data()
    }
}

/// `POD_ORDINAL` → `cluster.ordinal`, `NUM_GATEWAY_PODS` → `cluster.pods` (DESIGN §11) and
/// `SERVICE_MODE` → `cluster.mode` (DESIGN §8).
struct KubernetesEnv;

/// Parses `POD_ORDINAL`: a number (`3`) or a StatefulSet pod name ending in `-N` (`gateway-3`).
fn parse_pod_ordinal(raw: &str) -> Option<u32> {
    let digits_only = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let raw = raw.trim();
    let digits = match raw.rsplit_once('-') {
        Some((name, n)) if !name.is_empty() => n,
        Some(_) => return None,
        None => raw,
    };
    digits_only(digits).then(|| digits.parse().ok()).flatten()
}

impl Provider for KubernetesEnv {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!(
            "{POD_ORDINAL_ENV}/{NUM_PODS_ENV}/{SERVICE_MODE_ENV} environment variable(s)"
        ))
        .interpolater(|_: &Profile, path: &[&str]| match path {
            ["cluster", "ordinal"] => POD_ORDINAL_ENV.to_owned(),
            ["cluster", "pods"] => NUM_PODS_ENV.to_owned(),
            ["cluster", "mode"] => SERVICE_MODE_ENV.to_owned(),
            other => other.join("."),
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let read = |name: &str| {
            std::env::var(name)
                .ok()
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let mut cluster = Dict::new();
        if let Some(raw) = read(POD_ORDINAL_ENV) {
            let ordinal = parse_pod_ordinal(&raw).ok_or_else(|| {
                figment::Error::from(format!(
                    "{POD_ORDINAL_ENV} = {raw:?} is neither a number nor a StatefulSet pod name ending in -N (like gateway-3)"
                ))
            })?;
            cluster.insert("ordinal".into(), Value::from(ordinal));
        }
        if let Some(raw) = read(NUM_PODS_ENV) {
            let pods: u32 = raw.parse().map_err(|_| {
                figment::Error::from(format!("{NUM_PODS_ENV} = {raw:?} is not a number of pods"))
            })?;
            cluster.insert("pods".into(), Value::from(pods));
        }
        // Passed on as written: an unknown mode fails deserialisation, which names the variable
        // and the value.
        if let Some(raw) = read(SERVICE_MODE_ENV) {
            cluster.insert("mode".into(), Value::from(raw));
        }
        let mut dict = Dict::new();
        if !cluster.is_empty() {
            dict.insert("cluster".into(), Value::from(cluster));
        }
        Ok(Profile::Default.collect(dict))
    }
}

/// A string that the environment may have parsed as a number or bool (`SHARDLITE_…=2024`).
struct LenientString(String);

impl<'de> Deserialize<'de> for LenientString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = LenientString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<LenientString, E> {
                Ok(LenientString(v.to_owned()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<LenientString, E> {
                Ok(LenientString(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<LenientString, E> {
                Ok(LenientString(v.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<LenientString, E> {
                Ok(LenientString(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    LenientString::deserialize(d).map(|s| s.0)
}

fn lenient_opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<LenientString>::deserialize(d).map(|o| o.map(|s| s.0))
}

#[cfg(test)]
// figment::Jail's closures must return `Result<(), figment::Error>`, which clippy finds large.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    fn load_in(jail_file: Option<&str>) -> Result<Config, ConfigError> {
        Config::from_figment(Config::figment(jail_file.map(Path::new)))
    }

    #[test]
    fn embedded_default_toml_is_the_builtin_default() {
        let from_file: Config = Figment::from(EmbeddedDefaults).extract().unwrap();
        assert_eq!(from_file, Config::default());
        Config::default().validate().unwrap();
        assert_eq!(Config::default().discord.intents, 33283);
    }

    /// Every key of the tree (optional ones included) appears in default.toml in its section,
    /// either set or commented out (`# key = …`).
    #[test]
    fn default_toml_documents_every_key() {
        let mut full = Config::default();
        full.discord.gateway_url = Some("wss://x".into());
        full.replication.endpoint = Some("http://x".into());
        full.replication.bucket = Some("b".into());
        let tree = toml::Value::try_from(&full).unwrap();
        let mut present = std::collections::HashSet::new();
        let mut section = String::new();
        for line in DEFAULT_TOML.lines() {
            let line = line.trim();
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_owned();
                continue;
            }
            let line = line.trim_start_matches('#').trim();
            if let Some((key, _)) = line.split_once(" = ") {
                present.insert(format!("{section}.{key}"));
            }
        }
        let mut count = 0;
        for (name, table) in tree.as_table().unwrap() {
            for key in table.as_table().unwrap().keys() {
                count += 1;
                assert!(
                    present.contains(&format!("{name}.{key}")),
                    "default.toml lacks {name}.{key}"
                );
            }
        }
        assert_eq!(count, 36);
        // Optional keys are commented out (their default is None).
        for key in ["# gateway_url = ", "# endpoint = ", "# bucket = "] {
            assert!(DEFAULT_TOML.contains(key), "{key}");
        }
    }

    #[test]
    fn env_nesting_overrides_file_and_defaults() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "[discord]\nshards = 4\n[cluster]\npartitions = 128\n",
            )?;
            let c = load_in(Some("c.toml")).unwrap();
            assert_eq!((c.discord.shards, c.cluster.partitions), (4, 128));
            jail.set_env("SHARDLITE_DISCORD__SHARDS", "8");
            jail.set_env("SHARDLITE_HTTP__LISTEN", "0.0.0.0:0");
            jail.set_env("SHARDLITE_REPLICATION__MODE", "child");
            jail.set_env("SHARDLITE_REPLICATION__BUCKET", "2024");
            jail.set_env("SHARDLITE_REPLICATION__ENDPOINT", "http://127.0.0.1:9000");
            jail.set_env("SHARDLITE_REPLICATION__SYNC_INTERVAL_MS", "2000");
            // 128 leases renewed three times per TTL fit 5 % of the budget from 77 s on.
            jail.set_env("SHARDLITE_CLUSTER__LEASE_TTL_SECS", "120");
            jail.set_env("SHARDLITE_API_TOKEN", "not-config");
            let c = load_in(Some("c.toml")).unwrap();
            assert_eq!(c.discord.shards, 8);
            assert_eq!(c.cluster.partitions, 128);
            assert_eq!(c.http.listen, "0.0.0.0:0".parse().unwrap());
            assert_eq!(c.replication.mode, ReplicationMode::Child);
            assert_eq!(c.replication.bucket.as_deref(), Some("2024"));
            assert_eq!(c.replication.sync_interval_ms, 2000);
            assert_eq!(c.topology().shards(), 8);
            Ok(())
        });
    }

    #[test]
    fn kubernetes_variables() {
        Jail::expect_with(|jail| {
            jail.set_env("SHARDLITE_DISCORD__SHARDS", "8");
            jail.set_env("SHARDLITE_CLUSTER__ORDINAL", "1");
            // Several pods need an object store (DESIGN §7).
            jail.set_env("SHARDLITE_REPLICATION__MODE", "child");
            jail.set_env("SHARDLITE_REPLICATION__BUCKET", "b");
            jail.set_env("SHARDLITE_REPLICATION__ENDPOINT", "http://127.0.0.1:9000");
            jail.set_env("NUM_GATEWAY_PODS", "4");
            jail.set_env("POD_ORDINAL", "gateway-3");
            let c = load_in(None).unwrap();
            assert_eq!((c.cluster.pods, c.cluster.ordinal), (4, 3));
            jail.set_env("POD_ORDINAL", "2");
            assert_eq!(load_in(None).unwrap().cluster.ordinal, 2);
            jail.set_env("POD_ORDINAL", "my-stateful-gateway-0");
            assert_eq!(load_in(None).unwrap().cluster.ordinal, 0);
            jail.set_env("POD_ORDINAL", "gateway");
            let err = load_in(None).unwrap_err().to_string();
            assert!(err.contains("POD_ORDINAL = \"gateway\""), "{err}");
            jail.set_env("POD_ORDINAL", "gateway-7");
            let err = load_in(None).unwrap_err();
            assert_eq!(err.key(), Some("cluster.ordinal"), "{err}");
            jail.set_env("POD_ORDINAL", "");
            jail.set_env("NUM_GATEWAY_PODS", "many");
            let err = load_in(None).unwrap_err().to_string();
            assert!(err.contains("NUM_GATEWAY_PODS = \"many\""), "{err}");
            Ok(())
        });
        assert_eq!(parse_pod_ordinal("-3"), None);
        assert_eq!(parse_pod_ordinal("gateway-+3"), None);
        assert_eq!(parse_pod_ordinal(" 12 "), Some(12));
    }

    #[test]
    fn service_mode() {
        Jail::expect_with(|jail| {
            assert_eq!(load_in(None).unwrap().cluster.mode, ServiceMode::All);
            jail.create_file("c.toml", "[cluster]\nmode = \"gateway\"\n")?;
            let c = load_in(Some("c.toml")).unwrap();
            assert_eq!(c.cluster.mode, ServiceMode::Gateway);
            jail.set_env("SERVICE_MODE", "router");
            assert_eq!(
                load_in(Some("c.toml")).unwrap().cluster.mode,
                ServiceMode::Router
            );
            jail.set_env("SERVICE_MODE", "");
            jail.create_file("bad.toml", "[cluster]\nmode = \"proxy\"\n")?;
            let err = load_in(Some("bad.toml")).unwrap_err().to_string();
            assert!(
                err.contains("cluster.mode") && err.contains("proxy"),
                "{err}"
            );
            jail.set_env("SERVICE_MODE", "sometimes");
            let err = load_in(None).unwrap_err().to_string();
            assert!(
                err.contains("SERVICE_MODE") && err.contains("sometimes"),
                "{err}"
            );
            jail.set_env("SERVICE_MODE", "");
            jail.set_env("SHARDLITE_CLUSTER__MODE", "all");
            assert_eq!(load_in(None).unwrap().cluster.mode, ServiceMode::All);
            Ok(())
        });
        assert_eq!(ServiceMode::Router.to_string(), "router");
    }

    #[test]
    fn router_mode_needs_no_replication() {
        let mut c = Config::default();
        c.discord.shards = 4;
        c.cluster.pods = 3;
        c.cluster.ordinal = 7;
        c.cluster.mode = ServiceMode::Router;
        c.validate().unwrap();
        c.replication.mode = ReplicationMode::Child;
        c.validate().unwrap();
        // The topology rules still apply: every router computes the pods' ownership function.
        c.cluster.pods = 5;
        assert_eq!(c.validate().unwrap_err().key(), Some("cluster.pods"));
    }

    #[test]
    fn unknown_keys_are_named() {
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[discord]\nshardz = 4\n")?;
            let err = load_in(Some("c.toml")).unwrap_err().to_string();
            assert!(err.contains("shardz") && err.contains("c.toml"), "{err}");
            jail.create_file("d.toml", "[discorde]\nshards = 4\n")?;
            let err = load_in(Some("d.toml")).unwrap_err().to_string();
            assert!(err.contains("discorde"), "{err}");
            // Single underscore: the classic env pitfall is an error, not ignored.
            jail.set_env("SHARDLITE_DISCORD_SHARDS", "8");
            let err = load_in(None).unwrap_err().to_string();
            assert!(
                err.contains("discord_shards") && err.contains("SHARDLITE_"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn wrong_type_names_key_and_file() {
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[discord]\nshards = \"two\"\n")?;
            let err = load_in(Some("c.toml")).unwrap_err().to_string();
            assert!(err.contains("key \"discord.shards\" in c.toml"), "{err}");
            jail.create_file("m.toml", "[replication]\nmode = \"sometimes\"\n")?;
            let err = load_in(Some("m.toml")).unwrap_err().to_string();
            assert!(
                err.contains("replication.mode") && err.contains("sometimes"),
                "{err}"
            );
            jail.set_env("SHARDLITE_CLUSTER__PODS", "lots");
            let err = load_in(None).unwrap_err().to_string();
            assert!(err.contains("\"SHARDLITE_CLUSTER__PODS\""), "{err}");
            Ok(())
        });
    }

    #[test]
    fn missing_config_file_is_an_error() {
        Jail::expect_with(|_| {
            let err = load_in(Some("nope.toml")).unwrap_err();
            assert!(matches!(err, ConfigError::Load(_)));
            assert!(err.to_string().contains("nope.toml"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn token_from_env_only_and_redacted() {
        Jail::expect_with(|jail| {
            assert!(load_in(None).unwrap().discord.token.is_none());
            jail.set_env("DISCORD_TOKEN", "");
            assert!(load_in(None).unwrap().discord.token.is_none());
            jail.set_env("DISCORD_TOKEN", "s3cr3t.t0ken");
            let c = load_in(None).unwrap();
            assert_eq!(c.discord.token.as_ref().unwrap().expose(), "s3cr3t.t0ken");
            let debug = format!("{c:?}");
            assert!(
                !debug.contains("s3cr3t") && debug.contains(REDACTED),
                "{debug}"
            );
            let toml = c.to_toml_redacted();
            assert!(
                !toml.contains("s3cr3t") && toml.contains("token = \"<redacted>\""),
                "{toml}"
            );
            assert!(!serde_json::to_string(&c).unwrap().contains("s3cr3t"));
            // A token in a file or SHARDLITE_ variable is refused, naming the source.
            jail.create_file("c.toml", "[discord]\ntoken = \"abc\"\n")?;
            let err = load_in(Some("c.toml")).unwrap_err();
            assert_eq!(err.key(), Some("discord.token"));
            assert!(
                err.to_string().contains("c.toml") && !err.to_string().contains("abc"),
                "{err}"
            );
            jail.set_env("SHARDLITE_DISCORD__TOKEN", "abc");
            let err = load_in(None).unwrap_err();
            assert!(err.to_string().contains("SHARDLITE_"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn to_toml_redacted_round_trips() {
        let c = Config::default();
        let text = c.to_toml_redacted();
        assert!(!text.contains("token"));
        let back: Config = Figment::from(Toml::string(&text)).extract().unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn load_uses_process_env() {
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[cluster]\npods = 1\n")?;
            jail.set_env("SHARDLITE_STORAGE__BATCH_MAX", "10");
            let c = Config::load(Some(Path::new("c.toml"))).unwrap();
            assert_eq!(c.storage.batch_max, 10);
            Ok(())
        });
    }

    fn rejected(edit: impl FnOnce(&mut Config)) -> ConfigError {
        let mut c = Config::default();
        edit(&mut c);
        c.validate().unwrap_err()
    }

    fn replicating(c: &mut Config) {
        c.replication.mode = ReplicationMode::Child;
        c.replication.bucket = Some("b".into());
        c.replication.endpoint = Some("http://127.0.0.1:9000".into());
    }

    #[test]
    fn each_rule_names_its_key() {
        type Edit = fn(&mut Config);
        let cases: &[(&str, Edit)] = &[
            ("discord.shards", |c| c.discord.shards = 6),
            ("discord.shards", |c| c.discord.shards = 0),
            ("cluster.partitions", |c| c.cluster.partitions = 48),
            ("discord.shards", |c| c.discord.shards = 128),
            ("cluster.pods", |c| c.cluster.pods = 0),
            ("cluster.pods", |c| c.cluster.pods = 2),
            ("cluster.ordinal", |c| c.cluster.ordinal = 1),
            ("cluster.pods", |c| {
                c.discord.shards = 4;
                c.cluster.pods = 2;
            }),
            ("cluster.lease_ttl_secs", |c| c.cluster.lease_ttl_secs = 0),
            ("replication.mode", |c| {
                replicating(c);
                c.replication.mode = ReplicationMode::External;
                c.discord.shards = 4;
                c.cluster.pods = 2;
            }),
            ("cluster.lease_ttl_secs", |c| {
                replicating(c);
                c.cluster.lease_ttl_secs = 30;
            }),
            ("cluster.peer_url_template", |c| {
                c.cluster.peer_url_template = "http://gw:3000".into()
            }),
            ("cluster.peer_url_template", |c| {
                c.cluster.peer_url_template = "gw-{ordinal}:3000".into()
            }),
            ("discord.gateway_url", |c| {
                c.discord.gateway_url = Some("https://gateway.discord.gg".into())
            }),
            ("discord.gateway_url", |c| {
                c.discord.gateway_url = Some("wss://gateway.discord.gg/".into())
            }),
            ("discord.gateway_url", |c| {
                c.discord.gateway_url = Some("wss://g/?v=10".into())
            }),
            ("discord.gateway_url", |c| {
                c.discord.gateway_url = Some("ws://".into())
            }),
            ("discord.api_url", |c| {
                c.discord.api_url = "https://discord.com/api/".into()
            }),
            ("discord.api_url", |c| {
                c.discord.api_url = "discord.com/api".into()
            }),
            ("discord.identify_clock_skew_ms", |c| {
                c.discord.identify_clock_skew_ms = 0
            }),
            ("discord.identify_clock_skew_ms", |c| {
                c.discord.identify_clock_skew_ms = 60_001
            }),
            ("storage.data_dir", |c| c.storage.data_dir = PathBuf::new()),
            ("storage.batch_max", |c| c.storage.batch_max = 0),
            ("storage.flush_interval_ms", |c| {
                c.storage.flush_interval_ms = 0
            }),
            ("storage.watermark_interval_ms", |c| {
                c.storage.watermark_interval_ms = 0
            }),
            ("storage.max_in_flight", |c| c.storage.max_in_flight = 999),
            ("replication.sync_interval_ms", |c| {
                c.replication.sync_interval_ms = 0
            }),
            ("replication.restore_timeout_secs", |c| {
                c.replication.restore_timeout_secs = 0
            }),
            ("replication.restore_parallelism", |c| {
                c.replication.restore_parallelism = 0
            }),
            ("replication.region", |c| {
                c.replication.region = String::new()
            }),
            ("replication.prefix", |c| c.replication.prefix = "a/".into()),
            ("replication.prefix", |c| {
                c.replication.prefix = "bot#1".into()
            }),
            ("replication.prefix", |c| {
                c.replication.prefix = "a?b".into()
            }),
            ("replication.prefix", |c| {
                c.replication.prefix = "a%2Fb".into()
            }),
            ("replication.prefix", |c| {
                c.replication.prefix = "$HOME".into()
            }),
            ("replication.prefix", |c| {
                c.replication.prefix = "a//b".into()
            }),
            ("replication.prefix", |c| {
                c.replication.prefix = String::new()
            }),
            ("replication.endpoint", |c| {
                c.replication.endpoint = Some("s3://x".into())
            }),
            ("replication.bucket", |c| {
                c.replication.bucket = Some("a/b".into())
            }),
            ("replication.bucket", |c| {
                replicating(c);
                c.replication.bucket = None;
            }),
            ("replication.endpoint", |c| {
                replicating(c);
                c.replication.mode = ReplicationMode::External;
                c.replication.endpoint = None;
            }),
            ("replication.request_budget_per_sec", |c| {
                replicating(c);
                c.replication.request_budget_per_sec = 0;
            }),
            ("replication.sync_interval_ms", |c| {
                replicating(c);
                c.replication.sync_interval_ms = 100;
            }),
            ("supervision.window_secs", |c| c.supervision.window_secs = 0),
            ("supervision.backoff_initial_ms", |c| {
                c.supervision.backoff_initial_ms = 0
            }),
            ("supervision.backoff_max_ms", |c| {
                c.supervision.backoff_max_ms = 50
            }),
            ("supervision.shard_silence_timeout_secs", |c| {
                c.supervision.shard_silence_timeout_secs = 0
            }),
        ];
        for (key, edit) in cases {
            let err = rejected(*edit);
            assert_eq!(err.key(), Some(*key), "{err}");
            let msg = err.to_string();
            assert!(
                msg.starts_with(&format!("invalid config: {key} = ")),
                "{msg}"
            );
        }
        assert!(
            rejected(|c| {
                c.discord.shards = 4;
                c.cluster.pods = 2;
            })
            .to_string()
            .starts_with(
                "invalid config: cluster.pods = 2: must be 1 when replication.mode = \"off\""
            )
        );
        assert_eq!(
            rejected(|c| {
                replicating(c);
                c.cluster.lease_ttl_secs = 30;
            })
            .to_string(),
            "invalid config: cluster.lease_ttl_secs = 30: must be at least 39 s: renewing 64 \
             partition leases three times per TTL needs 6.4 requests/s, over 5 % of \
             replication.request_budget_per_sec = 100"
        );
        assert_eq!(
            rejected(|c| c.cluster.partitions = 48).to_string(),
            "invalid config: cluster.partitions = 48: must be a power of two (1, 2, 4, 8, …)"
        );
    }

    #[test]
    fn request_budget_names_the_minimum_interval() {
        let msg = rejected(|c| {
            replicating(c);
            c.replication.sync_interval_ms = 100;
        })
        .to_string();
        // 64 partitions × 1000 / 100 req/s budget = 640 ms minimum.
        assert!(
            msg.contains("replication.sync_interval_ms = 100") && msg.contains("640 ms"),
            "{msg}"
        );
        let mut ok = Config::default();
        replicating(&mut ok);
        ok.replication.sync_interval_ms = 640;
        ok.validate().unwrap();
        ok.replication.sync_interval_ms = 639;
        assert!(ok.validate().is_err());
        // Off: the budget does not apply.
        ok.replication.mode = ReplicationMode::Off;
        ok.validate().unwrap();
    }

    #[test]
    fn valid_multi_pod_config() {
        let mut c = Config::default();
        c.discord.shards = 16;
        c.cluster.pods = 3;
        c.cluster.ordinal = 2;
        replicating(&mut c);
        c.discord.gateway_url = Some("ws://127.0.0.1:4000".into());
        c.discord.api_url = "http://127.0.0.1:4000/api".into();
        c.validate().unwrap();
        assert_eq!(c.topology().pods(), 3);
        assert_eq!(
            c.cluster.peer_url(2),
            "http://gateway-2.gateway-internal:3000"
        );
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "<redacted> <redacted>");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"<redacted>\"");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn urls_with_credentials_are_refused_without_echoing_them() {
        let mut c = Config::default();
        c.replication.mode = ReplicationMode::Child;
        c.replication.bucket = Some("b".into());
        c.replication.endpoint = Some("https://key:s3cr3t@nyc3.digitaloceanspaces.com".into());
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("replication.endpoint") && err.contains("credentials"),
            "{err}"
        );
        assert!(!err.contains("s3cr3t") && !err.contains("key:"), "{err}");
        assert!(err.contains("nyc3.digitaloceanspaces.com"), "{err}");
    }

    #[test]
    fn plain_text_discord_urls_to_other_hosts_are_named() {
        let mut c = Config::default();
        assert!(
            c.plaintext_discord_urls().is_empty(),
            "Discord's own URLs are TLS"
        );
        for local in [
            "ws://127.0.0.1:9000",
            "ws://localhost:9000",
            "ws://[::1]:9000",
        ] {
            c.discord.gateway_url = Some(local.into());
            c.discord.api_url = "http://127.0.0.5:9001".into();
            assert!(c.plaintext_discord_urls().is_empty(), "{local}");
        }
        c.discord.gateway_url = Some("ws://gateway.example.com".into());
        c.discord.api_url = "http://10.0.0.7:8080".into();
        let keys: Vec<_> = c
            .plaintext_discord_urls()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["discord.gateway_url", "discord.api_url"]);
    }
}
