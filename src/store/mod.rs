//! One partition's SQLite file: schema, applying dispatches as rows, and the applied sequence.
//!
//! Everything here is synchronous and blocking. Callers on tokio must run it off the async worker
//! threads (the partition actor uses `spawn_blocking`), because one batch can take milliseconds of
//! disk I/O and a blocked worker stalls every shard's heartbeats (DESIGN §3).
//!
//! The store knows nothing of actors or sockets: it takes an ordered list of [`Op`]s — dispatches
//! already decoded into `twilight-model` types, session starts, watermarks — and commits them in one
//! transaction together with the partition's [`AppliedSession`] (DESIGN §5). That single
//! transaction is what makes apply exactly-once: the data and the sequence that produced it are
//! durable together or not at all.

mod apply;
pub mod health;
mod queries;
pub mod reads;
mod schema;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use twilight_model::gateway::event::DispatchEvent;

use crate::ownership::PartitionId;

pub use health::{FileHealth, file_health};
pub use queries::{GuildCounts, TableCounts};
pub use schema::{MigrateError, SCHEMA_VERSION};

/// How long a write waits for a lock held by another connection (Litestream's checkpoints) before
/// failing: Litestream's documentation asks applications for 5 s.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// SQLite page cache per partition connection, in KiB. SQLite's default (2 MiB) times 64
/// partitions would be most of a pod's memory; writes here are appends and small upserts whose
/// index pages stay hot in 1 MiB (measured in bench/README.md).
pub const PAGE_CACHE_KIB: u32 = 1024;

/// Who moves committed WAL frames into the database file (SQLite's checkpoint) for a partition.
///
/// Litestream reads the WAL to build its replica, so when it replicates a file it must be the only
/// checkpointer. Litestream 0.5.17 builds a damaged replica when the WAL was checkpointed and
/// restarted by someone else while it was not running: a `kill -9` of `litestream replicate`, a few
/// hundred milliseconds of writes with SQLite's autocheckpoint, a restart, and the partition later
/// restored from that replica failed `quick_check` ("Rowid … out of order") in 3 runs of 3; with
/// `Litestream` here it restored exactly in every run (`tests/it/replication.rs`,
/// `litestream_child_killed_after_uploads_leaves_a_restorable_replica`). Upstream tracks this class
/// of bug as benbjohnson/litestream#752 and #1164. Litestream's own guidance for busy writers is the
/// same: `wal_autocheckpoint = 0`, leave checkpoints to Litestream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Checkpointer {
    /// SQLite checkpoints: autocheckpoint (PASSIVE) at 1000 WAL pages and a checkpoint when the
    /// last connection closes. For a partition nothing replicates (`replication.mode = "off"`).
    #[default]
    Sqlite,
    /// Only Litestream checkpoints (PASSIVE every minute or past 1000 pages, TRUNCATE past its
    /// `truncate-page-n`): `wal_autocheckpoint = 0` and `SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE`. While
    /// Litestream is down the WAL grows with every commit and is replicated when it is back.
    Litestream,
}

/// What a partition has applied of one shard's gateway session (DESIGN §5), as committed.
///
/// `applied_seq` is the highest dispatch sequence of session `session_id` whose effects on this
/// partition are durable; a resume from `applied_seq` (Discord's RESUME `seq`) therefore replays
/// nothing this partition has, and skipping `seq <= applied_seq` drops exactly the duplicates.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AppliedSession {
    /// The shard carrying this partition (`partition % shard_total`).
    pub shard_id: u32,
    /// Discord shard total the session was identified with; a session of another total is void.
    pub shard_total: u32,
    /// Discord's `session_id` from READY.
    pub session_id: String,
    /// Discord's `resume_gateway_url` from READY: where a RESUME must go.
    pub resume_url: String,
    /// Highest applied sequence of this session (0 = only the session start).
    pub applied_seq: u64,
}

/// A new gateway session began on the shard (READY after IDENTIFY): sequences restart at 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionStart {
    /// The shard that identified.
    pub shard_id: u32,
    /// The shard total it identified with.
    pub shard_total: u32,
    /// Discord's `session_id`.
    pub session_id: String,
    /// Discord's `resume_gateway_url`.
    pub resume_url: String,
    /// The guilds READY listed for this session that belong to this partition, when READY could
    /// be decoded. Cached guilds not among them are marked unavailable (kept, not deleted): the
    /// bot may have left them while the session was gone, and GUILD_CREATE/GUILD_DELETE will tell.
    pub guilds: Option<Vec<u64>>,
}

