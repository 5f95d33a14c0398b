//! Exactly-once verification: what the partition files hold against what the simulator sent.
//!
//! Used by the demo, the integration tests and the benchmark, always on files at rest (after the
//! node stopped) and read-only. "Exactly once" is checked three ways: every message id the
//! simulator created is stored, none is stored that it did not create, and no message is counted
//! twice — neither as two rows (two partitions) nor in `message_stats` (a re-applied create).

use std::collections::BTreeMap;
use std::path::Path;

use crate::ownership::{PartitionId, Topology};
use crate::simulator::Expected;
use crate::store::{GuildCounts, PartitionStore, StoreError, TableCounts};

/// How many example ids a report keeps per kind of discrepancy.
const EXAMPLES: usize = 10;

/// One guild whose stored entities differ from the simulator's final world.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GuildMismatch {
    /// The guild.
    pub guild_id: u64,
    /// What was stored (None: no guild row at all).
    pub stored: Option<GuildCounts>,
    /// `(channels, roles, members, messages created, messages deleted)` the simulator expects.
    pub expected: (u32, u32, u32, u32, u32),
}

/// The outcome of [`verify`].
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Verification {
    /// MESSAGE_CREATE ids the simulator's script holds for the checked shards.
    pub expected_messages: u64,
    /// Distinct message ids stored.
    pub stored_messages: u64,
    /// Expected ids not stored.
    pub missing: u64,
    /// Stored ids the simulator never created.
    pub unexpected: u64,
    /// Messages stored or counted more than once: rows of one id in several partitions, plus
    /// `message_stats` counts beyond one per stored message.
    pub duplicates: u64,
    /// Guild rows in a partition that does not own the guild (DESIGN §2).
    pub misplaced_guilds: u64,
    /// Guilds whose entity or message counts differ from the simulator's.
    pub guild_mismatches: Vec<GuildMismatch>,
    /// Examples of missing ids.
    pub missing_examples: Vec<u64>,
    /// Sum of every partition's table counts.
    pub totals: TableCounts,
}

impl Verification {
    /// True when every message is stored exactly once and every guild matches.
    pub fn is_exact(&self) -> bool {
        self.missing == 0
            && self.unexpected == 0
            && self.duplicates == 0
            && self.misplaced_guilds == 0
            && self.guild_mismatches.is_empty()
    }
}

/// Reads every partition file of the topology under `data_dir` (all shards: one pod's files, or
/// several pods' data dirs merged) and compares them with `expected`. Blocking: call it off the
/// async threads.
///
/// # Errors
/// [`StoreError`] if a partition file is missing or unreadable.
pub fn verify(
    data_dir: &Path,
    topology: Topology,
    expected: &Expected,
) -> Result<Verification, StoreError> {
    let mut v = Verification::default();
    let mut stored_ids: Vec<u64> = Vec::new();
    let mut stored_guilds: BTreeMap<u64, GuildCounts> = BTreeMap::new();
    for partition in (0..topology.partitions()).map(PartitionId) {
        let store = PartitionStore::open_read_only(
            &PartitionStore::path_in(data_dir, partition),
            partition,
        )?;
        let counts = store.counts()?;
        v.totals += counts;
        // message_stats counts guild messages once each; more means a create was applied twice.
        let guild_messages: u64 = store
            .guild_counts()?
            .into_iter()
            .map(|g| {
                if topology.partition_of_guild(g.guild_id) != partition {
                    v.misplaced_guilds += 1;
                }
                let n = u64::from(g.messages);
                stored_guilds.insert(g.guild_id, g);
                n
            })
            .sum();
        v.duplicates += counts.message_stats_total.saturating_sub(guild_messages);
        stored_ids.extend(store.message_ids()?);
    }
    stored_ids.sort_unstable();
    let before = stored_ids.len();
    stored_ids.dedup();
    v.duplicates += (before - stored_ids.len()) as u64;
    v.stored_messages = stored_ids.len() as u64;

    let mut expected_ids = expected.message_ids.clone();
    expected_ids.sort_unstable();
    expected_ids.dedup();
    v.expected_messages = expected_ids.len() as u64;
    let (mut i, mut j) = (0, 0);
    while i < expected_ids.len() || j < stored_ids.len() {
        match (expected_ids.get(i), stored_ids.get(j)) {
            (Some(e), Some(s)) if e == s => {
                i += 1;
                j += 1;
            }
            // Expected but not stored: the next stored id is larger, or none is left.
            (Some(e), s) if s.is_none_or(|s| e < s) => {
                v.missing += 1;
                if v.missing_examples.len() < EXAMPLES {
                    v.missing_examples.push(*e);
                }
                i += 1;
            }
            _ => {
                v.unexpected += 1;
                j += 1;
            }
        }
    }

    for (guild_id, g) in &expected.guilds {
        let want = (
            g.channels,
            g.roles,
            g.members,
            g.messages_created,
            g.messages_deleted,
        );
        let stored = stored_guilds.get(guild_id).copied();
        let matches = stored.is_some_and(|s| {
            (
                s.channels,
                s.roles,
                s.members,
                s.messages,
                s.messages_deleted,
            ) == want
                && s.message_stats_total == g.messages_created
        });
        if !matches {
            v.guild_mismatches.push(GuildMismatch {
                guild_id: *guild_id,
                stored,
                expected: want,
            });
        }
    }
    Ok(v)
}
