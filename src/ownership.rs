//! Ownership: the one pure function that decides where a guild lives (DESIGN §2).
//!
//! Given `S` (Discord shard total), `P` (partitions) and `M` (pods):
//!
//! ```text
//! key(guild)        = guild_id >> 22                 (milliseconds since the Discord epoch)
//! partition(guild)  = key % P
//! shard(guild)      = key % S = partition % S        (Discord's sharding formula)
//! pod(shard)        = assign(S, M)[shard]            (balanced: ⌊S/M⌋ or ⌈S/M⌉ shards per pod)
//! pod(guild)        = pod(shard(guild))
//! ```
//!
//! Everything here is a pure function of its arguments: no I/O, no async, no clock, no randomness,
//! and no dependency on the rest of the crate. Every pod, the router and the CLI compute the same
//! answers without coordinating. (The only state is a small process-wide memo of [`assign`] tables
//! so that [`Topology::pod_of_shard`] is O(1) after the first call; it never changes an answer.)

use std::fmt;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// A guild partition number, `0..partitions` (DESIGN §2: `partition = (guild_id >> 22) % P`).
///
/// Displays as `p0007` — the file stem `p{id:04}` of the partition's SQLite file and replica path
/// (DESIGN §4, §6). Ids of 10000 and more simply print more digits (`p12345`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PartitionId(pub u32);

impl PartitionId {
    /// The partition's SQLite file name inside `data_dir/partitions/`, e.g. `"p0007.sqlite3"`
    /// (DESIGN §4).
    pub fn file_name(self) -> String {
        format!("{self}.sqlite3")
    }
}

impl fmt::Display for PartitionId {
    /// `p` followed by the id zero-padded to four digits: `p0007`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p{:04}", self.0)
    }
}

/// The ownership key of a guild: `guild_id >> 22`, the snowflake's timestamp in milliseconds
/// since the Discord epoch (2015-01-01T00:00:00Z). Discord's sharding formula is `key % shards`.
pub fn guild_key(guild_id: u64) -> u64 {
    guild_id >> 22
}

/// Why a `(shards, partitions, pods)` triple is not a valid topology (DESIGN §2).
///
/// Display names the config key, its value and the rule broken, e.g.
/// `cluster.partitions = 48 is not a power of two`. [`TopologyError::key`],
/// [`TopologyError::value`] and [`TopologyError::rule`] give the parts separately (used by
/// `config` to build its own error).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    /// `discord.shards` is 0 or not a power of two. Discord accepts any total, but S must be a
    /// power of two so that it divides P and resharding (S → 2S) keeps partitions whole.
    #[error("discord.shards = {shards} is not a power of two (1, 2, 4, 8, …)")]
    ShardsNotPowerOfTwo {
        /// The rejected shard total.
        shards: u32,
    },
    /// `cluster.partitions` is 0 or not a power of two (P must be a multiple of every S ≤ P).
    #[error("cluster.partitions = {partitions} is not a power of two (1, 2, 4, 8, …)")]
    PartitionsNotPowerOfTwo {
        /// The rejected partition count.
        partitions: u32,
    },
    /// `discord.shards` exceeds `cluster.partitions`: every shard needs at least one partition.
    #[error(
        "discord.shards = {shards} exceeds cluster.partitions = {partitions} (every shard needs at least one partition)"
    )]
    ShardsExceedPartitions {
        /// Shard total.
        shards: u32,
        /// Partition count.
        partitions: u32,
    },
    /// `cluster.pods` is 0.
    #[error("cluster.pods = 0 is less than 1 (at least one pod must run the shards)")]
    NoPods,
    /// `cluster.pods` exceeds `discord.shards`: a pod without a shard would own nothing.
    #[error(
        "cluster.pods = {pods} exceeds discord.shards = {shards} (a pod without a shard would own nothing)"
    )]
    PodsExceedShards {
        /// Pod count.
        pods: u32,
        /// Shard total.
        shards: u32,
    },
}