/// One step of a partition's input, in the order the shard routed it.
#[derive(Clone, Debug)]
pub enum Op {
    /// A new session starts; the partition's cached guild state becomes stale until GUILD_CREATE,
    /// and guilds absent from the session become unavailable.
    Session(SessionStart),
    /// A decoded dispatch with its gateway sequence number.
    Dispatch {
        /// Discord's `s` for this dispatch, within the current session.
        seq: u64,
        /// The decoded event.
        event: Box<DispatchEvent>,
    },
    /// The shard has routed everything up to this sequence: no dispatch `<= seq` for this
    /// partition is still on its way, so `applied_seq` may advance even in a quiet partition.
    Watermark(u64),
    /// A dispatch that cannot be applied (unknown event type, undecodable payload), kept as
    /// received in `dead_letters`; it advances `applied_seq` like any dispatch.
    DeadLetter(Box<DeadLetter>),
}

/// A delivered dispatch that could not be decoded, as [`Op::DeadLetter`] carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// Discord's `s` for this dispatch, within the current session.
    pub seq: u64,
    /// Discord's `t` (event type name).
    pub kind: String,
    /// `d.guild_id`, when the payload has one.
    pub guild_id: Option<u64>,
    /// The whole gateway frame as received (JSON text).
    pub payload: String,
    /// Why it was not applied (the decoder's error, or "unknown event type").
    pub error: String,
}

impl Op {
    /// A dispatch the gateway delivered, decoded or kept as a dead letter: it carries a sequence
    /// and holds one of the shard's in-flight permits until its batch commits.
    pub fn is_dispatch(&self) -> bool {
        matches!(self, Op::Dispatch { .. } | Op::DeadLetter(_))
    }
}

/// The session a delivered dispatch of sequence `seq` applies under, or `None` when it must be
/// dropped: no session started yet (counted as unsessioned) or `seq <= applied_seq` (a resume
/// replay, counted as a duplicate). The one gate of every [`Op::is_dispatch`] op.
fn admit<'a>(
    next: &'a mut Option<AppliedSession>,
    seq: u64,
    outcome: &mut BatchOutcome,
    partition: PartitionId,
) -> Option<&'a mut AppliedSession> {
    let Some(current) = next.as_mut() else {
        outcome.unsessioned += 1;
        tracing::warn!(%partition, seq, "dispatch before any session start; dropped");
        return None;
    };
    if seq <= current.applied_seq {
        outcome.duplicates += 1;
        return None;
    }
    Some(current)
}

/// What one [`PartitionStore::apply`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Dispatches whose effects were written (possibly a no-op upsert of identical data).
    pub applied: u64,
    /// Dispatches dropped because `seq <= applied_seq` (a resume replay of what is already here).
    pub duplicates: u64,
    /// Dispatches of kinds this store does not keep (still advance `applied_seq`).
    pub ignored: u64,
    /// Dispatches that arrived with no session started (cannot be placed; dropped and logged).
    pub unsessioned: u64,
    /// MESSAGE_CREATEs that produced a new row (and so counted in `message_stats`).
    pub new_messages: u64,
    /// Dispatches kept in `dead_letters` (not duplicates).
    pub dead_letters: u64,
}

/// Errors of the partition store. Variants name the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file could not be opened or configured (missing directory, not a database, locked).
    #[error("cannot open partition file {path}")]
    Open {
        /// The file or directory involved.
        path: PathBuf,
        #[source]
        /// The underlying error.
        source: rusqlite::Error,
    },
    /// The file's schema could not be brought to this build's version.
    #[error("cannot migrate partition file {path}")]
    Migrate {
        /// The file or directory involved.
        path: PathBuf,
        #[source]
        /// The underlying error.
        source: MigrateError,
    },
    /// A batch failed; the transaction rolled back, so nothing of it (and no sequence) is stored.
    #[error("cannot apply batch to partition {partition}")]
    Apply {
        /// The partition involved.
        partition: PartitionId,
        #[source]
        /// The underlying error.
        source: rusqlite::Error,
    },
    /// A read query failed.
    #[error("cannot query partition {partition}")]
    Query {
        /// The partition involved.
        partition: PartitionId,
        #[source]
        /// The underlying error.
        source: rusqlite::Error,
    },
}

