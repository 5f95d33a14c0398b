//! shardlite runs a Discord bot's gateway at scale without a central database: shards route every
//! dispatch to the guild partition that owns the guild, each partition keeps its state in one
//! SQLite file, and Litestream replicates those files to S3-compatible storage.
//!
//! # Layout
//! The data path, gateway → shard → partition → store → replica, one module per hop:
//!
//! | module | owns |
//! |---|---|
//! | [`cli`] | clap definitions only |
//! | [`config`] | the typed config tree: figment sources, validation, redaction (DESIGN §11) |
//! | [`ownership`] | pure functions guild → partition → shard → pod, and rescaling plans (DESIGN §2) |
//! | [`supervision`] | the one restart policy every supervisor uses: intensity and backoff (DESIGN §3) |
//! | [`node`] | the actor tree: root supervisor, the Litestream child actor, shard groups, shards (`node::shard`; the twilight pump in `node/shard/pump.rs`), partitions (DESIGN §3) |
//! | [`store`] | one partition's SQLite file: schema, dispatch → rows, applied sequence, file checks (DESIGN §4–5) |
//! | [`replication`] | `litestream.yml` rendering, replica generations (one per lease epoch: the fence), restore before open, forced syncs and signals of the Litestream process — no actors (DESIGN §6–7) |
//! | [`cluster`] | one writer per partition: partition leases on S3 conditional writes, the store's capability check, the data-dir lock and recorded partition count — no actors (DESIGN §7) |
//! | [`http`] | a gateway pod's HTTP: health, readiness, metrics, and the guild API under `/v1` (token, read-only queries, JSON errors) (DESIGN §8) |
//! | [`router`] | `shardlite router`: stateless forwarding of `/v1/guilds/{id}/…` to the owning pod, with bounded retries; `/v1/ownership` of every pod — no actors (DESIGN §8) |
//! | [`simulator`] | the in-tree Discord gateway, a library for tests, benches and the demo (DESIGN §10) |
//! | [`run`] | `shardlite run` and `shardlite simulate`: a process until it is told to stop |
//! | [`demo`] | simulator + node in one process, then the exactly-once check |
//! | [`verify`] | exactly-once verification of partition files against the simulator's record |
//!
//! Dependencies point one way: `ownership` and `config` use nothing of ours; `store` knows nothing
//! of actors or sockets; `replication` knows no actors (it uses `config`, `ownership`, `store`);
//! `cluster` knows no actors (it uses `config`, `ownership`); `router` knows no actors (it uses
//! `config`, `ownership`); `supervision` is neutral, a policy any supervisor may use without
//! knowing the others; `node` uses `store`, `ownership`, `replication` and `supervision`; `http`
//! reads the node's status handle and the partition files through `store`, never writing; `run`
//! drives `cluster` and `http` around the node; `simulator` uses none of them.
//!
//! # Glossary
//! - **shard**: one gateway connection; Discord sends a guild's events only to shard
//!   `(guild_id >> 22) % shard_total` (Discord's sharding formula).
//! - **session**: what IDENTIFY creates on a shard (READY's `session_id`); it can be resumed.
//! - **sequence (seq)**: the number Discord gives each dispatch within a session (`s`).
//! - **identify / resume**: start a new session (rate-limited per day) / continue one, replaying
//!   the dispatches after a given seq.
//! - **dispatch**: a gateway event (op 0), e.g. MESSAGE_CREATE.
//! - **guild**: a Discord server; the unit of ownership.
//! - **partition**: `guild_key % partitions`; one SQLite file; lies on shard `partition % shards`.
//! - **applied sequence**: the highest seq whose effects a partition has committed (DESIGN §5).
//! - **watermark**: a shard's "everything up to seq N has been routed" message to its partitions.
//! - **dead letter**: a delivered dispatch that could not be applied (unknown event type,
//!   undecodable payload), kept as received in its partition's `dead_letters` table.
//! - **pod / ordinal**: one shardlite process / its index among `pods`.
//! - **replica / restore**: a partition's copy in object storage (Litestream) / bringing it back.
//! - **lease / epoch**: the right to write a partition, and its generation number (DESIGN §7).

pub mod cli;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod http;
pub mod node;
pub mod ownership;
pub mod replication;
pub mod router;
pub mod run;
pub mod simulator;
pub mod store;
pub mod supervision;
pub mod verify;

/// An error and its causes on one line, outermost first:
/// `cannot open partition file data/partitions/p0003.sqlite3: file is not a database`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Writes `contents` to `path` atomically: a temporary file beside it (`NAME.tmp`), then a
/// rename, so a reader (a test waiting for a ready file, a Litestream sidecar) never sees a
/// partial file.
///
/// # Errors
/// The I/O error of the write or the rename.
pub fn write_atomic(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}