impl TopologyError {
    /// The config key whose value broke the rule: `discord.shards`, `cluster.partitions` or
    /// `cluster.pods`.
    pub fn key(&self) -> &'static str {
        match self {
            TopologyError::ShardsNotPowerOfTwo { .. }
            | TopologyError::ShardsExceedPartitions { .. } => "discord.shards",
            TopologyError::PartitionsNotPowerOfTwo { .. } => "cluster.partitions",
            TopologyError::NoPods | TopologyError::PodsExceedShards { .. } => "cluster.pods",
        }
    }

    /// The rejected value of [`TopologyError::key`].
    pub fn value(&self) -> u32 {
        match *self {
            TopologyError::ShardsNotPowerOfTwo { shards } => shards,
            TopologyError::PartitionsNotPowerOfTwo { partitions } => partitions,
            TopologyError::ShardsExceedPartitions { shards, .. } => shards,
            TopologyError::NoPods => 0,
            TopologyError::PodsExceedShards { pods, .. } => pods,
        }
    }

    /// The rule, phrased as a requirement (`"must be a power of two"`), without key or value.
    pub fn rule(&self) -> String {
        match *self {
            TopologyError::ShardsNotPowerOfTwo { .. }
            | TopologyError::PartitionsNotPowerOfTwo { .. } => {
                "must be a power of two (1, 2, 4, 8, …)".to_owned()
            }
            TopologyError::ShardsExceedPartitions { partitions, .. } => format!(
                "must be at most cluster.partitions = {partitions} (every shard needs at least one partition)"
            ),
            TopologyError::NoPods => "must be at least 1".to_owned(),
            TopologyError::PodsExceedShards { shards, .. } => format!(
                "must be at most discord.shards = {shards} (a pod without a shard would own nothing)"
            ),
        }
    }
}

/// A validated `(shards, partitions, pods)` triple: S and P powers of two, 1 ≤ S ≤ P, 1 ≤ M ≤ S.
///
/// Construct with [`Topology::new`]; all methods are pure and cheap. Methods taking a shard number
/// panic if it is not `< shards()` (a caller bug: shard numbers come from this type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    shards: u32,
    partitions: u32,
    pods: u32,
}

impl Topology {
    /// Validates and builds a topology (DESIGN §2).
    ///
    /// `shards` = Discord shard total S, `partitions` = P, `pods` = M.
    ///
    /// # Errors
    /// The first broken rule, checked in this order: S ≥ 1 and a power of two
    /// ([`TopologyError::ShardsNotPowerOfTwo`]); P a power of two
    /// ([`TopologyError::PartitionsNotPowerOfTwo`]); S ≤ P
    /// ([`TopologyError::ShardsExceedPartitions`]); M ≥ 1 ([`TopologyError::NoPods`]); M ≤ S
    /// ([`TopologyError::PodsExceedShards`]).
    pub fn new(shards: u32, partitions: u32, pods: u32) -> Result<Topology, TopologyError> {
        if !shards.is_power_of_two() {
            return Err(TopologyError::ShardsNotPowerOfTwo { shards });
        }
        if !partitions.is_power_of_two() {
            return Err(TopologyError::PartitionsNotPowerOfTwo { partitions });
        }
        if shards > partitions {
            return Err(TopologyError::ShardsExceedPartitions { shards, partitions });
        }
        if pods == 0 {
            return Err(TopologyError::NoPods);
        }
        if pods > shards {
            return Err(TopologyError::PodsExceedShards { pods, shards });
        }
        Ok(Topology {
            shards,
            partitions,
            pods,
        })
    }

    /// Discord shard total S.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// Partition count P.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Pod count M.
    pub fn pods(&self) -> u32 {
        self.pods
    }

    /// The partition holding a guild: `(guild_id >> 22) % P`.
    pub fn partition_of_guild(&self, guild_id: u64) -> PartitionId {
        PartitionId((guild_key(guild_id) % u64::from(self.partitions)) as u32)
    }

