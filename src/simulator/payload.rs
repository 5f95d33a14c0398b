//! JSON rendering of gateway v10 payloads (Discord docs, "Gateway Events").
//!
//! Payloads are written by hand into a `String` (no intermediate `serde_json::Value`): a
//! MESSAGE_CREATE renders in about a microsecond, so the simulator can keep only compact
//! records and render on send. Field sets follow what Discord sends and include everything
//! twilight 0.18 requires (see `notes/twilight-ractor-rusqlite-figment.md` §2). Every string
//! the world produces is plain ASCII from [`WORDS`], but [`Out::string`] escapes anyway.

use super::DispatchKind;
use super::session::LogEntry;
use super::world::{
    ChannelRec, GuildRec, MemberRec, MessageRec, ScriptEvent, World, push_padded, snowflake_ms,
    timestamp,
};

/// Words the world's names and message contents are made of.
const WORDS: [&str; 64] = [
    "alpha", "amber", "anchor", "apple", "arrow", "aspen", "atlas", "badger", "banner", "basil",
    "beacon", "birch", "bison", "breeze", "brook", "cabin", "canyon", "cedar", "cinder", "clover",
    "comet", "coral", "crane", "delta", "dune", "ember", "falcon", "fern", "fjord", "flint",
    "forest", "frost", "garnet", "glacier", "harbor", "hazel", "heron", "island", "ivy", "jade",
    "juniper", "kestrel", "lagoon", "lantern", "maple", "meadow", "mesa", "nebula", "oak", "orbit",
    "otter", "pebble", "pine", "prairie", "quartz", "raven", "ridge", "river", "sage", "summit",
    "thistle", "tundra", "willow", "zephyr",
];

/// Guild name suffixes.
const GUILD_KINDS: [&str; 8] = [
    "Club",
    "Guild",
    "Hub",
    "Lounge",
    "Collective",
    "Society",
    "Crew",
    "Den",
];

/// A frame of truncated JSON (a MESSAGE_CREATE cut in half). Its `"s"` is `null`, so a client
/// scanning for the sequence (twilight does) finds none: the frame takes no sequence number.
pub(crate) const BROKEN_FRAME: &str = concat!(
    r#"{"op":0,"s":null,"t":"MESSAGE_CREATE","d":{"type":0,"tts":false,"#,
    r#""timestamp":"2024-05-01T00:00:00.000000+00:00","pinned":false,"mentions":[],"#,
    r#""mention_roles":[],"mention_everyone":false,"id":"1234567890123456789","content":"th"#
);

/// HEARTBEAT_ACK (op 11).
pub(crate) const HEARTBEAT_ACK: &str = r#"{"op":11,"s":null,"t":null,"d":null}"#;

/// INVALID_SESSION (op 9) with `d: false`: the session cannot be resumed.
pub(crate) const INVALID_SESSION: &str = r#"{"op":9,"s":null,"t":null,"d":false}"#;

/// INVALID_SESSION (op 9) with `d: true`: the client may resume (injected fault).
pub(crate) const INVALID_SESSION_RESUMABLE: &str = r#"{"op":9,"s":null,"t":null,"d":true}"#;

/// RECONNECT (op 7): the client should reconnect and resume (injected fault).
pub(crate) const RECONNECT: &str = r#"{"op":7,"s":null,"t":null,"d":null}"#;

/// Event type of the injected unknown dispatch.
pub(crate) const UNKNOWN_EVENT_TYPE: &str = "SHARDLITE_UNKNOWN_EVENT";

