//! What the guild API reads from one partition (DESIGN §8): a guild with its channels and roles,
//! a member, a page of messages, message activity. Run on a read-only connection
//! ([`PartitionStore::open_read_only`]); none of it writes.
//!
//! Ids serialise as decimal strings, as Discord's JSON does (snowflakes exceed 2^53, the largest
//! integer a JSON number keeps exactly in JavaScript).

use rusqlite::{OptionalExtension as _, params};
use serde::Serialize;

use super::{PartitionStore, StoreError};

/// Serialises a snowflake as a decimal string (Discord's JSON convention).
fn id_string<S: serde::Serializer>(id: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(id)
}

/// Serialises an optional snowflake as a decimal string or `null`.
fn opt_id_string<S: serde::Serializer>(id: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match id {
        Some(id) => s.collect_str(id),
        None => s.serialize_none(),
    }
}

/// A cached guild with its channels and roles.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct GuildView {
    /// The guild id.
    #[serde(serialize_with = "id_string")]
    pub id: u64,
    /// Its name.
    pub name: String,
    /// The owner's user id.
    #[serde(serialize_with = "id_string")]
    pub owner_id: u64,
    /// Discord's `member_count` from GUILD_CREATE, if it sent one.
    pub member_count: Option<u64>,
    /// Member rows cached for the guild.
    pub members_cached: u64,
    /// Discord reports the guild unavailable (an outage, or the session did not list it).
    pub unavailable: bool,
    /// The cached state predates the current session until GUILD_CREATE refreshes it
    /// (DESIGN §5).
    pub stale: bool,
    /// Channels, by position then id.
    pub channels: Vec<ChannelView>,
    /// Roles, by position then id; `@everyone` has the guild's id.
    pub roles: Vec<RoleView>,
}

/// A cached channel.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ChannelView {
    /// The channel id.
    #[serde(serialize_with = "id_string")]
    pub id: u64,
    /// Discord's channel type number (0 text, 2 voice, 4 category, …).
    #[serde(rename = "type")]
    pub kind: i64,
    /// Its name, if it has one.
    pub name: Option<String>,
    /// Sort position.
    pub position: Option<i64>,
    /// The category it sits in.
    #[serde(serialize_with = "opt_id_string")]
    pub parent_id: Option<u64>,
}

/// A cached role.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct RoleView {
    /// The role id.
    #[serde(serialize_with = "id_string")]
    pub id: u64,
    /// Its name.
    pub name: String,
    /// RGB colour as an integer.
    pub color: i64,
    /// Sort position.
    pub position: i64,
    /// Permission bits, as a decimal string (Discord's convention: they exceed 2^53).
    pub permissions: String,
}

/// A cached guild member with its user.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct MemberView {
    /// The guild.
    #[serde(serialize_with = "id_string")]
    pub guild_id: u64,
    /// The user.
    #[serde(serialize_with = "id_string")]
    pub user_id: u64,
    /// The user's name, if the user row is cached.
    pub username: Option<String>,
    /// The user's display name.
    pub global_name: Option<String>,
    /// The user is a bot.
    pub bot: bool,
    /// The guild nickname.
    pub nick: Option<String>,
    /// When the member joined, microseconds since the Unix epoch.
    pub joined_at_us: Option<i64>,
    /// Role ids, as Discord sent them.
    pub roles: Vec<String>,
}

/// A stored message.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct MessageView {
    /// The message id.
    #[serde(serialize_with = "id_string")]
    pub id: u64,
    /// Its channel.
    #[serde(serialize_with = "id_string")]
    pub channel_id: u64,
    /// Its author.
    #[serde(serialize_with = "id_string")]
    pub author_id: u64,
    /// The content.
    pub content: String,
    /// Creation time, microseconds since the Unix epoch.
    pub created_at_us: i64,
    /// Last edit time, microseconds since the Unix epoch.
    pub edited_at_us: Option<i64>,
    /// Deleted by MESSAGE_DELETE (the row is kept for history and stats).
    pub deleted: bool,
}

