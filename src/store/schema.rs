//! The partition file's schema, as an ordered list of migrations.
//!
//! The schema version lives in SQLite's own `PRAGMA user_version`, so a file says which migrations
//! it has without a bookkeeping table. Migrations only ever append: a released step is never edited,
//! because restored replicas carry the version they were written with.

use rusqlite::Connection;

/// One schema step: the version it produces and the SQL that gets there from the version before.
struct Migration {
    version: u32,
    sql: &'static str,
}

/// Every migration, in order. `version` must be `index + 1`.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: r"
        -- The Discord entity cache. Ids are Discord snowflakes stored as INTEGER (they fit in i64).
        CREATE TABLE guilds (
            id           INTEGER PRIMARY KEY,
            name         TEXT    NOT NULL,
            owner_id     INTEGER NOT NULL,
            member_count INTEGER,
            -- 1 while Discord reports the guild unavailable (outage, or absent from a new session)
            unavailable  INTEGER NOT NULL DEFAULT 0,
            -- 1 after the shard identified again, until GUILD_CREATE refreshes the guild
            stale        INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE channels (
            id        INTEGER PRIMARY KEY,
            guild_id  INTEGER NOT NULL,
            kind      INTEGER NOT NULL,
            name      TEXT,
            position  INTEGER,
            parent_id INTEGER
        );
        CREATE INDEX channels_by_guild ON channels (guild_id);
        CREATE TABLE roles (
            id          INTEGER PRIMARY KEY,
            guild_id    INTEGER NOT NULL,
            name        TEXT    NOT NULL,
            color       INTEGER NOT NULL,
            position    INTEGER NOT NULL,
            permissions INTEGER NOT NULL
        );
        CREATE INDEX roles_by_guild ON roles (guild_id);
        CREATE TABLE users (
            id          INTEGER PRIMARY KEY,
            username    TEXT    NOT NULL,
            global_name TEXT,
            bot         INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE members (
            guild_id  INTEGER NOT NULL,
            user_id   INTEGER NOT NULL,
            nick      TEXT,
            -- microseconds since the Unix epoch
            joined_at INTEGER,
            -- JSON array of role ids, as Discord sends them
            roles     TEXT    NOT NULL,
            PRIMARY KEY (guild_id, user_id)
        ) WITHOUT ROWID;
        -- Messages, keyed by the Discord message id: a redelivered MESSAGE_CREATE finds its row.
        CREATE TABLE messages (
            id         INTEGER PRIMARY KEY,
            guild_id   INTEGER,
            channel_id INTEGER NOT NULL,
            author_id  INTEGER NOT NULL,
            content    TEXT    NOT NULL,
            -- microseconds since the Unix epoch
            created_at INTEGER NOT NULL,
            edited_at  INTEGER,
            -- set by MESSAGE_DELETE: the row is kept so history and stats stay explainable
            deleted    INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX messages_by_channel ON messages (channel_id, id);
        -- Activity: messages posted per guild, channel, author and UTC day (days since 1970-01-01).
        -- Counted once per new message row; deletes do not decrement (it counts activity).
        CREATE TABLE message_stats (
            guild_id   INTEGER NOT NULL,
            channel_id INTEGER NOT NULL,
            user_id    INTEGER NOT NULL,
            day        INTEGER NOT NULL,
            messages   INTEGER NOT NULL,
            PRIMARY KEY (guild_id, channel_id, user_id, day)
        ) WITHOUT ROWID;
        -- What this partition has applied of its shard's gateway session (DESIGN §5). One row per
        -- shard that ever carried this partition; written in the same transaction as the data.
        CREATE TABLE shard_session (
            shard_id    INTEGER PRIMARY KEY,
            shard_total INTEGER NOT NULL,
            session_id  TEXT    NOT NULL,
            resume_url  TEXT    NOT NULL,
            applied_seq INTEGER NOT NULL
        );
    ",
    },
    Migration {
        version: 2,
        sql: r"
        -- Dispatches that were delivered but could not be applied: an event type twilight-model
        -- does not know (Discord adds events), or a payload it cannot decode. Kept as received,
        -- in the same transaction that advances applied_seq past them, so nothing the gateway
        -- delivered is lost and a replay does not store them twice.
        CREATE TABLE dead_letters (
            session_id  TEXT    NOT NULL,
            seq         INTEGER NOT NULL,
            kind        TEXT    NOT NULL,  -- the dispatch's `t`
            guild_id    INTEGER,           -- `d.guild_id`, when the payload has one
            payload     TEXT    NOT NULL,  -- the whole gateway frame, as received
            error       TEXT    NOT NULL,  -- why it was not applied
            received_ms INTEGER NOT NULL,  -- Unix time, milliseconds
            PRIMARY KEY (session_id, seq)
        ) WITHOUT ROWID;
    ",
    },
    Migration {
        version: 3,
        sql: r"
        -- The lease epoch under which this file was last opened for writing (DESIGN §7). A
        -- healthy file that says an older epoch than the newest replica generation with data
        -- was written before another holder took the partition over: it is stale, and is
        -- restored instead of kept. One row.
        CREATE TABLE lease_epoch (
            id    INTEGER PRIMARY KEY CHECK (id = 0),
            epoch INTEGER NOT NULL
        );
    ",
    },
];

/// The schema version this build writes: the last migration's.
pub const SCHEMA_VERSION: u32 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// What [`migrate`] found wrong.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The file was written by a newer shardlite; opening it would risk writing rows it cannot read.
    #[error("schema version {found} is newer than this build's {supported}")]
    TooNew {
        /// The version found in the file.
        found: u32,
        /// This build's version.
        supported: u32,
    },
    /// SQLite refused a statement.
    #[error("migration to schema version {version} failed")]
    Step {
        /// The schema version being migrated to.
        version: u32,
        #[source]
        /// The underlying error.
        source: rusqlite::Error,
    },
}

/// Brings `conn` up to [`SCHEMA_VERSION`], each step in its own transaction.
///
/// # Errors
/// [`MigrateError::TooNew`] for a file from a newer build; [`MigrateError::Step`] if SQLite
/// rejects a step (the file keeps the version it had before that step).
pub fn migrate(conn: &mut Connection) -> Result<(), MigrateError> {
    let step_err = |version| move |source| MigrateError::Step { version, source };
    let found: u32 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(step_err(0))?;
    if found > SCHEMA_VERSION {
        return Err(MigrateError::TooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for m in MIGRATIONS.iter().filter(|m| m.version > found) {
        let tx = conn.transaction().map_err(step_err(m.version))?;
        tx.execute_batch(m.sql).map_err(step_err(m.version))?;
        tx.pragma_update(None, "user_version", m.version)
            .map_err(step_err(m.version))?;
        tx.commit().map_err(step_err(m.version))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_consecutive() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1);
        }
    }

    #[test]
    fn migrate_is_idempotent_and_refuses_newer_files() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        migrate(&mut conn).unwrap();
        let v: u32 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        assert!(matches!(
            migrate(&mut conn),
            Err(MigrateError::TooNew { .. })
        ));
    }
}
