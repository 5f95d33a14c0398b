//! Metric names and the gauges derived from the node's status (Prometheus, via the `metrics`
//! facade; the recorder is installed by `run` and rendered on `GET /metrics`).
//!
//! Labels are shard and partition numbers only — bounded by the config, never a guild id.
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `shardlite_identifies_total` | counter | shard | sessions started (READY) |
//! | `shardlite_resumes_total` | counter | shard | sessions resumed (RESUMED) |
//! | `shardlite_reconnects_total` | counter | shard | gateway connections closed under the shard (it reconnects) |
//! | `shardlite_malformed_frames_total` | counter | shard | frames or dispatches that could not be decoded |
//! | `shardlite_dead_letters_total` | counter | shard | dispatches kept as received in `dead_letters` (unknown event type or undecodable payload) |
//! | `shardlite_dispatches_applied_total` | counter | partition | dispatches committed (stored or ignored by kind) |
//! | `shardlite_group_restarts_total` | counter | shard | shard group restarts after a failure |
//! | `shardlite_shard_last_seq` | gauge | shard | highest sequence routed |
//! | `shardlite_shard_up` | gauge | shard | 1 while the shard is receiving dispatches |
//! | `shardlite_shard_fatal_close_code` | gauge | shard | the fatal close code that stopped the shard, 0 if none |
//! | `shardlite_partition_applied_seq` | gauge | partition | committed applied sequence |
//! | `shardlite_partition_applied_seq_lag` | gauge | partition | shard's last sequence − partition's applied sequence |

use super::NodeStatus;
use super::shard::ShardPhase;

/// Counter: sessions started.
pub const IDENTIFIES: &str = "shardlite_identifies_total";
/// Counter: sessions resumed.
pub const RESUMES: &str = "shardlite_resumes_total";
/// Counter: gateway connections closed under a shard.
pub const RECONNECTS: &str = "shardlite_reconnects_total";
/// Counter: undecodable frames or dispatches.
pub const MALFORMED: &str = "shardlite_malformed_frames_total";
/// Counter: dispatches routed to a partition as dead letters.
pub const DEAD_LETTERS: &str = "shardlite_dead_letters_total";
/// Counter: dispatches committed by a partition.
pub const DISPATCHES_APPLIED: &str = "shardlite_dispatches_applied_total";
/// Counter: shard group restarts.
pub const GROUP_RESTARTS: &str = "shardlite_group_restarts_total";

/// Marks `shards` as no longer receiving (`shardlite_shard_up` 0) once the node that ran them
/// stopped: after a reload moves a shard to another pod, this pod's series must not go on
/// saying it is up.
pub fn record_stopped(shards: &[u32]) {
    for shard in shards {
        metrics::gauge!("shardlite_shard_up", "shard" => shard.to_string()).set(0.0);
    }
}

/// Sets the sequence and liveness gauges from a status snapshot.
pub fn record_status(status: &NodeStatus) {
    for g in &status.groups {
        let shard = g.shard.to_string();
        let last_seq = g.shard_status.as_ref().map_or(0, |s| s.last_seq);
        let up = g
            .shard_status
            .as_ref()
            .is_some_and(|s| s.phase == ShardPhase::Active);
        metrics::gauge!("shardlite_shard_last_seq", "shard" => shard.clone()).set(last_seq as f64);
        metrics::gauge!("shardlite_shard_up", "shard" => shard.clone())
            .set(f64::from(u8::from(up)));
        metrics::gauge!("shardlite_shard_fatal_close_code", "shard" => shard)
            .set(f64::from(g.fatal_close_code.unwrap_or(0)));
        for p in g.partitions.iter().filter(|p| !p.busy) {
            let applied = p.session.as_ref().map_or(0, |s| s.applied_seq);
            let partition = p.partition.to_string();
            metrics::gauge!("shardlite_partition_applied_seq", "partition" => partition.clone())
                .set(applied as f64);
            metrics::gauge!("shardlite_partition_applied_seq_lag", "partition" => partition)
                .set(last_seq.saturating_sub(applied) as f64);
        }
    }
}