/// Which page of messages: Discord's own paging convention (`GET /channels/{id}/messages`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MessagePage {
    /// Only this channel.
    pub channel_id: Option<u64>,
    /// Messages with an id below this one: the `limit` newest of them.
    pub before: Option<u64>,
    /// Messages with an id above this one. Alone, the page is the `limit` oldest of them (still
    /// returned newest first); with `before` too, the `limit` newest between both.
    pub after: Option<u64>,
    /// Page size, 1..=100.
    pub limit: u32,
}

/// How [`PartitionStore::guild_stats`] groups message activity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatsGroup {
    /// By UTC day (days since 1970-01-01).
    Day,
    /// By channel.
    Channel,
    /// By author.
    User,
}

/// One group of message activity: `key` is the day number (days since 1970-01-01, UTC), the
/// channel id or the user id, by [`StatsGroup`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatsRow {
    /// The group's key.
    pub key: i64,
    /// Messages posted in it.
    pub messages: u64,
}

impl PartitionStore {
    /// The guild `guild_id` with its channels and roles; `None` if it is not cached here.
    ///
    /// # Errors
    /// [`StoreError::Query`] if SQLite fails (or was interrupted).
    pub fn guild_view(&self, guild_id: u64) -> Result<Option<GuildView>, StoreError> {
        let g = guild_id as i64;
        let guild = self
            .conn
            .query_row(
                "SELECT name, owner_id, member_count, unavailable, stale,
                        (SELECT count(*) FROM members WHERE guild_id = ?1)
                 FROM guilds WHERE id = ?1",
                params![g],
                |r| {
                    Ok(GuildView {
                        id: guild_id,
                        name: r.get(0)?,
                        owner_id: r.get::<_, i64>(1)? as u64,
                        member_count: r.get::<_, Option<i64>>(2)?.map(|c| c as u64),
                        unavailable: r.get(3)?,
                        stale: r.get(4)?,
                        members_cached: r.get::<_, i64>(5)? as u64,
                        channels: Vec::new(),
                        roles: Vec::new(),
                    })
                },
            )
            .optional()
            .map_err(|e| self.query_err(e))?;
        let Some(mut guild) = guild else {
            return Ok(None);
        };
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT id, kind, name, position, parent_id FROM channels
                 WHERE guild_id = ?1 ORDER BY position, id",
            )
            .map_err(|e| self.query_err(e))?;
        guild.channels = st
            .query_map(params![g], |r| {
                Ok(ChannelView {
                    id: r.get::<_, i64>(0)? as u64,
                    kind: r.get(1)?,
                    name: r.get(2)?,
                    position: r.get(3)?,
                    parent_id: r.get::<_, Option<i64>>(4)?.map(|p| p as u64),
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.query_err(e))?;
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT id, name, color, position, permissions FROM roles
                 WHERE guild_id = ?1 ORDER BY position, id",
            )
            .map_err(|e| self.query_err(e))?;
        guild.roles = st
            .query_map(params![g], |r| {
                Ok(RoleView {
                    id: r.get::<_, i64>(0)? as u64,
                    name: r.get(1)?,
                    color: r.get(2)?,
                    position: r.get(3)?,
                    permissions: (r.get::<_, i64>(4)? as u64).to_string(),
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.query_err(e))?;
        Ok(Some(guild))
    }

    /// The member `user_id` of `guild_id`; `None` if it is not cached.
    ///
    /// # Errors
    /// [`StoreError::Query`] if SQLite fails (or was interrupted).
    pub fn member_view(
        &self,
        guild_id: u64,
        user_id: u64,
    ) -> Result<Option<MemberView>, StoreError> {
        self.conn
            .query_row(
                "SELECT u.username, u.global_name, coalesce(u.bot, 0), m.nick, m.joined_at, m.roles
                 FROM members m LEFT JOIN users u ON u.id = m.user_id
                 WHERE m.guild_id = ?1 AND m.user_id = ?2",
                params![guild_id as i64, user_id as i64],
                |r| {
                    let roles: String = r.get(5)?;
                    Ok(MemberView {
                        guild_id,
                        user_id,
                        username: r.get(0)?,
                        global_name: r.get(1)?,
                        bot: r.get(2)?,
                        nick: r.get(3)?,
                        joined_at_us: r.get(4)?,
                        // Stored as Discord sent it; a value that is not a JSON array of ids
                        // reads as none rather than failing the whole member.
                        roles: serde_json::from_str(&roles).unwrap_or_default(),
                    })
                },
            )
            .optional()
            .map_err(|e| self.query_err(e))
    }

    /// A page of `guild_id`'s messages, newest first (Discord's paging: `before` gives the
    /// `limit` newest below it, `after` alone the `limit` oldest above it).
    ///
    /// # Errors
    /// [`StoreError::Query`] if SQLite fails (or was interrupted).
    pub fn messages_page(
        &self,
        guild_id: u64,
        page: MessagePage,
    ) -> Result<Vec<MessageView>, StoreError> {
        let oldest_first = page.after.is_some() && page.before.is_none();
        let sql = format!(
            "SELECT id, channel_id, author_id, content, created_at, edited_at, deleted
             FROM messages
             WHERE guild_id = ?1 AND (?2 IS NULL OR channel_id = ?2)
               AND (?3 IS NULL OR id < ?3) AND (?4 IS NULL OR id > ?4)
             ORDER BY id {} LIMIT ?5",
            if oldest_first { "ASC" } else { "DESC" }
        );
        let mut st = self
            .conn
            .prepare_cached(&sql)
            .map_err(|e| self.query_err(e))?;
        let mut rows = st
            .query_map(
                params![
                    guild_id as i64,
                    page.channel_id.map(|c| c as i64),
                    page.before.map(|b| b as i64),
                    page.after.map(|a| a as i64),
                    i64::from(page.limit)
                ],
                |r| {
                    Ok(MessageView {
                        id: r.get::<_, i64>(0)? as u64,
                        channel_id: r.get::<_, i64>(1)? as u64,
                        author_id: r.get::<_, i64>(2)? as u64,
                        content: r.get(3)?,
                        created_at_us: r.get(4)?,
                        edited_at_us: r.get(5)?,
                        deleted: r.get(6)?,
                    })
                },
            )
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.query_err(e))?;
        if oldest_first {
            rows.reverse();
        }
        Ok(rows)
    }

    /// Messages posted in `guild_id` per `group`, over UTC days `from..=to` (days since
    /// 1970-01-01; `None` = unbounded), ordered by key. Counts activity: a deleted message still
    /// counts (the `message_stats` table's rule).
    ///
    /// # Errors
    /// [`StoreError::Query`] if SQLite fails (or was interrupted).
    pub fn guild_stats(
        &self,
        guild_id: u64,
        from: Option<i64>,
        to: Option<i64>,
        group: StatsGroup,
    ) -> Result<Vec<StatsRow>, StoreError> {
        let key = match group {
            StatsGroup::Day => "day",
            StatsGroup::Channel => "channel_id",
            StatsGroup::User => "user_id",
        };
        let sql = format!(
            "SELECT {key}, sum(messages) FROM message_stats
             WHERE guild_id = ?1 AND (?2 IS NULL OR day >= ?2) AND (?3 IS NULL OR day <= ?3)
             GROUP BY {key} ORDER BY {key}"
        );
        let mut st = self
            .conn
            .prepare_cached(&sql)
            .map_err(|e| self.query_err(e))?;
        st.query_map(params![guild_id as i64, from, to], |r| {
            Ok(StatsRow {
                key: r.get(0)?,
                messages: r.get::<_, i64>(1)? as u64,
            })
        })
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(|e| self.query_err(e))
    }

    /// A handle that interrupts this connection's running query from another thread (the API's
    /// per-query timeout); the query then fails with `SQLITE_INTERRUPT`.
    pub fn interrupt_handle(&self) -> rusqlite::InterruptHandle {
        self.conn.get_interrupt_handle()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ownership::PartitionId;
    use crate::store::Checkpointer;

    fn store_with_rows() -> (tempfile::TempDir, PartitionStore) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p0000.sqlite3");
        let store = PartitionStore::open(&path, PartitionId(0), Checkpointer::Sqlite).unwrap();
        store
            .conn
            .execute_batch(
                "INSERT INTO guilds (id, name, owner_id, member_count) VALUES (7, 'g', 1, 3);
                 INSERT INTO channels (id, guild_id, kind, name, position) VALUES (70, 7, 0, 'a', 1),
                    (71, 7, 0, 'b', 0);
                 INSERT INTO roles (id, guild_id, name, color, position, permissions)
                    VALUES (7, 7, '@everyone', 0, 0, -1);
                 INSERT INTO users (id, username) VALUES (1, 'u1');
                 INSERT INTO members (guild_id, user_id, nick, roles) VALUES (7, 1, 'n', '[\"7\"]');
                 INSERT INTO messages (id, guild_id, channel_id, author_id, content, created_at)
                    VALUES (100, 7, 70, 1, 'a', 0), (101, 7, 71, 1, 'b', 0),
                           (102, 7, 70, 1, 'c', 0), (103, 7, 70, 1, 'd', 0);
                 INSERT INTO message_stats VALUES (7, 70, 1, 20000, 3), (7, 71, 1, 20001, 1);",
            )
            .unwrap();
        (dir, store)
    }

    #[test]
    fn a_guild_reads_with_channels_and_roles_and_ids_as_strings() {
        let (_dir, store) = store_with_rows();
        let g = store.guild_view(7).unwrap().unwrap();
        assert_eq!(
            g.channels.iter().map(|c| c.id).collect::<Vec<_>>(),
            [71, 70]
        );
        assert_eq!(g.members_cached, 1);
        // Every permission bit set is u64::MAX, stored as -1 by the bit cast.
        assert_eq!(g.roles[0].permissions, u64::MAX.to_string());
        let json = serde_json::to_value(&g).unwrap();
        assert_eq!(json["id"], "7");
        assert_eq!(json["channels"][0]["type"], 0);
        assert!(store.guild_view(8).unwrap().is_none());
        let m = store.member_view(7, 1).unwrap().unwrap();
        assert_eq!(
            (m.username.as_deref(), m.roles),
            (Some("u1"), vec!["7".to_owned()])
        );
        assert!(store.member_view(7, 2).unwrap().is_none());
    }

    #[test]
    fn messages_page_the_way_discord_does() {
        let (_dir, store) = store_with_rows();
        let ids = |page| {
            store
                .messages_page(7, page)
                .unwrap()
                .iter()
                .map(|m| m.id)
                .collect::<Vec<_>>()
        };
        let page = |before, after, limit| MessagePage {
            channel_id: None,
            before,
            after,
            limit,
        };
        assert_eq!(ids(page(None, None, 2)), [103, 102]);
        assert_eq!(ids(page(Some(102), None, 2)), [101, 100]);
        assert_eq!(ids(page(None, Some(100), 2)), [102, 101]);
        assert_eq!(ids(page(Some(103), Some(100), 100)), [102, 101]);
        let channel = MessagePage {
            channel_id: Some(70),
            ..page(None, None, 100)
        };
        assert_eq!(ids(channel), [103, 102, 100]);
    }

    #[test]
    fn stats_group_by_day_channel_and_user_within_a_day_range() {
        let (_dir, store) = store_with_rows();
        let rows = |from, to, group| {
            store
                .guild_stats(7, from, to, group)
                .unwrap()
                .iter()
                .map(|r| (r.key, r.messages))
                .collect::<Vec<_>>()
        };
        assert_eq!(rows(None, None, StatsGroup::Day), [(20000, 3), (20001, 1)]);
        assert_eq!(rows(None, None, StatsGroup::Channel), [(70, 3), (71, 1)]);
        assert_eq!(rows(None, None, StatsGroup::User), [(1, 4)]);
        assert_eq!(rows(Some(20001), None, StatsGroup::User), [(1, 1)]);
        assert_eq!(rows(None, Some(19999), StatsGroup::Day), []);
    }
}