/// One open partition file, owned by exactly one writer (the partition actor).
///
/// `Connection` is `Send` but not `Sync`: the store moves between blocking threads with its owner
/// and is never shared.
pub struct PartitionStore {
    conn: Connection,
    partition: PartitionId,
    path: PathBuf,
}

impl std::fmt::Debug for PartitionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionStore")
            .field("partition", &self.partition)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl PartitionStore {
    /// The file of `partition` under `data_dir`: `data_dir/partitions/p{id:04}.sqlite3` (DESIGN §4).
    pub fn path_in(data_dir: &Path, partition: PartitionId) -> PathBuf {
        data_dir.join("partitions").join(partition.file_name())
    }

    /// Opens (creating if absent) the partition file at `path` for writing, in WAL mode with
    /// `synchronous=NORMAL` and a 5 s busy timeout (Litestream's requirements), and migrates it.
    ///
    /// The parent directory must exist. `checkpointer` says who checkpoints the WAL (see
    /// [`Checkpointer`]); the app itself never forces a checkpoint.
    ///
    /// # Errors
    /// [`StoreError::Open`] if SQLite cannot open the file or it is not a database;
    /// [`StoreError::Migrate`] if the schema is newer than this build or a step fails.
    pub fn open(
        path: &Path,
        partition: PartitionId,
        checkpointer: Checkpointer,
    ) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let mut conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(open_err(rusqlite::Error::InvalidParameterName(format!(
                "journal_mode is {mode}, expected wal"
            ))));
        }
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        // Negative: KiB rather than pages (SQLite's convention).
        conn.pragma_update(None, "cache_size", -i64::from(PAGE_CACHE_KIB))
            .map_err(open_err)?;
        if checkpointer == Checkpointer::Litestream {
            conn.pragma_update(None, "wal_autocheckpoint", 0)
                .map_err(open_err)?;
            conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
                .map_err(open_err)?;
        }
        conn.set_prepared_statement_cache_capacity(64);
        schema::migrate(&mut conn).map_err(|source| StoreError::Migrate {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            conn,
            partition,
            path: path.to_owned(),
        })
    }

    /// Opens an existing partition file read-only (inspection, verification); no migration.
    ///
    /// # Errors
    /// [`StoreError::Open`] if the file is missing or not a database.
    pub fn open_read_only(path: &Path, partition: PartitionId) -> Result<Self, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|source| StoreError::Open {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            conn,
            partition,
            path: path.to_owned(),
        })
    }

    /// The partition this file holds.
    pub fn partition(&self) -> PartitionId {
        self.partition
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records that this file is written under lease epoch `epoch` from now on (DESIGN §7), so
    /// a later start can tell a stale file from a current one ([`Self::recorded_epoch`]).
    ///
    /// # Errors
    /// [`StoreError::Query`] if SQLite fails (a read-only handle, a full disk).
    pub fn record_epoch(&mut self, epoch: u64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO lease_epoch (id, epoch) VALUES (0, ?1)
                 ON CONFLICT (id) DO UPDATE SET epoch = excluded.epoch",
                params![i64::try_from(epoch).unwrap_or(i64::MAX)],
            )
            .map(drop)
            .map_err(|source| self.query_err(source))
    }

    /// The lease epoch this file was last opened for writing under; 0 for a file that never
    /// recorded one (written before epochs, or without replication).
    ///
    /// # Errors
    /// [`StoreError::Query`] if SQLite fails.
    pub fn recorded_epoch(&self) -> Result<u64, StoreError> {
        let has_table: bool = self
            .conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'lease_epoch')",
                [],
                |r| r.get(0),
            )
            .map_err(|source| self.query_err(source))?;
        if !has_table {
            return Ok(0);
        }
        self.conn
            .query_row("SELECT epoch FROM lease_epoch WHERE id = 0", [], |r| {
                r.get::<_, i64>(0)
            })
            .optional()
            .map(|e| e.map_or(0, |e| u64::try_from(e).unwrap_or(0)))
            .map_err(|source| self.query_err(source))
    }

    /// The committed session of `shard_id` at `shard_total`, if any.
    ///
    /// A row written under another shard total (before resharding) is not returned: that session
    /// cannot be resumed with the current sharding.
    ///
    /// # Errors
    /// [`StoreError::Query`] if SQLite fails.
    pub fn applied_session(
        &self,
        shard_id: u32,
        shard_total: u32,
    ) -> Result<Option<AppliedSession>, StoreError> {
        self.conn
            .query_row(
                "SELECT session_id, resume_url, applied_seq FROM shard_session
                 WHERE shard_id = ?1 AND shard_total = ?2",
                params![shard_id, shard_total],
                |r| {
                    Ok(AppliedSession {
                        shard_id,
                        shard_total,
                        session_id: r.get(0)?,
                        resume_url: r.get(1)?,
                        applied_seq: r.get::<_, i64>(2)? as u64,
                    })
                },
            )
            .optional()
            .map_err(|source| self.query_err(source))
    }

    /// Applies `ops` in order, in one `BEGIN IMMEDIATE` transaction, starting from `session`
    /// (the partition's current applied session), and commits the resulting session row with them.
    ///
    /// Rules (DESIGN §5): a dispatch with `seq <= applied_seq` of the current session is a
    /// duplicate and is skipped; every write is idempotent by Discord id, and `message_stats`
    /// changes only when a message row is new. On success `session` holds what was committed.
    ///
    /// # Errors
    /// [`StoreError::Apply`]: the transaction rolled back; neither data nor `session` changed.
    pub fn apply(
        &mut self,
        session: &mut Option<AppliedSession>,
        ops: &[Op],
    ) -> Result<BatchOutcome, StoreError> {
        let partition = self.partition;
        let err = |source| StoreError::Apply { partition, source };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let mut next = session.clone();
        let mut outcome = BatchOutcome::default();
        let mut session_dirty = false;
        for op in ops {
            match op {
                Op::Session(start) => {
                    next = Some(AppliedSession {
                        shard_id: start.shard_id,
                        shard_total: start.shard_total,
                        session_id: start.session_id.clone(),
                        resume_url: start.resume_url.clone(),
                        applied_seq: 0,
                    });
                    apply::session_started(&tx, start.guilds.as_deref()).map_err(err)?;
                    session_dirty = true;
                }
                Op::Dispatch { seq, event } => {
                    let Some(current) = admit(&mut next, *seq, &mut outcome, partition) else {
                        continue;
                    };
                    match apply::dispatch(&tx, event).map_err(err)? {
                        apply::Applied::Stored { new_message } => {
                            outcome.applied += 1;
                            outcome.new_messages += u64::from(new_message);
                        }
                        apply::Applied::Ignored => outcome.ignored += 1,
                    }
                    current.applied_seq = *seq;
                    session_dirty = true;
                }
                Op::DeadLetter(letter) => {
                    let Some(current) = admit(&mut next, letter.seq, &mut outcome, partition)
                    else {
                        continue;
                    };
                    apply::dead_letter(&tx, &current.session_id, letter).map_err(err)?;
                    outcome.dead_letters += 1;
                    current.applied_seq = letter.seq;
                    session_dirty = true;
                }
                Op::Watermark(seq) => {
                    if let Some(current) = next.as_mut().filter(|c| *seq > c.applied_seq) {
                        current.applied_seq = *seq;
                        session_dirty = true;
                    }
                }
            }
        }
        if session_dirty && let Some(s) = &next {
            tx.prepare_cached(
                "INSERT INTO shard_session (shard_id, shard_total, session_id, resume_url, applied_seq)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (shard_id) DO UPDATE SET shard_total = excluded.shard_total,
                    session_id = excluded.session_id, resume_url = excluded.resume_url,
                    applied_seq = excluded.applied_seq",
            )
            .and_then(|mut st| {
                st.execute(params![
                    s.shard_id,
                    s.shard_total,
                    s.session_id,
                    s.resume_url,
                    s.applied_seq as i64
                ])
            })
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        *session = next;
        Ok(outcome)
    }

    fn query_err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Query {
            partition: self.partition,
            source,
        }
    }
}

#[cfg(test)]
mod tests;