    /// The shard that receives a guild's events: `(guild_id >> 22) % S` — Discord's sharding
    /// formula. Equals `shard_of_partition(partition_of_guild(guild_id))` because S divides P.
    pub fn shard_of_guild(&self, guild_id: u64) -> u32 {
        (guild_key(guild_id) % u64::from(self.shards)) as u32
    }

    /// The shard carrying a partition: `p % S`. `p` should be `< partitions()`; larger ids are
    /// reduced the same way (and caught by a debug assertion).
    pub fn shard_of_partition(&self, p: PartitionId) -> u32 {
        debug_assert!(
            p.0 < self.partitions,
            "{p} out of range 0..{}",
            self.partitions
        );
        p.0 % self.shards
    }

    /// The partitions a shard carries, ascending: `shard, shard + S, shard + 2S, …` (P/S of them).
    ///
    /// # Panics
    /// If `shard >= shards()`.
    pub fn partitions_of_shard(&self, shard: u32) -> Vec<PartitionId> {
        self.check_shard(shard);
        (shard..self.partitions)
            .step_by(self.shards as usize)
            .map(PartitionId)
            .collect()
    }

    /// The partition for a shard's events that carry no guild (DMs, READY, USER_UPDATE): `p = shard`
    /// (DESIGN §2). It is always one of [`Topology::partitions_of_shard`].
    ///
    /// # Panics
    /// If `shard >= shards()`.
    pub fn home_partition(&self, shard: u32) -> PartitionId {
        self.check_shard(shard);
        PartitionId(shard)
    }

    /// The pod running a shard: `assign(S, M)[shard]` (see [`assign`]). O(1) after the first call
    /// for this (S, M) in the process (the table is memoised).
    ///
    /// # Panics
    /// If `shard >= shards()`.
    pub fn pod_of_shard(&self, shard: u32) -> u32 {
        self.check_shard(shard);
        cached_assign(self.shards, self.pods)[shard as usize]
    }

    /// The pod owning a guild: `pod_of_shard(shard_of_guild(guild_id))`.
    pub fn pod_of_guild(&self, guild_id: u64) -> u32 {
        self.pod_of_shard(self.shard_of_guild(guild_id))
    }

    /// The shards a pod runs, ascending (⌊S/M⌋ or ⌈S/M⌉ of them). Empty if `pod >= pods()`.
    pub fn shards_of_pod(&self, pod: u32) -> Vec<u32> {
        cached_assign(self.shards, self.pods)
            .iter()
            .enumerate()
            .filter(|&(_, &owner)| owner == pod)
            .map(|(shard, _)| shard as u32)
            .collect()
    }

    /// The partitions pod `pod` owns: those of its shards ([`Topology::shards_of_pod`]), in
    /// shard order (DESIGN §2).
    pub fn partitions_of_pod(&self, pod: u32) -> Vec<PartitionId> {
        self.shards_of_pod(pod)
            .into_iter()
            .flat_map(|s| self.partitions_of_shard(s))
            .collect()
    }

    fn check_shard(&self, shard: u32) {
        assert!(
            shard < self.shards,
            "shard {shard} out of range 0..{}",
            self.shards
        );
    }
}

