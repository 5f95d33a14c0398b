//! Dispatch → rows. Each function writes one event's effects inside the caller's transaction.
//!
//! Every write is idempotent by Discord id (upserts, `ON CONFLICT DO NOTHING`, guarded updates), so
//! applying the same event twice leaves the same rows; derived counters (`message_stats`) move only
//! when the underlying row is new (DESIGN §5: a redelivered MESSAGE_CREATE must not count twice).

use rusqlite::{Connection, params};
use twilight_model::channel::{Channel, Message};
use twilight_model::gateway::event::DispatchEvent;
use twilight_model::gateway::payload::incoming::GuildCreate;
use twilight_model::guild::{Guild, Member, Role};
use twilight_model::id::Id;
use twilight_model::id::marker::GuildMarker;
use twilight_model::user::User;

/// Seconds in a UTC day, for `message_stats.day` (days since 1970-01-01).
const SECS_PER_DAY: i64 = 86_400;

/// Whether an event was written or is of a kind the store does not keep.
pub(super) enum Applied {
    Stored { new_message: bool },
    Ignored,
}

/// Snowflakes are below 2^63 (42 bits of milliseconds until the year 2154), so they fit SQLite's
/// signed INTEGER unchanged.
fn sid<T>(id: Id<T>) -> i64 {
    id.get() as i64
}

/// Writes `event`'s effects. Kinds outside the cache (typing, presences, voice, …) are `Ignored`.
pub(super) fn dispatch(tx: &Connection, event: &DispatchEvent) -> rusqlite::Result<Applied> {
    let stored = Applied::Stored { new_message: false };
    match event {
        DispatchEvent::MessageCreate(m) => {
            return message_create(tx, m).map(|new_message| Applied::Stored { new_message });
        }
        DispatchEvent::MessageUpdate(m) => message_update(tx, m)?,
        DispatchEvent::MessageDelete(d) => message_deleted(tx, sid(d.id))?,
        DispatchEvent::MessageDeleteBulk(d) => {
            for id in &d.ids {
                message_deleted(tx, sid(*id))?;
            }
        }
        DispatchEvent::GuildCreate(g) => match g.as_ref() {
            GuildCreate::Available(guild) => guild_create(tx, guild)?,
            GuildCreate::Unavailable(u) => guild_unavailable(tx, u.id)?,
        },
        DispatchEvent::GuildUpdate(g) => {
            tx.prepare_cached(
                "UPDATE guilds SET name = ?2, owner_id = ?3,
                    member_count = coalesce(?4, member_count) WHERE id = ?1",
            )?
            .execute(params![
                sid(g.id),
                g.name,
                sid(g.owner_id),
                g.member_count.map(|c| c as i64)
            ])?;
        }
        DispatchEvent::GuildDelete(g) if g.unavailable == Some(true) => {
            guild_unavailable(tx, g.id)?;
        }
        DispatchEvent::GuildDelete(g) => guild_removed(tx, g.id)?,
        DispatchEvent::UnavailableGuild(u) => guild_unavailable(tx, u.id)?,
        DispatchEvent::ChannelCreate(c) => channel_upsert(tx, c, None)?,
        DispatchEvent::ChannelUpdate(c) => channel_upsert(tx, c, None)?,
        DispatchEvent::ChannelDelete(c) => {
            tx.prepare_cached("DELETE FROM channels WHERE id = ?1")?
                .execute([sid(c.id)])?;
        }
        DispatchEvent::RoleCreate(r) => role_upsert(tx, r.guild_id, &r.role)?,
        DispatchEvent::RoleUpdate(r) => role_upsert(tx, r.guild_id, &r.role)?,
        DispatchEvent::RoleDelete(r) => {
            tx.prepare_cached("DELETE FROM roles WHERE id = ?1")?
                .execute([sid(r.role_id)])?;
        }
        DispatchEvent::MemberAdd(m) => member_upsert(tx, m.guild_id, &m.member)?,
        DispatchEvent::MemberUpdate(m) => {
            user_upsert(tx, &m.user)?;
            tx.prepare_cached(
                "INSERT INTO members (guild_id, user_id, nick, joined_at, roles)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (guild_id, user_id) DO UPDATE SET nick = excluded.nick,
                    joined_at = coalesce(excluded.joined_at, joined_at), roles = excluded.roles",
            )?
            .execute(params![
                sid(m.guild_id),
                sid(m.user.id),
                m.nick,
                m.joined_at.map(|t| t.as_micros()),
                role_list(&m.roles)
            ])?;
        }
        DispatchEvent::MemberRemove(m) => {
            tx.prepare_cached("DELETE FROM members WHERE guild_id = ?1 AND user_id = ?2")?
                .execute(params![sid(m.guild_id), sid(m.user.id)])?;
        }
        DispatchEvent::MemberChunk(c) => {
            for member in &c.members {
                member_upsert(tx, c.guild_id, member)?;
            }
        }
        _ => return Ok(Applied::Ignored),
    }
    Ok(stored)
}

