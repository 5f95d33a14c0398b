//! The simulated Discord world and every shard's dispatch script, generated deterministically
//! from [`SimConfig::seed`](super::SimConfig::seed).
//!
//! Everything here is plain data: compact records indexed by `u32`, and per shard a script of
//! small [`ScriptEvent`]s. JSON is rendered from these records only when a frame is sent
//! (`payload.rs`), so a 200 000-message world costs a few megabytes, not hundreds.
//!
//! Ids are Discord snowflakes, `(ms_since_discord_epoch << 22) | (worker << 17) | (process << 12)
//! | increment` (Discord docs, "Reference → Snowflakes"); each entity kind uses its own `worker`,
//! and each kind's ids strictly increase, so ids are unique over the whole world.

use std::collections::BTreeMap;

use super::{Expected, ExpectedGuild, SimConfig};

/// Discord's epoch, the first millisecond of 2015, in Unix milliseconds (Discord docs,
/// "Reference → Snowflakes").
pub(crate) const DISCORD_EPOCH_MS: u64 = 1_420_070_400_000;

/// Guilds are created over five years starting 2016-01-01 (ms since the Discord epoch).
const GUILD_SPAN_START_MS: u64 = 31_536_000_000;
/// Length of the guild creation window, in ms.
const GUILD_SPAN_MS: u64 = 5 * 365 * 86_400_000;
/// The script's first message is sent at 2024-05-01T00:00:00Z (ms since the Discord epoch).
const SCRIPT_START_MS: u64 = 294_451_200_000;

/// Snowflake worker ids, one per entity kind, so kinds can never collide.
const WORKER_GUILD: u64 = 1;
const WORKER_CHANNEL: u64 = 2;
const WORKER_ROLE: u64 = 3;
const WORKER_USER: u64 = 4;
const WORKER_MESSAGE: u64 = 5;
const WORKER_BOT: u64 = 6;

/// Member count is kept below this bound so a GUILD_CREATE always carries every member
/// (twilight identifies with `large_threshold: 50`; Discord omits offline members above it).
const MAX_MEMBERS: usize = 45;
/// Guilds never drop below this many members through GUILD_MEMBER_REMOVE.
const MIN_MEMBERS: usize = 5;
/// Upper bound on a guild's channel count through CHANNEL_CREATE.
const MAX_CHANNELS: usize = 50;

/// Build one snowflake from its parts (Discord docs, "Reference → Snowflakes").
pub(crate) const fn snowflake(ms: u64, worker: u64, process: u64, increment: u64) -> u64 {
    (ms << 22) | ((worker & 0x1f) << 17) | ((process & 0x1f) << 12) | (increment & 0xfff)
}

/// Milliseconds since the Discord epoch encoded in a snowflake.
pub(crate) const fn snowflake_ms(id: u64) -> u64 {
    id >> 22
}

/// Discord's sharding formula, `(guild_id >> 22) % shard_total` (Discord docs, "Gateway →
/// Sharding").
pub(crate) const fn shard_of(guild_id: u64, shard_total: u32) -> u32 {
    ((guild_id >> 22) % shard_total as u64) as u32
}

/// Strictly increasing snowflakes for one entity kind.
struct IdGen {
    worker: u64,
    process: u64,
    last_ms: u64,
    increment: u64,
    started: bool,
}

impl IdGen {
    const fn new(worker: u64, process: u64) -> Self {
        Self {
            worker,
            process,
            last_ms: 0,
            increment: 0,
            started: false,
        }
    }

    /// Next id at `ms` (or just after the previous id if `ms` is earlier).
    fn next(&mut self, ms: u64) -> u64 {
        if !self.started || ms > self.last_ms {
            self.started = true;
            self.last_ms = ms;
            self.increment = 0;
        } else {
            self.increment += 1;
            if self.increment > 0xfff {
                self.last_ms += 1;
                self.increment = 0;
            }
        }
        snowflake(self.last_ms, self.worker, self.process, self.increment)
    }
}

/// One role of a guild. The first role of every guild is @everyone, whose id is the guild id.
#[derive(Debug, Clone)]
pub(crate) struct RoleRec {
    pub id: u64,
    pub color: u32,
    pub hoist: bool,
    pub mentionable: bool,
    pub permissions: u64,
}