/// Distributes shards `0..shards` over pods `0..pods`: the returned vector has one entry per shard
/// (index = shard, value = pod). DESIGN §2's `assign(S, M)`.
///
/// Properties (all tested):
/// - pure and deterministic: a function of `(shards, pods)` only;
/// - balanced to ±1: every pod owns ⌊S/M⌋ or ⌈S/M⌉ shards;
/// - minimal movement: `assign(S, M+1)` differs from `assign(S, M)` only in shards that move to the
///   new pod `M`; no shard moves between two old pods (so `M+1 → M` moves only pod `M`'s shards).
///
/// Construction (iterative, over m = 1 … M−1): `assign(S, 1)` puts every shard on pod 0; to go
/// from m to m+1 pods, the new pod m takes ⌊S/(m+1)⌋ shards one at a time, each from the currently
/// most-loaded old pod (ties → lowest pod index), taking that pod's highest-numbered shard.
///
/// Cost: O(S·log S + S·H(M) + M²) time (H = harmonic number, from Σ ⌊S/(m+1)⌋ moves), O(S) memory;
/// S = 65536, M = 1024 takes milliseconds.
///
/// `pods > shards` is accepted (the extra pods own nothing, still balanced ±1); `shards == 0`
/// gives an empty vector.
///
/// # Panics
/// If `pods == 0`.
pub fn assign(shards: u32, pods: u32) -> Vec<u32> {
    // Balance proof (induction on m). With m pods, write S = q·m + r (0 ≤ r < m); assume every
    // pod owns q or q+1 shards (true for m = 1: pod 0 owns S). Adding pod m, write
    // S = a·(m+1) + b (0 ≤ b ≤ m); the new pod takes t = a = ⌊S/(m+1)⌋ shards. Each take removes
    // one shard from a pod of maximal load, which keeps the old pods within 1 of each other (a
    // maximum minus one is ≥ the minimum). So afterwards the m old pods hold S − t = a·m + b
    // shards within ±1 of each other, i.e. ⌊(a·m+b)/m⌋ or ⌈(a·m+b)/m⌉ = a or a+1 (as b ≤ m),
    // with a+1 only if b > 0. The new pod holds a. Since ⌊S/(m+1)⌋ = a and ⌈S/(m+1)⌉ = a + [b>0],
    // all m+1 pods own ⌊S/(m+1)⌋ or ⌈S/(m+1)⌉ shards. A take never hits an empty pod: before each
    // take the old pods hold ≥ S − t + 1 ≥ 1 shards in total, so a maximal one is non-empty.
    // Only the new pod gains shards, so no shard moves between two old pods.
    assert!(pods >= 1, "assign: pods must be at least 1");
    let mut owner = vec![0u32; shards as usize];
    // members[p]: pod p's shards, ascending (so `pop` yields its highest-numbered shard).
    let mut members: Vec<Vec<u32>> = Vec::with_capacity(pods as usize);
    members.push((0..shards).collect());
    for new_pod in 1..pods {
        let old = new_pod as usize;
        let take = (shards / (new_pod + 1)) as usize;
        // Loads are q or q+1; the q+1 pods (or all, if equal) form the first "round" of most
        // loaded pods, visited by ascending index. After a round all loads are equal, so each
        // later round visits all old pods 0..m ascending — exactly "most loaded, ties → lowest".
        let max = members.iter().map(Vec::len).max().unwrap_or(0);
        let mut round: Vec<usize> = (0..old).filter(|&p| members[p].len() == max).collect();
        let mut cursor = 0;
        let mut taken = Vec::with_capacity(take);
        for _ in 0..take {
            if cursor == round.len() {
                round.clear();
                round.extend(0..old);
                cursor = 0;
            }
            let from = round[cursor];
            cursor += 1;
            let shard = members[from]
                .pop()
                .expect("balance proof: a most-loaded old pod is never empty");
            owner[shard as usize] = new_pod;
            taken.push(shard);
        }
        taken.sort_unstable();
        members.push(taken);
    }
    owner
}

/// Memo of recent `assign` tables, keyed by (S, M). Small and bounded; a pure cache.
fn cached_assign(shards: u32, pods: u32) -> Arc<[u32]> {
    const CAPACITY: usize = 8;
    type Memo = Vec<((u32, u32), Arc<[u32]>)>;
    static MEMO: Mutex<Memo> = Mutex::new(Vec::new());
    let key = (shards, pods);
    {
        let memo = MEMO.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, table)) = memo.iter().find(|(k, _)| *k == key) {
            return Arc::clone(table);
        }
    }
    // Computed outside the lock; two racing threads compute the same table.
    let table: Arc<[u32]> = assign(shards, pods).into();
    let mut memo = MEMO.lock().unwrap_or_else(|e| e.into_inner());
    if !memo.iter().any(|(k, _)| *k == key) {
        if memo.len() >= CAPACITY {
            memo.remove(0);
        }
        memo.push((key, Arc::clone(&table)));
    }
    table
}