/// HELLO (op 10) announcing `heartbeat_interval` in milliseconds.
pub(crate) fn hello(heartbeat_interval_ms: u64) -> String {
    let mut o = String::with_capacity(96);
    o.push_str(r#"{"op":10,"s":null,"t":null,"d":{"heartbeat_interval":"#);
    o.num(heartbeat_interval_ms);
    o.push_str(r#","_trace":["shardlite-sim"]}}"#);
    o
}

/// What a dispatch renders for one shard's session.
pub(crate) struct RenderCtx<'a> {
    pub world: &'a World,
    pub shard: u32,
    pub session: &'a str,
    pub gateway_url: &'a str,
}

/// Record-facing description of a log entry: kind, guild id, message id, malformed.
pub(crate) fn describe(
    world: &World,
    shard: u32,
    entry: LogEntry,
) -> (DispatchKind, Option<u64>, Option<u64>, bool) {
    match entry {
        LogEntry::Ready => (DispatchKind::Ready, None, None, false),
        LogEntry::Resumed => (DispatchKind::Resumed, None, None, false),
        LogEntry::GuildCreate { guild, .. } => (
            DispatchKind::GuildCreate,
            Some(world.guilds[guild as usize].id),
            None,
            false,
        ),
        LogEntry::Script { index, .. } => {
            let event = world.scripts[shard as usize][index as usize];
            describe_script(world, event)
        }
    }
}

/// Record-facing description of a script event.
pub(crate) fn describe_script(
    world: &World,
    event: ScriptEvent,
) -> (DispatchKind, Option<u64>, Option<u64>, bool) {
    let guild_of = |g: u32| Some(world.guilds[g as usize].id);
    match event {
        ScriptEvent::MessageCreate { message } => {
            let m = &world.messages[message as usize];
            (
                DispatchKind::MessageCreate,
                guild_of(m.guild),
                Some(m.id),
                false,
            )
        }
        ScriptEvent::MessageUpdate { message, .. } => {
            let m = &world.messages[message as usize];
            (
                DispatchKind::MessageUpdate,
                guild_of(m.guild),
                Some(m.id),
                false,
            )
        }
        ScriptEvent::MessageDelete { message } => {
            let m = &world.messages[message as usize];
            (
                DispatchKind::MessageDelete,
                guild_of(m.guild),
                Some(m.id),
                false,
            )
        }
        ScriptEvent::MemberAdd { member } => (
            DispatchKind::GuildMemberAdd,
            guild_of(world.members[member as usize].guild),
            None,
            false,
        ),
        ScriptEvent::MemberRemove { member } => (
            DispatchKind::GuildMemberRemove,
            guild_of(world.members[member as usize].guild),
            None,
            false,
        ),
        ScriptEvent::ChannelCreate { channel } => (
            DispatchKind::ChannelCreate,
            guild_of(world.channels[channel as usize].guild),
            None,
            false,
        ),
        // Not recorded (it takes no sequence), described for completeness.
        ScriptEvent::BrokenJson => (DispatchKind::MessageCreate, None, None, true),
        ScriptEvent::UnknownEvent => (DispatchKind::Unknown, None, None, true),
        ScriptEvent::MemberAddNoGuild { .. } => (DispatchKind::GuildMemberAdd, None, None, true),
    }
}

/// Render the op 0 dispatch for `entry` with sequence `seq`.
pub(crate) fn dispatch(ctx: &RenderCtx<'_>, seq: u64, entry: LogEntry) -> String {
    match entry {
        LogEntry::Ready => ready(ctx, seq),
        LogEntry::Resumed => {
            let mut o = frame_start(seq, "RESUMED", 96);
            o.push_str(r#"{"_trace":["shardlite-sim"]}}"#);
            o
        }
        LogEntry::GuildCreate { guild, at } => guild_create(ctx.world, seq, guild, at),
        LogEntry::Script { index, .. } => script_event(
            ctx.world,
            seq,
            ctx.world.scripts[ctx.shard as usize][index as usize],
        ),
    }
}

/// Render one script event as an op 0 dispatch. [`ScriptEvent::BrokenJson`] renders
/// [`BROKEN_FRAME`] (and ignores `seq`).
pub(crate) fn script_event(world: &World, seq: u64, event: ScriptEvent) -> String {
    match event {
        ScriptEvent::MessageCreate { message } => {
            let mut o = frame_start(seq, "MESSAGE_CREATE", 1024);
            message_object(&mut o, world, &world.messages[message as usize], None);
            o.push('}');
            o
        }
        ScriptEvent::MessageUpdate { message, edited_ms } => {
            let mut o = frame_start(seq, "MESSAGE_UPDATE", 1024);
            message_object(
                &mut o,
                world,
                &world.messages[message as usize],
                Some(edited_ms),
            );
            o.push('}');
            o
        }
        ScriptEvent::MessageDelete { message } => {
            let m = &world.messages[message as usize];
            let mut o = frame_start(seq, "MESSAGE_DELETE", 160);
            o.push_str(r#"{"id":"#);
            o.id(m.id);
            o.push_str(r#","channel_id":"#);
            o.id(world.channels[m.channel as usize].id);
            o.push_str(r#","guild_id":"#);
            o.id(world.guilds[m.guild as usize].id);
            o.push_str("}}");
            o
        }
        ScriptEvent::MemberAdd { member } => {
            let m = &world.members[member as usize];
            let mut o = frame_start(seq, "GUILD_MEMBER_ADD", 640);
            o.push_str(r#"{"guild_id":"#);
            o.id(world.guilds[m.guild as usize].id);
            o.push(',');
            member_fields(&mut o, world, m, true);
            o.push_str("}}");
            o
        }
        ScriptEvent::MemberRemove { member } => {
            let m = &world.members[member as usize];
            let mut o = frame_start(seq, "GUILD_MEMBER_REMOVE", 400);
            o.push_str(r#"{"guild_id":"#);
            o.id(world.guilds[m.guild as usize].id);
            o.push_str(r#","user":"#);
            user_object(&mut o, m.user_id);
            o.push_str("}}");
            o
        }
        ScriptEvent::ChannelCreate { channel } => {
            let mut o = frame_start(seq, "CHANNEL_CREATE", 400);
            channel_object(&mut o, world, &world.channels[channel as usize], true);
            o.push('}');
            o
        }
        ScriptEvent::BrokenJson => BROKEN_FRAME.to_owned(),
        ScriptEvent::UnknownEvent => {
            let mut o = frame_start(seq, UNKNOWN_EVENT_TYPE, 160);
            o.push_str(r#"{"note":"an event type clients do not know"}}"#);
            o
        }
        ScriptEvent::MemberAddNoGuild { user_id } => {
            // A member object for a user outside the world, and no `guild_id`.
            let fake = MemberRec {
                user_id,
                guild: 0,
                joined_ms: snowflake_ms(user_id),
                role_mask: 0,
                added_at: None,
                removed_at: None,
            };
            let mut o = frame_start(seq, "GUILD_MEMBER_ADD", 512);
            o.push('{');
            member_fields(&mut o, world, &fake, false);
            o.push_str("}}");
            o
        }
    }
}

/// `{"op":0,"s":SEQ,"t":"KIND","d":` — the caller appends `d` and the closing brace.
fn frame_start(seq: u64, kind: &str, capacity: usize) -> String {
    let mut o = String::with_capacity(capacity);
    o.push_str(r#"{"op":0,"s":"#);
    o.num(seq);
    o.push_str(r#","t":""#);
    o.push_str(kind);
    o.push_str(r#"","d":"#);
    o
}

/// READY (Discord docs, "Gateway Events → Ready"): the shard's guilds as unavailable.
fn ready(ctx: &RenderCtx<'_>, seq: u64) -> String {
    let world = ctx.world;
    let guilds = &world.shard_guilds[ctx.shard as usize];
    let mut o = frame_start(seq, "READY", 512 + guilds.len() * 48);
    o.push_str(r#"{"v":10,"user":{"id":"#);
    o.id(world.bot_id);
    o.push_str(concat!(
        r#","username":"shardlite-sim","global_name":null,"discriminator":"0000","#,
        r#""avatar":null,"bot":true,"verified":true,"mfa_enabled":false,"flags":0,"email":null},"#,
        r#""session_type":"normal","session_id":"#
    ));
    o.string(ctx.session);
    o.push_str(r#","resume_gateway_url":"#);
    o.string(ctx.gateway_url);
    o.push_str(r#","guilds":["#);
    for (i, g) in guilds.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        o.push_str(r#"{"id":"#);
        o.id(world.guilds[*g as usize].id);
        o.push_str(r#","unavailable":true}"#);
    }
    o.push_str(r#"],"application":{"id":"#);
    o.id(world.bot_id);
    o.push_str(r#","flags":565248},"shard":["#);
    o.num(u64::from(ctx.shard));
    o.push(',');
    o.num(u64::from(world.shards));
    o.push_str(concat!(
        r#"],"private_channels":[],"relationships":[],"presences":[],"#,
        r#""guild_join_requests":[],"geo_ordered_rtc_regions":["us-east"],"#,
        r#""user_settings":{},"auth":{},"_trace":["shardlite-sim"]}}"#
    ));
    o
}

/// GUILD_CREATE (Discord docs, "Gateway Events → Guild Create") of guild `g` as it stands
/// once the first `at` events of its shard's script are sent.
fn guild_create(world: &World, seq: u64, g: u32, at: u32) -> String {
    let guild = &world.guilds[g as usize];
    let mut o = frame_start(seq, "GUILD_CREATE", 4096 + guild.members.len() * 512);
    let channels: Vec<&ChannelRec> = guild
        .channels
        .iter()
        .filter(|c| world.channel_visible(**c, at))
        .map(|c| &world.channels[*c as usize])
        .collect();
    let members: Vec<&MemberRec> = guild
        .members
        .iter()
        .filter(|m| world.member_visible(**m, at))
        .map(|m| &world.members[*m as usize])
        .collect();
    o.push_str(r#"{"id":"#);
    o.id(guild.id);
    o.push_str(r#","name":"#);
    o.string(&guild_name(guild));
    o.push_str(concat!(
        r#","icon":null,"description":null,"splash":null,"discovery_splash":null,"banner":null,"#,
        r#""owner_id":"#
    ));
    o.id(world.members[guild.owner as usize].user_id);
    o.push_str(concat!(
        r#","afk_channel_id":null,"afk_timeout":300,"widget_enabled":false,"#,
        r#""widget_channel_id":null,"verification_level":1,"default_message_notifications":1,"#,
        r#""explicit_content_filter":0,"features":[],"mfa_level":0,"application_id":null,"#,
        r#""system_channel_id":"#
    ));
    match channels.first() {
        Some(c) => o.id(c.id),
        None => o.push_str("null"),
    }
    o.push_str(concat!(
        r#","system_channel_flags":0,"rules_channel_id":null,"max_presences":null,"#,
        r#""max_members":500000,"vanity_url_code":null,"premium_tier":0,"#,
        r#""premium_subscription_count":0,"preferred_locale":"en-US","#,
        r#""public_updates_channel_id":null,"max_video_channel_users":25,"#,
        r#""max_stage_video_channel_users":50,"nsfw_level":0,"#,
        r#""premium_progress_bar_enabled":false,"safety_alerts_channel_id":null,"#,
        r#""emojis":[],"stickers":[],"voice_states":[],"presences":[],"threads":[],"#,
        r#""stage_instances":[],"guild_scheduled_events":[],"soundboard_sounds":[],"#,
        r#""lazy":true,"large":false,"unavailable":false,"joined_at":"#
    ));
    o.ts(guild.joined_ms);
    o.push_str(r#","member_count":"#);
    o.num(members.len() as u64);
    o.push_str(r#","roles":["#);
    for (i, role) in guild.roles.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        o.push_str(r#"{"id":"#);
        o.id(role.id);
        o.push_str(r#","name":"#);
        if i == 0 {
            o.push_str(r#""@everyone""#);
        } else {
            o.string(&format!("{} {}", word(role.id, 0), word(role.id, 1)));
        }
        o.push_str(r#","description":null,"permissions":"#);
        o.string(&role.permissions.to_string());
        o.push_str(r#","position":"#);
        o.num(i as u64);
        o.push_str(r#","color":"#);
        o.num(u64::from(role.color));
        o.push_str(r#","colors":{"primary_color":"#);
        o.num(u64::from(role.color));
        o.push_str(r#","secondary_color":null,"tertiary_color":null},"hoist":"#);
        o.push_str(bool_str(role.hoist));
        o.push_str(r#","managed":false,"mentionable":"#);
        o.push_str(bool_str(role.mentionable));
        o.push_str(r#","icon":null,"unicode_emoji":null,"flags":0}"#);
    }
    o.push_str(r#"],"channels":["#);
    for (i, c) in channels.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        // Discord omits `guild_id` on channels inside GUILD_CREATE.
        channel_object(&mut o, world, c, false);
    }
    o.push_str(r#"],"members":["#);
    for (i, m) in members.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        o.push('{');
        member_fields(&mut o, world, m, true);
        o.push('}');
    }
    o.push_str("]}}");
    o
}

/// A message object (Discord docs, "Resources → Message"); `edited_ms` set for MESSAGE_UPDATE.
fn message_object(o: &mut String, world: &World, m: &MessageRec, edited_ms: Option<u64>) {
    let author = &world.members[m.author as usize];
    o.push_str(r#"{"type":0,"tts":false,"timestamp":"#);
    o.ts(snowflake_ms(m.id));
    o.push_str(r#","pinned":false,"mentions":[],"mention_roles":[],"mention_everyone":false,"member":{"roles":["#);
    roles_list(o, world, author);
    o.push_str(r#"],"premium_since":null,"pending":false,"nick":null,"mute":false,"joined_at":"#);
    o.ts(author.joined_ms);
    o.push_str(concat!(
        r#","flags":0,"deaf":false,"communication_disabled_until":null,"avatar":null},"#,
        r#""id":"#
    ));
    o.id(m.id);
    o.push_str(r#","flags":0,"embeds":[],"edited_timestamp":"#);
    match edited_ms {
        Some(ms) => o.ts(ms),
        None => o.push_str("null"),
    }
    o.push_str(r#","content":"#);
    o.string(&content(world.seed, m.id, edited_ms.unwrap_or(0)));
    o.push_str(r#","components":[],"channel_id":"#);
    o.id(world.channels[m.channel as usize].id);
    o.push_str(r#","author":"#);
    user_object(o, author.user_id);
    o.push_str(r#","attachments":[],"guild_id":"#);
    o.id(world.guilds[m.guild as usize].id);
    o.push('}');
}

/// A guild text channel (type 0); `with_guild` adds `guild_id` (CHANNEL_CREATE carries it,
/// GUILD_CREATE's channel list does not).
fn channel_object(o: &mut String, world: &World, c: &ChannelRec, with_guild: bool) {
    o.push_str(r#"{"id":"#);
    o.id(c.id);
    o.push_str(r#","type":0,"#);
    if with_guild {
        o.push_str(r#""guild_id":"#);
        o.id(world.guilds[c.guild as usize].id);
        o.push(',');
    }
    o.push_str(r#""name":"#);
    if c.position == 0 {
        o.push_str(r#""general""#);
    } else {
        o.string(&format!("{}-{}", word(c.id, 0), word(c.id, 1)));
    }
    o.push_str(r#","position":"#);
    o.num(u64::from(c.position));
    o.push_str(concat!(
        r#","flags":0,"parent_id":null,"topic":null,"nsfw":false,"last_message_id":null,"#,
        r#""rate_limit_per_user":0,"permission_overwrites":[]}"#
    ));
}

/// The fields of a guild member object (Discord docs, "Resources → Guild → Guild Member"),
/// without surrounding braces; `with_roles` false renders an empty role list.
fn member_fields(o: &mut String, world: &World, m: &MemberRec, with_roles: bool) {
    o.push_str(r#""user":"#);
    user_object(o, m.user_id);
    o.push_str(r#","roles":["#);
    if with_roles {
        roles_list(o, world, m);
    }
    o.push_str(r#"],"nick":null,"avatar":null,"banner":null,"premium_since":null,"joined_at":"#);
    o.ts(m.joined_ms);
    o.push_str(concat!(
        r#","pending":false,"deaf":false,"mute":false,"flags":0,"#,
        r#""communication_disabled_until":null"#
    ));
}

/// Comma-separated role ids of a member (never @everyone, as Discord sends them).
fn roles_list(o: &mut String, world: &World, m: &MemberRec) {
    let guild = &world.guilds[m.guild as usize];
    let mut first = true;
    for (bit, role) in guild.roles.iter().skip(1).enumerate() {
        if m.role_mask & (1 << bit) != 0 {
            if !first {
                o.push(',');
            }
            first = false;
            o.id(role.id);
        }
    }
}

/// A user object (Discord docs, "Resources → User").
fn user_object(o: &mut String, user_id: u64) {
    o.push_str(r#"{"id":"#);
    o.id(user_id);
    o.push_str(r#","username":"#);
    o.string(&format!(
        "{}_{}{}",
        word(user_id, 0),
        word(user_id, 1),
        mix(user_id) % 1000
    ));
    o.push_str(r#","global_name":"#);
    o.string(&format!(
        "{} {}",
        capitalized(word(user_id, 0)),
        capitalized(word(user_id, 1))
    ));
    o.push_str(r#","discriminator":"0","avatar":null,"public_flags":0}"#);
}

fn guild_name(guild: &GuildRec) -> String {
    let kind = GUILD_KINDS[(mix(guild.id ^ 0x9e37) % GUILD_KINDS.len() as u64) as usize];
    format!(
        "{} {} {kind}",
        capitalized(word(guild.id, 0)),
        capitalized(word(guild.id, 1))
    )
}

/// Message content, 20–200 characters of words, deterministic in (seed, message id, edit).
pub(crate) fn content(seed: u64, message_id: u64, edited_ms: u64) -> String {
    let mut rng = fastrand::Rng::with_seed(mix(seed ^ mix(message_id) ^ edited_ms));
    let len = rng.usize(20..=200);
    let mut s = String::with_capacity(len + 10);
    if edited_ms != 0 {
        s.push_str("(edited) ");
    }
    while s.len() < len {
        if !s.is_empty() && !s.ends_with(' ') {
            s.push(' ');
        }
        s.push_str(WORDS[rng.usize(0..WORDS.len())]);
    }
    s.truncate(len);
    if s.ends_with(' ') {
        s.pop();
        s.push('.');
    }
    s
}

/// The `n`th name word derived from an id.
fn word(id: u64, n: u32) -> &'static str {
    WORDS[(mix(id.wrapping_add(u64::from(n).wrapping_mul(0x9e37_79b9))) % WORDS.len() as u64)
        as usize]
}

fn capitalized(w: &str) -> String {
    let mut c = w.chars();
    match c.next() {
        Some(first) => first.to_ascii_uppercase().to_string() + c.as_str(),
        None => String::new(),
    }
}

/// splitmix64 finalizer: a cheap, well-mixed hash of an id.
pub(crate) const fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const fn bool_str(b: bool) -> &'static str {
    if b { "true" } else { "false" }
}

/// Small JSON writing helpers on `String`.
trait Out {
    /// A decimal number.
    fn num(&mut self, n: u64);
    /// A snowflake as Discord sends it: a decimal string.
    fn id(&mut self, id: u64);
    /// A quoted, escaped JSON string.
    fn string(&mut self, s: &str);
    /// A quoted RFC 3339 timestamp from ms since the Discord epoch.
    fn ts(&mut self, ms: u64);
}

impl Out for String {
    fn num(&mut self, n: u64) {
        push_padded(self, n, 1);
    }

    fn id(&mut self, id: u64) {
        self.push('"');
        push_padded(self, id, 1);
        self.push('"');
    }

    fn string(&mut self, s: &str) {
        self.push('"');
        for c in s.chars() {
            match c {
                '"' => self.push_str("\\\""),
                '\\' => self.push_str("\\\\"),
                '\n' => self.push_str("\\n"),
                '\r' => self.push_str("\\r"),
                '\t' => self.push_str("\\t"),
                c if (c as u32) < 0x20 => {
                    self.push_str("\\u00");
                    push_hex2(self, c as u32);
                }
                c => self.push(c),
            }
        }
        self.push('"');
    }

    fn ts(&mut self, ms: u64) {
        self.push('"');
        timestamp(ms, self);
        self.push('"');
    }
}

fn push_hex2(o: &mut String, v: u32) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    o.push(char::from(HEX[(v >> 4) as usize & 0xf]));
    o.push(char::from(HEX[v as usize & 0xf]));
}