/// One guild; `channels` and `members` index [`World::channels`] and [`World::members`] and
/// include the ones the script creates/adds later (filter by script position when rendering).
#[derive(Debug, Clone)]
pub(crate) struct GuildRec {
    pub id: u64,
    pub shard: u32,
    /// When the bot joined, ms since the Discord epoch.
    pub joined_ms: u64,
    /// Member index of the owner (never removed).
    pub owner: u32,
    pub roles: Vec<RoleRec>,
    pub channels: Vec<u32>,
    pub members: Vec<u32>,
}

/// One text channel (type 0).
#[derive(Debug, Clone)]
pub(crate) struct ChannelRec {
    pub id: u64,
    pub guild: u32,
    pub position: u32,
    /// Index into the owning shard's script of the CHANNEL_CREATE, `None` for initial channels.
    pub created_at: Option<u32>,
}

/// One guild membership (each membership has its own user).
#[derive(Debug, Clone)]
pub(crate) struct MemberRec {
    pub user_id: u64,
    pub guild: u32,
    pub joined_ms: u64,
    /// Bit `i` set = member has the guild's role `i + 1` (role 0 is @everyone, implicit).
    pub role_mask: u8,
    /// Script index of the GUILD_MEMBER_ADD, `None` for initial members.
    pub added_at: Option<u32>,
    /// Script index of the GUILD_MEMBER_REMOVE, if the script removes this member.
    pub removed_at: Option<u32>,
}

/// One message created by the script.
#[derive(Debug, Clone)]
pub(crate) struct MessageRec {
    pub id: u64,
    pub guild: u32,
    pub channel: u32,
    pub author: u32,
}

/// One entry of a shard's script. Indices point into the [`World`] tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScriptEvent {
    /// MESSAGE_CREATE of `World::messages[message]`.
    MessageCreate { message: u32 },
    /// MESSAGE_UPDATE (full message, new content) of an earlier message, edited at `edited_ms`.
    MessageUpdate { message: u32, edited_ms: u64 },
    /// MESSAGE_DELETE of an earlier message.
    MessageDelete { message: u32 },
    /// GUILD_MEMBER_ADD of `World::members[member]`.
    MemberAdd { member: u32 },
    /// GUILD_MEMBER_REMOVE of `World::members[member]`.
    MemberRemove { member: u32 },
    /// CHANNEL_CREATE of `World::channels[channel]`.
    ChannelCreate { channel: u32 },
    /// Injected fault: a text frame of truncated JSON. Takes no sequence number.
    BrokenJson,
    /// Injected fault: a dispatch with an unknown event type.
    UnknownEvent,
    /// Injected fault: a GUILD_MEMBER_ADD without `guild_id`, for a user outside the world.
    MemberAddNoGuild { user_id: u64 },
}

impl ScriptEvent {
    /// Whether the frame takes a sequence number (every real dispatch does).
    pub(crate) const fn takes_seq(self) -> bool {
        !matches!(self, Self::BrokenJson)
    }
}

/// The whole deterministic world: entities, per-shard scripts and the expected final state.
#[derive(Debug)]
pub(crate) struct World {
    pub seed: u64,
    pub shards: u32,
    pub bot_id: u64,
    pub guilds: Vec<GuildRec>,
    pub channels: Vec<ChannelRec>,
    pub members: Vec<MemberRec>,
    pub messages: Vec<MessageRec>,
    /// Guild indices per shard, in id order.
    pub shard_guilds: Vec<Vec<u32>>,
    /// Script per shard.
    pub scripts: Vec<Vec<ScriptEvent>>,
    pub expected: Expected,
}

/// Mutable per-guild state while the script is generated.
struct GenGuild {
    current_members: Vec<u32>,
    weight_end: u64,
}

