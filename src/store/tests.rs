//! Store behaviour on a real file: idempotent apply, applied sequence, session starts.

use serde::de::DeserializeSeed;
use twilight_model::gateway::event::{DispatchEvent, DispatchEventWithTypeDeserializer};

use super::*;

const GUILD: u64 = 1_000_000 << 22;
const CHANNEL: u64 = GUILD + 1;

fn event(kind: &str, json: &str) -> DispatchEvent {
    DispatchEventWithTypeDeserializer::new(kind)
        .deserialize(&mut serde_json::Deserializer::from_str(json))
        .unwrap_or_else(|e| panic!("fixture {kind}: {e}"))
}

fn message_json(id: u64, content: &str) -> String {
    format!(
        r#"{{"id":"{id}","channel_id":"{CHANNEL}","guild_id":"{GUILD}",
        "author":{{"id":"77","username":"alice","discriminator":"0","avatar":null}},
        "content":"{content}","timestamp":"2024-05-01T12:34:56.789000+00:00","edited_timestamp":null,
        "tts":false,"mention_everyone":false,"mentions":[],"mention_roles":[],"attachments":[],
        "embeds":[],"pinned":false,"type":0,"flags":0}}"#
    )
}

fn create(seq: u64, id: u64) -> Op {
    Op::Dispatch {
        seq,
        event: Box::new(event("MESSAGE_CREATE", &message_json(id, "hi"))),
    }
}

fn guild_create(seq: u64, channels: &[u64]) -> Op {
    let channels: Vec<String> = channels
        .iter()
        .map(|c| format!(r#"{{"id":"{c}","type":0,"name":"c{c}","position":0}}"#))
        .collect();
    let json = format!(
        r#"{{"id":"{GUILD}","name":"g","owner_id":"77","afk_timeout":300,
        "default_message_notifications":0,"explicit_content_filter":0,"features":[],"mfa_level":0,
        "nsfw_level":0,"preferred_locale":"en-US","premium_progress_bar_enabled":false,
        "system_channel_flags":0,"verification_level":0,"channels":[{}],
        "roles":[{{"id":"{GUILD}","name":"@everyone","color":0,
            "colors":{{"primary_color":0,"secondary_color":null,"tertiary_color":null}},
            "hoist":false,"managed":false,"mentionable":false,"permissions":"0","position":0,"flags":0}}],
        "members":[{{"user":{{"id":"77","username":"alice","discriminator":"0","avatar":null}},
            "roles":[],"deaf":false,"mute":false,"flags":0,"joined_at":"2024-01-01T00:00:00+00:00"}}]}}"#,
        channels.join(",")
    );
    Op::Dispatch {
        seq,
        event: Box::new(event("GUILD_CREATE", &json)),
    }
}

fn session(id: &str) -> Op {
    session_with(id, vec![GUILD])
}

fn session_with(id: &str, guilds: Vec<u64>) -> Op {
    Op::Session(SessionStart {
        shard_id: 0,
        shard_total: 1,
        session_id: id.into(),
        resume_url: "ws://127.0.0.1:1".into(),
        guilds: Some(guilds),
    })
}

fn open(dir: &tempfile::TempDir) -> PartitionStore {
    PartitionStore::open(
        &dir.path().join("p0000.sqlite3"),
        PartitionId(0),
        Checkpointer::Sqlite,
    )
    .unwrap()
}

#[test]
fn message_is_stored_once_across_replays_and_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    let mut s = None;
    let out = store
        .apply(&mut s, &[session("a"), create(1, 10), create(2, 11)])
        .unwrap();
    assert_eq!((out.applied, out.new_messages), (2, 2));
    // A resume replay of seq 2 and a new dispatch.
    let out = store
        .apply(&mut s, &[create(2, 11), create(3, 12)])
        .unwrap();
    assert_eq!((out.duplicates, out.new_messages), (1, 1));
    // A new session re-sends message 10 under another seq: the row exists, stats do not move.
    let out = store.apply(&mut s, &[session("b"), create(1, 10)]).unwrap();
    assert_eq!((out.applied, out.new_messages), (1, 0));
    let c = store.counts().unwrap();
    assert_eq!((c.messages, c.message_stats_total), (3, 3));
    assert_eq!(store.message_ids().unwrap(), vec![10, 11, 12]);
}

