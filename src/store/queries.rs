//! Read queries over one partition: table sizes and per-guild entity counts.

use rusqlite::params;

use super::{PartitionStore, StoreError};

/// Row counts of one partition file, as the demo and tests report them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TableCounts {
    /// Cached guild rows.
    pub guilds: u64,
    /// Channel rows.
    pub channels: u64,
    /// Role rows.
    pub roles: u64,
    /// User rows.
    pub users: u64,
    /// Member rows.
    pub members: u64,
    /// Message rows, deleted ones included.
    pub messages: u64,
    /// Message rows marked deleted by MESSAGE_DELETE.
    pub messages_deleted: u64,
    /// Rows of `message_stats` (guild, channel, user, day).
    pub message_stats_rows: u64,
    /// Sum of `message_stats.messages`: equals `messages` of guild channels when every message was
    /// counted exactly once.
    pub message_stats_total: u64,
    /// Rows of `dead_letters`: delivered dispatches that could not be applied.
    #[serde(default)]
    pub dead_letters: u64,
}

impl std::ops::AddAssign for TableCounts {
    fn add_assign(&mut self, o: Self) {
        self.guilds += o.guilds;
        self.channels += o.channels;
        self.roles += o.roles;
        self.users += o.users;
        self.members += o.members;
        self.messages += o.messages;
        self.messages_deleted += o.messages_deleted;
        self.message_stats_rows += o.message_stats_rows;
        self.message_stats_total += o.message_stats_total;
        self.dead_letters += o.dead_letters;
    }
}

/// Cached entities and messages of one guild.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuildCounts {
    /// The guild.
    pub guild_id: u64,
    /// Channel rows.
    pub channels: u32,
    /// Role rows.
    pub roles: u32,
    /// Member rows.
    pub members: u32,
    /// Message rows of the guild, deleted ones included.
    pub messages: u32,
    /// Message rows marked deleted.
    pub messages_deleted: u32,
    /// Sum of the guild's `message_stats.messages`.
    pub message_stats_total: u32,
    /// Cached state predates the current session (DESIGN §5).
    pub stale: bool,
    /// Discord reports the guild unavailable, or the session did not list it.
    pub unavailable: bool,
}

impl PartitionStore {
    /// Row counts of every table.
    ///
    /// # Errors
    /// [`StoreError::Query`] if SQLite fails.
    pub fn counts(&self) -> Result<TableCounts, StoreError> {
        self.conn
            .query_row(
                "SELECT (SELECT count(*) FROM guilds), (SELECT count(*) FROM channels),
                        (SELECT count(*) FROM roles), (SELECT count(*) FROM users),
                        (SELECT count(*) FROM members), (SELECT count(*) FROM messages),
                        (SELECT count(*) FROM messages WHERE deleted = 1),
                        (SELECT count(*) FROM message_stats),
                        (SELECT coalesce(sum(messages), 0) FROM message_stats),
                        (SELECT count(*) FROM dead_letters)",
                [],
                |r| {
                    let n = |i| r.get::<_, i64>(i).map(|v| v as u64);
                    Ok(TableCounts {
                        guilds: n(0)?,
                        channels: n(1)?,
                        roles: n(2)?,
                        users: n(3)?,
                        members: n(4)?,
                        messages: n(5)?,
                        messages_deleted: n(6)?,
                        message_stats_rows: n(7)?,
                        message_stats_total: n(8)?,
                        dead_letters: n(9)?,
                    })
                },
            )
            .map_err(|e| self.query_err(e))
    }

    /// Entity and message counts of every cached guild, ordered by guild id.
    ///
    /// # Errors
    /// [`StoreError::Query`] if SQLite fails.
    pub fn guild_counts(&self) -> Result<Vec<GuildCounts>, StoreError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT g.id,
                    (SELECT count(*) FROM channels c WHERE c.guild_id = g.id),
                    (SELECT count(*) FROM roles r WHERE r.guild_id = g.id),
                    (SELECT count(*) FROM members m WHERE m.guild_id = g.id),
                    (SELECT count(*) FROM messages m WHERE m.guild_id = g.id),
                    (SELECT count(*) FROM messages m WHERE m.guild_id = g.id AND m.deleted = 1),
                    (SELECT coalesce(sum(s.messages), 0) FROM message_stats s WHERE s.guild_id = g.id),
                    g.stale, g.unavailable
                 FROM guilds g ORDER BY g.id",
            )
            .map_err(|e| self.query_err(e))?;
        let rows = st
            .query_map(params![], |r| {
                Ok(GuildCounts {
                    guild_id: r.get::<_, i64>(0)? as u64,
                    channels: r.get(1)?,
                    roles: r.get(2)?,
                    members: r.get(3)?,
                    messages: r.get(4)?,
                    messages_deleted: r.get(5)?,
                    message_stats_total: r.get(6)?,
                    stale: r.get(7)?,
                    unavailable: r.get(8)?,
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.query_err(e))?;
        Ok(rows)
    }

    /// Every message id in the partition, ascending (for exactly-once verification).
    ///
    /// # Errors
    /// [`StoreError::Query`] if SQLite fails.
    pub fn message_ids(&self) -> Result<Vec<u64>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT id FROM messages ORDER BY id")
            .map_err(|e| self.query_err(e))?;
        st.query_map([], |r| r.get::<_, i64>(0).map(|v| v as u64))
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.query_err(e))
    }
}