impl World {
    /// Generate the world and scripts for `config`. Pure: same config → same world.
    ///
    /// Callers validate the config first (`shards > 0`, `messages ≤ u32::MAX`, guilds present
    /// when messages are requested).
    pub(crate) fn generate(config: &SimConfig) -> World {
        let shards = config.shards.max(1);
        let mut rng = fastrand::Rng::with_seed(config.seed);
        let process = u64::from(config.id_process);
        let mut guild_ids = IdGen::new(WORKER_GUILD, process);
        let mut channel_ids = IdGen::new(WORKER_CHANNEL, process);
        let mut role_ids = IdGen::new(WORKER_ROLE, process);
        let mut user_ids = IdGen::new(WORKER_USER, process);
        let mut message_ids = IdGen::new(WORKER_MESSAGE, process);
        let bot_id = IdGen::new(WORKER_BOT, process).next(GUILD_SPAN_START_MS - 86_400_000);

        let n_guilds = config.guilds as usize;
        // Each guild gets its own time slot of `gap` ms; the offset inside the slot is random
        // but adjusted so `ms % shards` hits a target shard. The targets cover every shard once
        // (when there are enough guilds) and are random otherwise, so all shards get guilds
        // while `ms % partitions` stays random.
        let gap = (GUILD_SPAN_MS / (n_guilds.max(1) as u64)).max(2 * u64::from(shards));
        let mut targets: Vec<u32> = (0..n_guilds)
            .map(|i| {
                if (i as u64) < u64::from(shards) {
                    i as u32
                } else {
                    rng.u32(0..shards)
                }
            })
            .collect();
        rng.shuffle(&mut targets);

        let mut guilds = Vec::with_capacity(n_guilds);
        let mut channels = Vec::new();
        let mut members = Vec::new();
        let mut gen_guilds = Vec::with_capacity(n_guilds);
        let mut weight_total = 0u64;
        for (i, target) in targets.iter().enumerate() {
            let slot = GUILD_SPAN_START_MS + i as u64 * gap;
            let mut ms = slot + rng.u64(0..gap - u64::from(shards));
            ms += (u64::from(*target) + u64::from(shards) - ms % u64::from(shards))
                % u64::from(shards);
            let id = guild_ids.next(ms);
            let guild_index = i as u32;

            let mut roles = vec![RoleRec {
                id,
                color: 0,
                hoist: false,
                mentionable: false,
                permissions: 1_071_698_660_929,
            }];
            for r in 1..rng.usize(2..=6) {
                roles.push(RoleRec {
                    id: role_ids.next(ms + 1 + r as u64),
                    color: rng.u32(0..0x0100_0000),
                    hoist: rng.bool(),
                    mentionable: rng.bool(),
                    permissions: rng.u64(0..(1 << 40)),
                });
            }
            let mut guild_channels = Vec::new();
            for c in 0..rng.u32(3..=8) {
                guild_channels.push(channels.len() as u32);
                channels.push(ChannelRec {
                    id: channel_ids.next(ms + 1 + u64::from(c)),
                    guild: guild_index,
                    position: c,
                    created_at: None,
                });
            }
            let role_bits = roles.len() - 1;
            let mut guild_members = Vec::new();
            for m in 0..rng.u64(5..=30) {
                guild_members.push(members.len() as u32);
                let joined_ms = if m == 0 {
                    ms
                } else {
                    ms + rng.u64(1_000..30 * 86_400_000)
                };
                members.push(MemberRec {
                    user_id: user_ids.next(ms + m),
                    guild: guild_index,
                    joined_ms,
                    role_mask: random_role_mask(&mut rng, role_bits),
                    added_at: None,
                    removed_at: None,
                });
            }
            weight_total += rng.u64(1..=10);
            gen_guilds.push(GenGuild {
                current_members: guild_members.clone(),
                weight_end: weight_total,
            });
            guilds.push(GuildRec {
                id,
                shard: shard_of(id, shards),
                joined_ms: ms + rng.u64(60_000..365 * 86_400_000),
                owner: guild_members[0],
                roles,
                channels: guild_channels,
                members: guild_members,
            });
        }

        let mut shard_guilds = vec![Vec::new(); shards as usize];
        for (i, g) in guilds.iter().enumerate() {
            shard_guilds[g.shard as usize].push(i as u32);
        }
        let populated: Vec<u32> = (0..shards)
            .filter(|s| !shard_guilds[*s as usize].is_empty())
            .collect();

        let mut scripts: Vec<Vec<ScriptEvent>> = vec![Vec::new(); shards as usize];
        let mut live: Vec<Vec<u32>> = vec![Vec::new(); shards as usize];
        let mut messages: Vec<MessageRec> = Vec::with_capacity(config.messages as usize);
        let mut created = vec![0u32; n_guilds];
        let mut deleted = vec![0u32; n_guilds];
        let mut now_ms = SCRIPT_START_MS;
        if !guilds.is_empty() {
            for k in 0..config.messages {
                // The first messages pin one per populated shard, so every shard with guilds
                // gets some; the rest follow the guilds' random weights.
                let guild = if (k as usize) < populated.len() {
                    let list = &shard_guilds[populated[k as usize] as usize];
                    list[rng.usize(0..list.len())] as usize
                } else {
                    let pick = rng.u64(0..weight_total);
                    gen_guilds.partition_point(|g| g.weight_end <= pick)
                };
                let shard = guilds[guild].shard as usize;
                if rng.u32(0..10) == 0 {
                    let mut ctx = OtherCtx {
                        rng: &mut rng,
                        now_ms,
                        guild,
                        guilds: &mut guilds,
                        gen_guild: &mut gen_guilds[guild],
                        channels: &mut channels,
                        members: &mut members,
                        live: &mut live[shard],
                        channel_ids: &mut channel_ids,
                        user_ids: &mut user_ids,
                    };
                    let event = ctx.other_event();
                    if let ScriptEvent::MessageDelete { message } = event {
                        deleted[messages[message as usize].guild as usize] += 1;
                    }
                    scripts[shard].push(event);
                }
                now_ms += rng.u64(1..=20);
                let guild_rec = &guilds[guild];
                let channel = guild_rec.channels[rng.usize(0..guild_rec.channels.len())];
                let current = &gen_guilds[guild].current_members;
                let author = current[rng.usize(0..current.len())];
                let index = messages.len() as u32;
                messages.push(MessageRec {
                    id: message_ids.next(now_ms),
                    guild: guild as u32,
                    channel,
                    author,
                });
                created[guild] += 1;
                live[shard].push(index);
                scripts[shard].push(ScriptEvent::MessageCreate { message: index });
            }
        }

        if config.inject_malformed {
            for script in &mut scripts {
                let at = script.len() / 10;
                let fake_user = user_ids.next(now_ms);
                script.splice(
                    at..at,
                    [
                        ScriptEvent::BrokenJson,
                        ScriptEvent::UnknownEvent,
                        ScriptEvent::MemberAddNoGuild { user_id: fake_user },
                    ],
                );
            }
        }

        // Record each add/remove/create's script position, so GUILD_CREATE can render the
        // guild as it stands at any script cursor.
        for script in &scripts {
            for (pos, event) in script.iter().enumerate() {
                let pos = pos as u32;
                match *event {
                    ScriptEvent::MemberAdd { member } => {
                        members[member as usize].added_at = Some(pos);
                    }
                    ScriptEvent::MemberRemove { member } => {
                        members[member as usize].removed_at = Some(pos);
                    }
                    ScriptEvent::ChannelCreate { channel } => {
                        channels[channel as usize].created_at = Some(pos);
                    }
                    _ => {}
                }
            }
        }

        let expected = Expected {
            guilds: guilds
                .iter()
                .enumerate()
                .map(|(i, g)| {
                    (
                        g.id,
                        ExpectedGuild {
                            shard: g.shard,
                            channels: g.channels.len() as u32,
                            roles: g.roles.len() as u32,
                            members: gen_guilds[i].current_members.len() as u32,
                            messages_created: created[i],
                            messages_deleted: deleted[i],
                        },
                    )
                })
                .collect::<BTreeMap<_, _>>(),
            message_ids: messages.iter().map(|m| m.id).collect(),
        };

        World {
            seed: config.seed,
            shards,
            bot_id,
            guilds,
            channels,
            members,
            messages,
            shard_guilds,
            scripts,
            expected,
        }
    }