#[test]
fn applied_session_is_committed_with_the_data_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = None;
    {
        let mut store = open(&dir);
        store
            .apply(&mut s, &[session("a"), create(5, 10), Op::Watermark(9)])
            .unwrap();
        assert_eq!(s.as_ref().unwrap().applied_seq, 9);
        // A watermark never moves the sequence backwards.
        store.apply(&mut s, &[Op::Watermark(3)]).unwrap();
    }
    let store = open(&dir);
    let got = store.applied_session(0, 1).unwrap().unwrap();
    assert_eq!(got, s.unwrap());
    assert_eq!(got.applied_seq, 9);
    assert_eq!(got.session_id, "a");
    // Another shard total means another sharding: that session cannot be resumed.
    assert_eq!(store.applied_session(0, 2).unwrap(), None);
}

#[test]
fn dispatch_without_session_is_dropped_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    let mut s = None;
    let out = store.apply(&mut s, &[create(1, 10)]).unwrap();
    assert_eq!(out.unsessioned, 1);
    assert_eq!(store.counts().unwrap().messages, 0);
    assert_eq!(s, None);
}

#[test]
fn guild_create_replaces_channels_and_clears_stale() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    let mut s = None;
    store
        .apply(
            &mut s,
            &[session("a"), guild_create(1, &[CHANNEL, CHANNEL + 1])],
        )
        .unwrap();
    store.apply(&mut s, &[session("b")]).unwrap();
    let g = store.guild_counts().unwrap()[0];
    assert!(g.stale, "a new session makes cached guilds stale");
    store
        .apply(&mut s, &[guild_create(1, &[CHANNEL + 2])])
        .unwrap();
    let g = store.guild_counts().unwrap()[0];
    assert_eq!((g.channels, g.roles, g.members, g.stale), (1, 1, 1, false));
}

#[test]
fn update_and_delete_change_the_row_not_the_stats() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    let mut s = None;
    let edited = message_json(10, "edited").replace(
        r#""edited_timestamp":null"#,
        r#""edited_timestamp":"2024-05-01T13:00:00+00:00""#,
    );
    let delete = format!(r#"{{"id":"10","channel_id":"{CHANNEL}","guild_id":"{GUILD}"}}"#);
    store
        .apply(
            &mut s,
            &[
                session("a"),
                create(1, 10),
                Op::Dispatch {
                    seq: 2,
                    event: Box::new(event("MESSAGE_UPDATE", &edited)),
                },
                Op::Dispatch {
                    seq: 3,
                    event: Box::new(event("MESSAGE_DELETE", &delete)),
                },
            ],
        )
        .unwrap();
    let content: String = store
        .conn
        .query_row("SELECT content FROM messages WHERE id = 10", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(content, "edited");
    let c = store.counts().unwrap();
    assert_eq!(
        (c.messages, c.messages_deleted, c.message_stats_total),
        (1, 1, 1)
    );
}

#[test]
fn a_file_that_is_not_a_database_is_a_clear_open_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p0000.sqlite3");
    std::fs::write(&path, vec![0x42; 8192]).unwrap();
    let err = PartitionStore::open(&path, PartitionId(0), Checkpointer::Sqlite).unwrap_err();
    assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
    assert!(err.to_string().contains("p0000.sqlite3"));
    // Nothing was written over the bad file.
    assert_eq!(std::fs::read(&path).unwrap(), vec![0x42; 8192]);
}

#[test]
fn a_guild_absent_from_a_new_session_becomes_unavailable_not_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    let mut s = None;
    store
        .apply(
            &mut s,
            &[session("a"), guild_create(1, &[CHANNEL]), create(2, 10)],
        )
        .unwrap();
    store.apply(&mut s, &[session_with("b", vec![])]).unwrap();
    let g = store.guild_counts().unwrap()[0];
    assert!(g.unavailable && g.stale, "{g:?}");
    assert_eq!((g.channels, g.messages), (1, 1), "nothing was deleted");
    // Discord sends the guild again: available and fresh.
    store.apply(&mut s, &[guild_create(1, &[CHANNEL])]).unwrap();
    let g = store.guild_counts().unwrap()[0];
    assert!(!g.unavailable && !g.stale, "{g:?}");
}