/// A new session started: every cached guild may be out of date until its GUILD_CREATE arrives
/// (stale), and a guild the session does not list is unavailable until Discord says otherwise.
pub(super) fn session_started(tx: &Connection, guilds: Option<&[u64]>) -> rusqlite::Result<()> {
    tx.prepare_cached("UPDATE guilds SET stale = 1 WHERE stale = 0")?
        .execute([])?;
    let Some(guilds) = guilds else {
        return Ok(());
    };
    tx.prepare_cached(
        "UPDATE guilds SET unavailable = 1
         WHERE unavailable = 0 AND id NOT IN (SELECT value FROM json_each(?1))",
    )?
    .execute([id_list(guilds.iter().copied())])?;
    Ok(())
}

/// Keeps a dispatch that could not be applied, as received; a second delivery of the same
/// `(session, seq)` changes nothing.
pub(super) fn dead_letter(
    tx: &Connection,
    session_id: &str,
    letter: &super::DeadLetter,
) -> rusqlite::Result<()> {
    let received_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    tx.prepare_cached(
        "INSERT INTO dead_letters (session_id, seq, kind, guild_id, payload, error, received_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (session_id, seq) DO NOTHING",
    )?
    .execute(params![
        session_id,
        letter.seq as i64,
        letter.kind,
        letter.guild_id.map(|g| g as i64),
        letter.payload,
        letter.error,
        received_ms
    ])?;
    Ok(())
}

/// Inserts the message if its id is new and counts it once in `message_stats`; returns whether it
/// was new. A redelivery (same id, any seq or session) changes nothing.
fn message_create(tx: &Connection, m: &Message) -> rusqlite::Result<bool> {
    user_upsert(tx, &m.author)?;
    let created_at = m.timestamp.as_micros();
    let inserted = tx
        .prepare_cached(
            "INSERT INTO messages (id, guild_id, channel_id, author_id, content, created_at, edited_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (id) DO NOTHING",
        )?
        .execute(params![
            sid(m.id),
            m.guild_id.map(sid),
            sid(m.channel_id),
            sid(m.author.id),
            m.content,
            created_at,
            m.edited_timestamp.map(|t| t.as_micros())
        ])?;
    if inserted == 0 {
        return Ok(false);
    }
    if let Some(guild_id) = m.guild_id {
        tx.prepare_cached(
            "INSERT INTO message_stats (guild_id, channel_id, user_id, day, messages)
             VALUES (?1, ?2, ?3, ?4, 1)
             ON CONFLICT (guild_id, channel_id, user_id, day) DO UPDATE SET messages = messages + 1",
        )?
        .execute(params![
            sid(guild_id),
            sid(m.channel_id),
            sid(m.author.id),
            m.timestamp.as_secs().div_euclid(SECS_PER_DAY)
        ])?;
    }
    Ok(true)
}

/// Updates content and edit time of a known message; a message never seen created is not invented.
fn message_update(tx: &Connection, m: &Message) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "UPDATE messages SET content = ?2, edited_at = ?3
         WHERE id = ?1 AND (content IS NOT ?2 OR edited_at IS NOT ?3)",
    )?
    .execute(params![
        sid(m.id),
        m.content,
        m.edited_timestamp.map(|t| t.as_micros())
    ])?;
    Ok(())
}

fn message_deleted(tx: &Connection, id: i64) -> rusqlite::Result<()> {
    tx.prepare_cached("UPDATE messages SET deleted = 1 WHERE id = ?1 AND deleted = 0")?
        .execute([id])?;
    Ok(())
}