    /// Whether channel `c` exists once the first `cursor` script events of its shard are sent.
    pub(crate) fn channel_visible(&self, c: u32, cursor: u32) -> bool {
        self.channels[c as usize]
            .created_at
            .is_none_or(|at| at < cursor)
    }

    /// Whether member `m` belongs to its guild once the first `cursor` script events are sent.
    pub(crate) fn member_visible(&self, m: u32, cursor: u32) -> bool {
        let member = &self.members[m as usize];
        member.added_at.is_none_or(|at| at < cursor)
            && member.removed_at.is_none_or(|at| at >= cursor)
    }
}

fn random_role_mask(rng: &mut fastrand::Rng, role_bits: usize) -> u8 {
    let mut mask = 0u8;
    for bit in 0..role_bits {
        if rng.u32(0..3) == 0 {
            mask |= 1 << bit;
        }
    }
    mask
}

/// Everything [`OtherCtx::other_event`] may read or change.
struct OtherCtx<'a> {
    rng: &'a mut fastrand::Rng,
    now_ms: u64,
    guild: usize,
    guilds: &'a mut [GuildRec],
    gen_guild: &'a mut GenGuild,
    channels: &'a mut Vec<ChannelRec>,
    members: &'a mut Vec<MemberRec>,
    /// Messages of this shard not yet deleted.
    live: &'a mut Vec<u32>,
    channel_ids: &'a mut IdGen,
    user_ids: &'a mut IdGen,
}