/// Writes `n` messages of about 4 KiB each (one WAL page per row, at least) in batches of 100.
fn write_large_messages(store: &mut PartitionStore, n: u64) {
    let mut s = None;
    store.apply(&mut s, &[session("a")]).unwrap();
    let content = "x".repeat(4000);
    for batch in 0..n / 100 {
        let ops: Vec<Op> = (1..=100)
            .map(|i| {
                let seq = batch * 100 + i;
                Op::Dispatch {
                    seq,
                    event: Box::new(event("MESSAGE_CREATE", &message_json(seq, &content))),
                }
            })
            .collect();
        store.apply(&mut s, &ops).unwrap();
    }
}

#[test]
fn with_litestream_checkpointing_the_app_never_checkpoints_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p0000.sqlite3");
    let wal = dir.path().join("p0000.sqlite3-wal");
    {
        let mut store =
            PartitionStore::open(&path, PartitionId(0), Checkpointer::Litestream).unwrap();
        // 1,500 rows of 4 KB: well past SQLite's 1,000-page autocheckpoint.
        write_large_messages(&mut store, 1_500);
    }
    // Closed, and still every frame in the WAL: neither autocheckpoint nor close moved them.
    let wal_bytes = std::fs::metadata(&wal).unwrap().len();
    assert!(wal_bytes > 1_500 * 4096, "WAL has only {wal_bytes} bytes");
    assert!(std::fs::metadata(&path).unwrap().len() < 1024 * 1024);
    let store = PartitionStore::open(&path, PartitionId(0), Checkpointer::Litestream).unwrap();
    assert_eq!(store.counts().unwrap().messages, 1_500);
}

#[test]
fn with_sqlite_checkpointing_close_moves_the_wal_into_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p0000.sqlite3");
    {
        let mut store = PartitionStore::open(&path, PartitionId(0), Checkpointer::Sqlite).unwrap();
        write_large_messages(&mut store, 1_500);
    }
    assert!(!dir.path().join("p0000.sqlite3-wal").exists());
    assert!(std::fs::metadata(&path).unwrap().len() > 1_500 * 4096);
}

#[test]
fn a_dead_letter_is_kept_once_and_advances_the_applied_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    let mut s = None;
    let letter = |seq| {
        Op::DeadLetter(Box::new(DeadLetter {
            seq,
            kind: "SOME_NEW_EVENT".into(),
            guild_id: Some(GUILD),
            payload: r#"{"op":0,"s":2,"t":"SOME_NEW_EVENT","d":{}}"#.into(),
            error: "unknown event type".into(),
        }))
    };
    let out = store
        .apply(&mut s, &[session("a"), create(1, 10), letter(2)])
        .unwrap();
    assert_eq!((out.applied, out.dead_letters), (1, 1));
    assert_eq!(s.as_ref().unwrap().applied_seq, 2);
    // A resume replay of seq 2 is a duplicate, not a second row.
    let out = store.apply(&mut s, &[letter(2), create(3, 11)]).unwrap();
    assert_eq!((out.duplicates, out.dead_letters), (1, 0));
    assert_eq!(store.counts().unwrap().dead_letters, 1);
}

#[test]
fn the_recorded_lease_epoch_survives_reopening_and_is_zero_for_older_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p0000.sqlite3");
    {
        let store = open(&dir);
        assert_eq!(store.recorded_epoch().unwrap(), 0);
    }
    {
        let mut store = open(&dir);
        store.record_epoch(7).unwrap();
        store.record_epoch(12).unwrap();
    }
    let store = PartitionStore::open_read_only(&path, PartitionId(0)).unwrap();
    assert_eq!(store.recorded_epoch().unwrap(), 12);
    drop(store);
    // A file from before schema version 3 has no lease_epoch table: it recorded nothing.
    let old = dir.path().join("old.sqlite3");
    rusqlite::Connection::open(&old)
        .unwrap()
        .execute_batch("PRAGMA user_version = 2; CREATE TABLE shard_session (x);")
        .unwrap();
    let store = PartitionStore::open_read_only(&old, PartitionId(0)).unwrap();
    assert_eq!(store.recorded_epoch().unwrap(), 0);
}
