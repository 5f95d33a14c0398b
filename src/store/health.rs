//! Checking a partition file without opening it as a partition: missing, empty, healthy, corrupt
//! or unreadable. Restore before open (DESIGN §6) and a shard group's restart (DESIGN §3) decide
//! on it whether a file is used as it is or restored from its replica.

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

/// What a check of a partition file found (restore before open decides on it, DESIGN §6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileHealth {
    /// No file.
    Missing,
    /// A file of 0 bytes (counts as existing for Litestream, holds nothing).
    Empty,
    /// `PRAGMA quick_check` says ok.
    Healthy,
    /// Not a database, or quick_check found damage.
    Corrupt(String),
    /// The file could not be checked (locked past the busy timeout, out of file descriptors,
    /// permissions): nothing is known about its contents, so it is neither kept nor replaced.
    Unreadable(String),
}

/// Checks a partition file without creating it: missing, empty, healthy, corrupt or unreadable.
/// Blocking (SQLite); run off the async threads.
///
/// The check never checkpoints: its connection may be the file's last one, and SQLite checkpoints
/// (and deletes the WAL) when the last connection closes — which must not happen behind
/// Litestream's back (see [`Checkpointer`](super::Checkpointer)).
pub fn file_health(path: &Path) -> FileHealth {
    match std::fs::metadata(path) {
        Err(_) => return FileHealth::Missing,
        Ok(m) if m.len() == 0 => return FileHealth::Empty,
        Ok(_) => {}
    }
    let check = || -> rusqlite::Result<String> {
        // Read-write without CREATE: never makes a file, and can read a WAL-mode file whose -shm
        // is missing (a read-only connection cannot).
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )?;
        conn.busy_timeout(super::BUSY_TIMEOUT)?;
        conn.query_row("PRAGMA quick_check", [], |r| r.get(0))
    };
    match check() {
        Ok(s) if s == "ok" => FileHealth::Healthy,
        Ok(s) => FileHealth::Corrupt(s),
        Err(e @ rusqlite::Error::SqliteFailure(f, _))
            if matches!(
                f.code,
                rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase
            ) =>
        {
            FileHealth::Corrupt(e.to_string())
        }
        Err(e) => FileHealth::Unreadable(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ownership::PartitionId;
    use crate::store::{Checkpointer, Op, PartitionStore, SessionStart};

    #[test]
    fn checking_a_file_leaves_its_wal_to_litestream() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p0000.sqlite3");
        {
            let mut store =
                PartitionStore::open(&path, PartitionId(0), Checkpointer::Litestream).unwrap();
            // A watermark-only batch after a session start commits a few pages to the WAL.
            let mut s = None;
            let start = Op::Session(SessionStart {
                shard_id: 0,
                shard_total: 1,
                session_id: "a".into(),
                resume_url: String::new(),
                guilds: None,
            });
            store.apply(&mut s, &[start, Op::Watermark(5)]).unwrap();
        }
        let wal = dir.path().join("p0000.sqlite3-wal");
        let before = std::fs::metadata(&wal).unwrap().len();
        assert!(before > 0);
        // The check's connection is the file's last one: closing it must not checkpoint.
        assert_eq!(file_health(&path), FileHealth::Healthy);
        assert_eq!(std::fs::metadata(&wal).unwrap().len(), before);
    }

    #[test]
    fn missing_empty_and_garbage_files_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p0000.sqlite3");
        assert_eq!(file_health(&path), FileHealth::Missing);
        std::fs::write(&path, b"").unwrap();
        assert_eq!(file_health(&path), FileHealth::Empty);
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        assert!(matches!(file_health(&path), FileHealth::Corrupt(_)));
    }
}