impl OtherCtx<'_> {
    /// One non-MESSAGE_CREATE event for the shard of `self.guild`. The kind is random; when the
    /// drawn kind is impossible (nothing to update yet, guild full…) the next kind is tried.
    fn other_event(&mut self) -> ScriptEvent {
        let start = self.rng.u32(0..5);
        for k in 0..5 {
            if let Some(event) = self.try_kind((start + k) % 5) {
                return event;
            }
        }
        // Unreachable in practice: a guild always has MIN_MEMBERS..MAX_MEMBERS members, so an
        // add or a remove is always possible. Fall back to a member add regardless.
        self.add_member()
    }

    fn try_kind(&mut self, kind: u32) -> Option<ScriptEvent> {
        match kind {
            0 if !self.live.is_empty() => {
                let message = self.live[self.rng.usize(0..self.live.len())];
                Some(ScriptEvent::MessageUpdate {
                    message,
                    edited_ms: self.now_ms,
                })
            }
            1 if !self.live.is_empty() => {
                let message = self.live.swap_remove(self.rng.usize(0..self.live.len()));
                Some(ScriptEvent::MessageDelete { message })
            }
            2 if self.gen_guild.current_members.len() < MAX_MEMBERS => Some(self.add_member()),
            3 if self.gen_guild.current_members.len() > MIN_MEMBERS => {
                // Position 0 holds the owner, who is never removed; `swap_remove` of a later
                // position never moves position 0.
                let current = &mut self.gen_guild.current_members;
                debug_assert_eq!(current[0], self.guilds[self.guild].owner);
                let member = current.swap_remove(self.rng.usize(1..current.len()));
                Some(ScriptEvent::MemberRemove { member })
            }
            4 if self.guilds[self.guild].channels.len() < MAX_CHANNELS => {
                let guild = &mut self.guilds[self.guild];
                let channel = self.channels.len() as u32;
                self.channels.push(ChannelRec {
                    id: self.channel_ids.next(self.now_ms),
                    guild: self.guild as u32,
                    position: guild.channels.len() as u32,
                    created_at: None,
                });
                guild.channels.push(channel);
                Some(ScriptEvent::ChannelCreate { channel })
            }
            _ => None,
        }
    }

    fn add_member(&mut self) -> ScriptEvent {
        let guild = &mut self.guilds[self.guild];
        let member = self.members.len() as u32;
        self.members.push(MemberRec {
            user_id: self.user_ids.next(self.now_ms),
            guild: self.guild as u32,
            joined_ms: self.now_ms,
            role_mask: random_role_mask(self.rng, guild.roles.len() - 1),
            added_at: None,
            removed_at: None,
        });
        guild.members.push(member);
        self.gen_guild.current_members.push(member);
        ScriptEvent::MemberAdd { member }
    }
}