/// The shards (and their partitions) that change pods when the pod count goes from `from_pods` to
/// `to_pods`, for `shardlite plan` and for rescaling (DESIGN §7). Serialises as JSON/TOML.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Discord shard total S (unchanged by the plan).
    pub shards: u32,
    /// Partition count P (unchanged by the plan).
    pub partitions: u32,
    /// Pod count before.
    pub from_pods: u32,
    /// Pod count after.
    pub to_pods: u32,
    /// Every shard whose pod changes, ascending by shard.
    pub moves: Vec<ShardMove>,
}

/// One shard changing pods, taking all its partitions along (a partition never splits).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMove {
    /// The shard that moves.
    pub shard: u32,
    /// Its pod under `from_pods`.
    pub from_pod: u32,
    /// Its pod under `to_pods`.
    pub to_pod: u32,
    /// The partitions it carries, ascending (`Topology::partitions_of_shard`).
    pub partitions: Vec<PartitionId>,
}

/// Computes which shards move when the pod count changes from `from_pods` to `to_pods` (S and P
/// fixed). Growing by one pod moves only shards onto the new pod; shrinking by one moves only the
/// removed pod's shards (see [`assign`]).
///
/// # Errors
/// [`TopologyError`] if `(shards, partitions, from_pods)` or `(shards, partitions, to_pods)` is
/// not a valid [`Topology`].
pub fn plan(
    shards: u32,
    partitions: u32,
    from_pods: u32,
    to_pods: u32,
) -> Result<Plan, TopologyError> {
    let from = Topology::new(shards, partitions, from_pods)?;
    Topology::new(shards, partitions, to_pods)?;
    let before = assign(shards, from_pods);
    let after = assign(shards, to_pods);
    let moves = before
        .iter()
        .zip(&after)
        .enumerate()
        .filter(|(_, (b, a))| b != a)
        .map(|(shard, (&from_pod, &to_pod))| ShardMove {
            shard: shard as u32,
            from_pod,
            to_pod,
            partitions: from.partitions_of_shard(shard as u32),
        })
        .collect();
    Ok(Plan {
        shards,
        partitions,
        from_pods,
        to_pods,
        moves,
    })
}

impl Plan {
    /// How many partitions move in total (Σ over moves of P/S).
    pub fn moved_partitions(&self) -> usize {
        self.moves.iter().map(|m| m.partitions.len()).sum()
    }
}

impl fmt::Display for Plan {
    /// A human table, one line per moving shard, then a summary:
    ///
    /// ```text
    /// pods 3 → 4 (8 shards, 64 partitions)
    /// shard 5: pod 2 → pod 3 (partitions p0005 p0013 …)
    /// 2 of 8 shards move, 16 of 64 partitions
    /// 16 lease transfers and 16 restores from the replica
    /// ```
    ///
    /// Leases are per partition (DESIGN §7): every moved partition is one lease released by its
    /// old pod and acquired by its new one, and one restore there.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "pods {} → {} ({} shards, {} partitions)",
            self.from_pods, self.to_pods, self.shards, self.partitions
        )?;
        for m in &self.moves {
            write!(
                f,
                "shard {}: pod {} → pod {} (partitions",
                m.shard, m.from_pod, m.to_pod
            )?;
            for p in &m.partitions {
                write!(f, " {p}")?;
            }
            writeln!(f, ")")?;
        }
        writeln!(
            f,
            "{} of {} shards move, {} of {} partitions",
            self.moves.len(),
            self.shards,
            self.moved_partitions(),
            self.partitions
        )?;
        let moved = self.moved_partitions();
        write!(
            f,
            "{moved} lease transfers and {moved} restores from the replica"
        )
    }
}

