//! A new gateway session's start, made durable before any of its dispatches is applied (DESIGN §5):
//! every partition of the shard commits the [`SessionStart`], then, with [`SessionSync`], the
//! replica confirms it. The pump calls this when twilight's session id changes.

use std::path::PathBuf;
use std::time::Duration;

use ractor::ActorRef;
use twilight_model::gateway::payload::incoming::Ready;

use crate::node::partition::PartitionMsg;
use crate::ownership::Topology;
use crate::replication::process::ReplicaSync;
use crate::store::{Op, SessionStart};

/// Bound on the partitions committing a session start.
const SESSION_COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound on the session-start sync: past it the shard goes on (the data is committed locally) and
/// logs that the session is not yet on the replica.
const SESSION_SYNC_TIMEOUT: Duration = Duration::from_secs(10);

/// How a shard makes a new gateway session durable on the replica (DESIGN §5).
///
/// A new session's dispatches can be recovered after a lost disk only by resuming that session,
/// and a resume needs the session id: so the replica must hold the session start before anything
/// of the session is applied. Without this a disk lost within about a second of a new session
/// (Litestream's first upload comes about 1 s after it starts) restored files that predated the
/// session, the shard identified again, and what the old session had delivered was lost (11–22k
/// of 60k messages in `exactly_once::kill9_with_lost_data_dir_restores_from_the_replica`).
/// Later dispatches need no sync: the replica's applied sequence trails by the replication lag,
/// and a resume from there replays the rest within Discord's resume window.
#[derive(Clone, Debug)]
pub struct SessionSync {
    /// The Litestream child's control socket.
    pub sync: ReplicaSync,
    /// The shard's partition files, absolute, as in the rendered `litestream.yml`.
    pub files: Vec<PathBuf>,
}

/// The [`SessionStart`] of each of shard `shard_id`'s `partitions` partitions (in partition
/// order). `ready` carries the guild list when READY decoded: each partition then gets its own
/// guilds; without it every list is `None` and guilds only become stale.
pub(super) fn starts(
    shard_id: u32,
    topology: Topology,
    partitions: usize,
    session_id: &str,
    resume_url: &str,
    ready: Option<&Ready>,
) -> Vec<SessionStart> {
    let shards = topology.shards();
    let mut per_partition: Vec<Option<Vec<u64>>> = vec![ready.map(|_| Vec::new()); partitions];
    for g in ready.iter().flat_map(|r| &r.guilds) {
        let p = topology.partition_of_guild(g.id.get());
        if let Some(Some(list)) = per_partition.get_mut((p.0 / shards) as usize) {
            list.push(g.id.get());
        }
    }
    per_partition
        .into_iter()
        .map(|guilds| SessionStart {
            shard_id,
            shard_total: shards,
            session_id: session_id.to_owned(),
            resume_url: resume_url.to_owned(),
            guilds,
        })
        .collect()
}

/// Sends each partition its start (`starts` in the order of `partitions`), waits until every
/// partition has committed it, then (with `session_sync`) until the replica holds it. Failures
/// are logged, not returned: a partition that cannot commit fails its group anyway, and a replica
/// that does not confirm in time only leaves the session less durable for a while.
pub(super) async fn commit(
    shard_id: u32,
    partitions: &[ActorRef<PartitionMsg>],
    starts: Vec<SessionStart>,
    session_sync: Option<&SessionSync>,
) {
    for (partition, start) in partitions.iter().zip(starts) {
        super::deliver::send(shard_id, partition, Op::Session(start));
    }
    let drained = futures_util::future::join_all(
        partitions
            .iter()
            .map(|p| crate::node::call(p, PartitionMsg::Drain, SESSION_COMMIT_TIMEOUT)),
    )
    .await;
    if let Some(Err(e)) = drained.into_iter().find(Result::is_err) {
        // The partition is failing; its group restarts everyone, which is the right outcome.
        tracing::warn!(shard = shard_id, error = %e, "session start not committed everywhere");
        return;
    }
    if let Some(s) = session_sync
        && let Err(e) = s
            .sync
            .sync_wait(s.files.clone(), SESSION_SYNC_TIMEOUT, "at session start")
            .await
    {
        tracing::warn!(shard = shard_id, error = %e,
            "new session not confirmed on the replica: a disk lost now would cost an identify");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_ready_every_partition_starts_with_no_guild_list() {
        let topology = Topology::new(4, 16, 1).unwrap();
        let starts = starts(1, topology, 4, "s", "ws://r", None);
        assert_eq!(starts.len(), 4);
        assert!(starts.iter().all(|s| s.guilds.is_none()
            && s.shard_id == 1
            && s.shard_total == 4
            && s.session_id == "s"
            && s.resume_url == "ws://r"));
    }
}