/// A full GUILD_CREATE replaces the guild's channels and roles (the payload carries all of them)
/// and upserts its members (the payload may carry only some, per Discord's `large_threshold`).
fn guild_create(tx: &Connection, g: &Guild) -> rusqlite::Result<()> {
    let guild_id = sid(g.id);
    tx.prepare_cached(
        "INSERT INTO guilds (id, name, owner_id, member_count, unavailable, stale)
         VALUES (?1, ?2, ?3, ?4, 0, 0)
         ON CONFLICT (id) DO UPDATE SET name = excluded.name, owner_id = excluded.owner_id,
            member_count = excluded.member_count, unavailable = 0, stale = 0",
    )?
    .execute(params![
        guild_id,
        g.name,
        sid(g.owner_id),
        g.member_count.map(|c| c as i64)
    ])?;
    for channel in &g.channels {
        channel_upsert(tx, channel, Some(g.id))?;
    }
    let channel_ids = id_list(g.channels.iter().map(|c| c.id.get()));
    tx.prepare_cached(
        "DELETE FROM channels WHERE guild_id = ?1
         AND id NOT IN (SELECT value FROM json_each(?2))",
    )?
    .execute(params![guild_id, channel_ids])?;
    for role in &g.roles {
        role_upsert(tx, g.id, role)?;
    }
    let role_ids = id_list(g.roles.iter().map(|r| r.id.get()));
    tx.prepare_cached(
        "DELETE FROM roles WHERE guild_id = ?1 AND id NOT IN (SELECT value FROM json_each(?2))",
    )?
    .execute(params![guild_id, role_ids])?;
    for member in &g.members {
        member_upsert(tx, g.id, member)?;
    }
    Ok(())
}

fn guild_unavailable(tx: &Connection, id: Id<GuildMarker>) -> rusqlite::Result<()> {
    tx.prepare_cached("UPDATE guilds SET unavailable = 1 WHERE id = ?1")?
        .execute([sid(id)])?;
    Ok(())
}

/// The bot left (or was removed from) the guild: drop its entity cache, keep messages and stats,
/// which are history rather than cache.
fn guild_removed(tx: &Connection, id: Id<GuildMarker>) -> rusqlite::Result<()> {
    for sql in [
        "DELETE FROM guilds WHERE id = ?1",
        "DELETE FROM channels WHERE guild_id = ?1",
        "DELETE FROM roles WHERE guild_id = ?1",
        "DELETE FROM members WHERE guild_id = ?1",
    ] {
        tx.prepare_cached(sql)?.execute([sid(id)])?;
    }
    Ok(())
}

/// Channels without a guild (DMs) are not cached: they belong to no partition's guild state.
fn channel_upsert(
    tx: &Connection,
    c: &Channel,
    guild_id: Option<Id<GuildMarker>>,
) -> rusqlite::Result<()> {
    let Some(guild_id) = c.guild_id.or(guild_id) else {
        return Ok(());
    };
    tx.prepare_cached(
        "INSERT INTO channels (id, guild_id, kind, name, position, parent_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (id) DO UPDATE SET guild_id = excluded.guild_id, kind = excluded.kind,
            name = excluded.name, position = excluded.position, parent_id = excluded.parent_id",
    )?
    .execute(params![
        sid(c.id),
        sid(guild_id),
        u8::from(c.kind),
        c.name,
        c.position,
        c.parent_id.map(sid)
    ])?;
    Ok(())
}

fn role_upsert(tx: &Connection, guild_id: Id<GuildMarker>, r: &Role) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO roles (id, guild_id, name, color, position, permissions)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (id) DO UPDATE SET guild_id = excluded.guild_id, name = excluded.name,
            color = excluded.color, position = excluded.position,
            permissions = excluded.permissions",
    )?
    .execute(params![
        sid(r.id),
        sid(guild_id),
        r.name,
        r.colors.primary_color,
        r.position,
        r.permissions.bits() as i64
    ])?;
    Ok(())
}

fn member_upsert(tx: &Connection, guild_id: Id<GuildMarker>, m: &Member) -> rusqlite::Result<()> {
    user_upsert(tx, &m.user)?;
    tx.prepare_cached(
        "INSERT INTO members (guild_id, user_id, nick, joined_at, roles) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (guild_id, user_id) DO UPDATE SET nick = excluded.nick,
            joined_at = excluded.joined_at, roles = excluded.roles",
    )?
    .execute(params![
        sid(guild_id),
        sid(m.user.id),
        m.nick,
        m.joined_at.map(|t| t.as_micros()),
        role_list(&m.roles)
    ])?;
    Ok(())
}

/// Upserts a user, writing only when something changed (most messages come from known authors).
fn user_upsert(tx: &Connection, u: &User) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO users (id, username, global_name, bot) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (id) DO UPDATE SET username = excluded.username,
            global_name = excluded.global_name, bot = excluded.bot
         WHERE username IS NOT excluded.username OR global_name IS NOT excluded.global_name
            OR bot IS NOT excluded.bot",
    )?
    .execute(params![sid(u.id), u.name, u.global_name, u.bot])?;
    Ok(())
}

/// A JSON array of ids as numbers, e.g. `[1,2]`, for `json_each` and the `members.roles` column.
fn id_list(ids: impl Iterator<Item = u64>) -> String {
    serde_json::Value::from(ids.collect::<Vec<u64>>()).to_string()
}

fn role_list<T>(roles: &[Id<T>]) -> String {
    id_list(roles.iter().map(|r| r.get()))
}