/// The seed deployments' guild → pod mapping, kept only for `shardlite owner --md5` migration
/// (DESIGN §2: it is *not* the ownership function): md5 of the guild id's decimal string, the
/// digest's first 4 bytes read big-endian, modulo `pods`.
///
/// # Panics
/// If `pods == 0`.
pub fn legacy_md5_pod(guild_id: u64, pods: u32) -> u32 {
    use md5::{Digest, Md5};
    assert!(pods >= 1, "legacy_md5_pod: pods must be at least 1");
    let digest = Md5::digest(guild_id.to_string().as_bytes());
    let head = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    head % pods
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn counts(table: &[u32], pods: u32) -> Vec<usize> {
        let mut c = vec![0usize; pods as usize];
        for &p in table {
            c[p as usize] += 1;
        }
        c
    }

    fn assert_balanced(table: &[u32], shards: u32, pods: u32) {
        let lo = (shards / pods) as usize;
        let hi = shards.div_ceil(pods) as usize;
        for (pod, n) in counts(table, pods).into_iter().enumerate() {
            assert!(
                lo <= n && n <= hi,
                "assign({shards}, {pods}): pod {pod} owns {n}, want {lo}..={hi}"
            );
        }
    }

    #[test]
    fn partition_id_display_and_file_name() {
        assert_eq!(PartitionId(7).to_string(), "p0007");
        assert_eq!(PartitionId(0).file_name(), "p0000.sqlite3");
        assert_eq!(PartitionId(12345).to_string(), "p12345");
        assert_eq!(serde_json::to_string(&PartitionId(3)).unwrap(), "3");
    }

    #[test]
    fn guild_key_is_snowflake_timestamp() {
        // Discord's docs example snowflake: 175928847299117063 → 41944705796 ms since epoch.
        assert_eq!(guild_key(175928847299117063), 41944705796);
    }

    #[test]
    fn formulas_small_example() {
        let t = Topology::new(4, 16, 2).unwrap();
        let id = (37u64 << 22) | 0x3f_ffff; // key 37
        assert_eq!(t.partition_of_guild(id), PartitionId(5));
        assert_eq!(t.shard_of_guild(id), 1);
        assert_eq!(t.shard_of_partition(PartitionId(5)), 1);
        assert_eq!(
            t.partitions_of_shard(1),
            vec![
                PartitionId(1),
                PartitionId(5),
                PartitionId(9),
                PartitionId(13)
            ]
        );
        assert_eq!(t.home_partition(3), PartitionId(3));
        assert_eq!(assign(4, 2), vec![0, 0, 1, 1]);
        assert_eq!(t.shards_of_pod(0), vec![0, 1]);
        assert_eq!(t.shards_of_pod(1), vec![2, 3]);
        assert_eq!(t.shards_of_pod(2), Vec::<u32>::new());
        assert_eq!(t.pod_of_guild(id), 0);
    }

    #[test]
    fn assign_known_tables() {
        assert_eq!(assign(1, 1), vec![0]);
        assert_eq!(assign(8, 1), vec![0; 8]);
        // 8 shards, 3 pods: pod 1 takes 4 (7,6,5,4); pod 2 takes 2 from pods 0 and 1 (their top).
        assert_eq!(assign(8, 3), vec![0, 0, 0, 2, 1, 1, 1, 2]);
        let mut eight = assign(8, 8);
        eight.sort_unstable();
        assert_eq!(eight, (0..8).collect::<Vec<_>>());
        assert_eq!(assign(0, 3), Vec::<u32>::new());
        // More pods than shards: extra pods idle, still ±1.
        assert_balanced(&assign(4, 6), 4, 6);
    }

    #[test]
    fn assign_large_is_fast_and_balanced() {
        let start = std::time::Instant::now();
        let t = assign(65536, 1024);
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
        assert_balanced(&t, 65536, 1024);
        let t = assign(65536, 1000);
        assert_balanced(&t, 65536, 1000);
    }

    #[test]
    #[should_panic(expected = "pods must be at least 1")]
    fn assign_zero_pods_panics() {
        assign(4, 0);
    }

    #[test]
    fn invalid_topologies_name_the_rule() {
        let cases = [
            (
                (0, 64, 1),
                "discord.shards",
                "discord.shards = 0 is not a power of two",
            ),
            (
                (6, 64, 1),
                "discord.shards",
                "discord.shards = 6 is not a power of two",
            ),
            (
                (8, 48, 1),
                "cluster.partitions",
                "cluster.partitions = 48 is not a power of two",
            ),
            (
                (8, 0, 1),
                "cluster.partitions",
                "cluster.partitions = 0 is not a power of two",
            ),
            (
                (128, 64, 1),
                "discord.shards",
                "discord.shards = 128 exceeds cluster.partitions = 64",
            ),
            (
                (8, 64, 0),
                "cluster.pods",
                "cluster.pods = 0 is less than 1",
            ),
            (
                (8, 64, 9),
                "cluster.pods",
                "cluster.pods = 9 exceeds discord.shards = 8",
            ),
        ];
        for ((s, p, m), key, msg) in cases {
            let err = Topology::new(s, p, m).unwrap_err();
            assert_eq!(err.key(), key, "{err}");
            assert!(err.to_string().starts_with(msg), "{err} vs {msg}");
            assert!(!err.rule().is_empty());
            assert!(plan(s, p, m, 1).is_err() || plan(s, p, 1, m).is_err());
        }
        assert_eq!(Topology::new(8, 48, 1).unwrap_err().value(), 48);
        assert!(Topology::new(1, 1, 1).is_ok());
        assert!(Topology::new(64, 64, 64).is_ok());
    }

    #[test]
    fn plan_display_and_summary() {
        let p = plan(4, 8, 1, 2).unwrap();
        assert_eq!(p.moves.len(), 2);
        assert_eq!(
            p.to_string(),
            "pods 1 → 2 (4 shards, 8 partitions)\n\
             shard 2: pod 0 → pod 1 (partitions p0002 p0006)\n\
             shard 3: pod 0 → pod 1 (partitions p0003 p0007)\n\
             2 of 4 shards move, 4 of 8 partitions\n\
             4 lease transfers and 4 restores from the replica"
        );
        let none = plan(4, 8, 2, 2).unwrap();
        assert!(none.moves.is_empty());
        assert!(
            none.to_string()
                .contains("0 of 4 shards move, 0 of 8 partitions\n0 lease transfers")
        );
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["moves"][0]["partitions"], serde_json::json!([2, 6]));
    }

    #[test]
    fn legacy_md5_mapping() {
        // md5("0") = cfcd2084…: 0xcfcd2084 = 3486326916.
        assert_eq!(legacy_md5_pod(0, u32::MAX), 3486326916);
        assert_eq!(legacy_md5_pod(0, 7), 3486326916 % 7);
        // md5("123") = 202cb962…
        assert_eq!(legacy_md5_pod(123, 1000), 0x202c_b962 % 1000);
        assert_eq!(legacy_md5_pod(123, 1), 0);
    }

    fn pow2(max_exp: u32) -> impl Strategy<Value = u32> {
        (0..=max_exp).prop_map(|e| 1u32 << e)
    }

    /// (S, P, M) valid: S ≤ P powers of two, 1 ≤ M ≤ S.
    fn topology() -> impl Strategy<Value = Topology> {
        (pow2(8), 0u32..=4)
            .prop_flat_map(|(s, extra)| (Just(s), Just(s << extra), 1..=s))
            .prop_map(|(s, p, m)| Topology::new(s, p, m).unwrap())
    }

    proptest! {
        #[test]
        fn guild_maps_consistently(t in topology(), id in any::<u64>()) {
            let p = t.partition_of_guild(id);
            prop_assert!(p.0 < t.partitions());
            let s = t.shard_of_guild(id);
            prop_assert!(s < t.shards());
            prop_assert_eq!(u64::from(s), (id >> 22) % u64::from(t.shards()));
            prop_assert_eq!(s, t.shard_of_partition(p));
            prop_assert!(t.partitions_of_shard(s).contains(&p));
            let pod = t.pod_of_guild(id);
            prop_assert!(pod < t.pods());
            prop_assert_eq!(pod, t.pod_of_shard(s));
            prop_assert!(t.shards_of_pod(pod).contains(&s));
        }

        #[test]
        fn shards_partition_the_partitions(t in topology()) {
            let mut seen = vec![0u32; t.partitions() as usize];
            for s in 0..t.shards() {
                let ps = t.partitions_of_shard(s);
                prop_assert_eq!(ps.len() as u32, t.partitions() / t.shards());
                prop_assert!(ps.windows(2).all(|w| w[0] < w[1]));
                prop_assert!(ps.contains(&t.home_partition(s)));
                for p in ps {
                    prop_assert_eq!(t.shard_of_partition(p), s);
                    seen[p.0 as usize] += 1;
                }
            }
            prop_assert!(seen.iter().all(|&n| n == 1));
            let mut all: Vec<u32> = (0..t.pods()).flat_map(|m| t.shards_of_pod(m)).collect();
            all.sort_unstable();
            prop_assert_eq!(all, (0..t.shards()).collect::<Vec<_>>());
        }

        #[test]
        fn assign_balanced_and_minimal((s, m) in pow2(12).prop_flat_map(|s| (Just(s), 1..=s))) {
            let a = assign(s, m);
            prop_assert_eq!(a.len(), s as usize);
            assert_balanced(&a, s, m);
            prop_assert_eq!(&a, &assign(s, m)); // deterministic
            let b = assign(s, m + 1);
            assert_balanced(&b, s, m + 1);
            for (shard, (&before, &after)) in a.iter().zip(&b).enumerate() {
                prop_assert!(before == after || after == m,
                    "shard {} moved {} → {} between old pods", shard, before, after);
            }
            prop_assert_eq!(b.iter().filter(|&&p| p == m).count(), (s / (m + 1)) as usize);
        }

        #[test]
        fn plan_lists_exactly_the_moved_shards(
            (s, p, m) in (pow2(10), 0u32..=3).prop_flat_map(|(s, e)| (Just(s), Just(s << e), 1..s.max(2)))
        ) {
            prop_assume!(m < s);
            let up = plan(s, p, m, m + 1).unwrap();
            let before = assign(s, m);
            let after = assign(s, m + 1);
            let moved: Vec<u32> = (0..s).filter(|&x| before[x as usize] != after[x as usize]).collect();
            prop_assert_eq!(up.moves.iter().map(|mv| mv.shard).collect::<Vec<_>>(), moved);
            let t = Topology::new(s, p, m).unwrap();
            for mv in &up.moves {
                prop_assert_eq!(mv.to_pod, m);
                prop_assert_eq!(mv.from_pod, before[mv.shard as usize]);
                prop_assert_eq!(&mv.partitions, &t.partitions_of_shard(mv.shard));
            }
            prop_assert_eq!(up.moved_partitions(), up.moves.len() * (p / s) as usize);

            let down = plan(s, p, m + 1, m).unwrap();
            prop_assert_eq!(down.moves.len(), up.moves.len());
            for (d, u) in down.moves.iter().zip(&up.moves) {
                prop_assert_eq!(d.shard, u.shard);
                prop_assert_eq!(d.from_pod, m); // only the removed pod's shards move
                prop_assert_eq!(d.to_pod, u.from_pod);
            }
        }
    }
}