/// Format ms since the Discord epoch as RFC 3339 with microseconds and `+00:00`, the way
/// Discord writes timestamps (e.g. `2024-05-01T12:34:56.789000+00:00`).
pub(crate) fn timestamp(ms_since_discord_epoch: u64, out: &mut String) {
    let unix_ms = ms_since_discord_epoch + DISCORD_EPOCH_MS;
    let secs = unix_ms / 1000;
    let millis = unix_ms % 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days, unsigned (dates after 1970).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    push_padded(out, year, 4);
    out.push('-');
    push_padded(out, month, 2);
    out.push('-');
    push_padded(out, day, 2);
    out.push('T');
    push_padded(out, rem / 3600, 2);
    out.push(':');
    push_padded(out, rem / 60 % 60, 2);
    out.push(':');
    push_padded(out, rem % 60, 2);
    out.push('.');
    push_padded(out, millis, 3);
    out.push_str("000+00:00");
}

/// Append `n` in decimal, zero-padded to at least `width` digits.
pub(crate) fn push_padded(out: &mut String, n: u64, width: usize) {
    let mut digits = [0u8; 20];
    let mut len = 0;
    let mut v = n;
    loop {
        digits[len] = b'0' + (v % 10) as u8;
        len += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for _ in len..width {
        out.push('0');
    }
    for d in digits[..len].iter().rev() {
        out.push(char::from(*d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard_messages(w: &World) -> Vec<usize> {
        w.scripts
            .iter()
            .map(|s| {
                s.iter()
                    .filter(|e| matches!(e, ScriptEvent::MessageCreate { .. }))
                    .count()
            })
            .collect()
    }

    fn small(seed: u64) -> SimConfig {
        SimConfig {
            seed,
            guilds: 200,
            shards: 4,
            messages: 5_000,
            ..SimConfig::default()
        }
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let mut s = String::new();
        timestamp(SCRIPT_START_MS + 45_296_789, &mut s);
        assert_eq!(s, "2024-05-01T12:34:56.789000+00:00");
        s.clear();
        timestamp(0, &mut s);
        assert_eq!(s, "2015-01-01T00:00:00.000000+00:00");
        s.clear();
        // 2016-02-29 (leap day) 23:59:59.999
        timestamp(1_456_790_399_999 - DISCORD_EPOCH_MS, &mut s);
        assert_eq!(s, "2016-02-29T23:59:59.999000+00:00");
    }

    #[test]
    fn worlds_with_different_id_processes_share_no_id() {
        let ids = |process: u8| {
            let w = World::generate(&SimConfig {
                id_process: process,
                ..small(7)
            });
            let mut ids: Vec<u64> = w.guilds.iter().map(|g| g.id).collect();
            ids.extend(w.channels.iter().map(|c| c.id));
            ids.extend(w.messages.iter().map(|m| m.id));
            ids.extend(w.members.iter().map(|m| m.user_id));
            ids.into_iter().collect::<std::collections::BTreeSet<u64>>()
        };
        let (a, b) = (ids(1), ids(2));
        assert!(!a.is_empty());
        assert!(a.is_disjoint(&b));
        // The same seed without a process id gives the same ids with process 0.
        assert_eq!(ids(0).len(), a.len());
    }

    #[test]
    fn same_seed_same_world() {
        let a = World::generate(&small(7));
        let b = World::generate(&small(7));
        assert_eq!(a.scripts, b.scripts);
        assert_eq!(a.expected, b.expected);
        assert_eq!(
            a.guilds.iter().map(|g| g.id).collect::<Vec<_>>(),
            b.guilds.iter().map(|g| g.id).collect::<Vec<_>>()
        );
        let c = World::generate(&small(8));
        assert_ne!(a.expected, c.expected);
    }

    #[test]
    fn guilds_spread_over_all_shards_by_discords_formula() {
        let w = World::generate(&small(42));
        let mut per_shard = [0u32; 4];
        for g in &w.guilds {
            assert_eq!(g.shard, ((g.id >> 22) % 4) as u32);
            per_shard[g.shard as usize] += 1;
        }
        assert!(per_shard.iter().all(|n| *n >= 20), "{per_shard:?}");
        // Every shard with guilds gets messages, and the per-shard counts add up.
        let per_shard_messages = shard_messages(&w);
        assert!(per_shard_messages.iter().all(|n| *n > 0));
        assert_eq!(per_shard_messages.iter().sum::<usize>(), 5_000);
        // Few guilds: still one per shard.
        let tiny = World::generate(&SimConfig {
            guilds: 4,
            messages: 4,
            ..small(1)
        });
        let mut shards: Vec<u32> = tiny.guilds.iter().map(|g| g.shard).collect();
        shards.sort_unstable();
        assert_eq!(shards, [0, 1, 2, 3]);
        assert!(shard_messages(&tiny).iter().all(|n| *n == 1));
    }

    #[test]
    fn ids_are_unique_and_messages_increase() {
        let w = World::generate(&small(3));
        let mut all: Vec<u64> = w.guilds.iter().map(|g| g.id).collect();
        all.extend(w.channels.iter().map(|c| c.id));
        all.extend(w.members.iter().map(|m| m.user_id));
        all.extend(w.messages.iter().map(|m| m.id));
        all.extend(
            w.guilds
                .iter()
                .flat_map(|g| g.roles[1..].iter().map(|r| r.id)),
        );
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
        assert!(w.expected.message_ids.windows(2).all(|p| p[0] < p[1]));
        for g in &w.guilds {
            assert_eq!(g.roles[0].id, g.id, "@everyone role id is the guild id");
            assert!((2..=6).contains(&g.roles.len()));
        }
    }

    #[test]
    fn script_mixes_other_events_and_expected_matches() {
        let w = World::generate(&small(5));
        let all: Vec<ScriptEvent> = w.scripts.iter().flatten().copied().collect();
        let creates = all
            .iter()
            .filter(|e| matches!(e, ScriptEvent::MessageCreate { .. }))
            .count();
        let others = all.len() - creates;
        assert_eq!(creates, 5_000);
        assert!((300..=700).contains(&others), "{others} other events");
        for kind in 0..5 {
            assert!(
                all.iter().any(|e| matches!(
                    (kind, e),
                    (0, ScriptEvent::MessageUpdate { .. })
                        | (1, ScriptEvent::MessageDelete { .. })
                        | (2, ScriptEvent::MemberAdd { .. })
                        | (3, ScriptEvent::MemberRemove { .. })
                        | (4, ScriptEvent::ChannelCreate { .. })
                )),
                "kind {kind} missing"
            );
        }
        // Expected member counts = members visible after the whole script.
        for (gi, g) in w.guilds.iter().enumerate() {
            let end = w.scripts[g.shard as usize].len() as u32;
            let visible = g
                .members
                .iter()
                .filter(|m| w.member_visible(**m, end))
                .count();
            let exp = &w.expected.guilds[&g.id];
            assert_eq!(exp.members as usize, visible, "guild {gi}");
            assert!(exp.members < 50);
            assert_eq!(exp.channels as usize, g.channels.len());
            let deletes = w.scripts[g.shard as usize]
                .iter()
                .filter(|e| {
                    matches!(e, ScriptEvent::MessageDelete { message }
                    if w.messages[*message as usize].guild as usize == gi)
                })
                .count();
            assert_eq!(exp.messages_deleted as usize, deletes);
        }
        // Updates and deletes only touch messages created earlier in the same shard script.
        for script in &w.scripts {
            let mut seen = std::collections::HashSet::new();
            let mut gone = std::collections::HashSet::new();
            for e in script {
                match *e {
                    ScriptEvent::MessageCreate { message } => {
                        seen.insert(message);
                    }
                    ScriptEvent::MessageUpdate { message, .. } => {
                        assert!(seen.contains(&message) && !gone.contains(&message));
                    }
                    ScriptEvent::MessageDelete { message } => {
                        assert!(seen.contains(&message) && gone.insert(message));
                    }
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn malformed_frames_are_injected_per_shard() {
        let w = World::generate(&SimConfig {
            inject_malformed: true,
            ..small(9)
        });
        let plain = World::generate(&small(9));
        assert_eq!(w.expected, plain.expected);
        for (s, script) in w.scripts.iter().enumerate() {
            let at = plain.scripts[s].len() / 10;
            assert_eq!(script[at], ScriptEvent::BrokenJson);
            assert_eq!(script[at + 1], ScriptEvent::UnknownEvent);
            assert!(matches!(
                script[at + 2],
                ScriptEvent::MemberAddNoGuild { .. }
            ));
            assert_eq!(script.len(), plain.scripts[s].len() + 3);
        }
    }
}
