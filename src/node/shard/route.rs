//! Where a shard's pump sends what it reads (DESIGN §2): which of the shard's partitions gets a
//! dispatch or a dead letter. Pure functions of the topology, no I/O.

use twilight_model::gateway::event::{DispatchEvent, Event};

use crate::ownership::{PartitionId, Topology};

/// The routing table of one shard: its partitions are `p ≡ shard_id (mod S)`, held at index
/// `p / S` of the pump's partition list.
#[derive(Clone, Copy, Debug)]
pub(super) struct Routes {
    shard_id: u32,
    topology: Topology,
}

impl Routes {
    /// The routes of shard `shard_id` in `topology`.
    pub(super) fn new(shard_id: u32, topology: Topology) -> Self {
        Self { shard_id, topology }
    }

    /// Finds the partition of a dispatch: its guild's (DESIGN §2), or the shard's home partition
    /// for events without a guild. A guild that is not ours (Discord's formula says another shard)
    /// is dropped with a warning rather than written into the wrong file.
    pub(super) fn dispatch(&self, event: DispatchEvent) -> Option<(usize, DispatchEvent)> {
        let event = Event::from(event);
        let guild = event.guild_id().map(|g| g.get());
        let Ok(index) = self.partition_index(guild) else {
            tracing::warn!(shard = self.shard_id, guild, kind = ?event.kind(),
                "dispatch for a guild of another shard dropped");
            return None;
        };
        let event = DispatchEvent::try_from(event).ok()?;
        Some((index, event))
    }

    /// Where a dead letter goes: to its guild's partition, or the shard's home partition when it
    /// names no guild (or one of another shard, which a partition of ours must not hold — its
    /// sequence still has to advance here).
    pub(super) fn dead_letter(&self, guild: Option<u64>) -> Option<usize> {
        self.partition_index(guild)
            .or_else(|_| self.partition_index(None))
            .ok()
    }

    /// Index into `partitions` of where a dispatch of `guild` goes (DESIGN §2): the guild's
    /// partition, or the shard's home partition for a dispatch without a guild. `Err` names the
    /// partition when Discord's formula puts the guild on another shard: no file of ours may hold
    /// it.
    fn partition_index(&self, guild: Option<u64>) -> Result<usize, PartitionId> {
        let partition = guild.map_or_else(
            || self.topology.home_partition(self.shard_id),
            |g| self.topology.partition_of_guild(g),
        );
        if self.topology.shard_of_partition(partition) != self.shard_id {
            return Err(partition);
        }
        usize::try_from(partition.0 / self.topology.shards()).map_err(|_| partition)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guild id whose partition is `p` in `topology`.
    fn guild_in(topology: Topology, p: u32) -> u64 {
        (0..u64::from(topology.partitions()) * 4)
            .map(|k| k << 22)
            .find(|&g| topology.partition_of_guild(g).0 == p)
            .unwrap()
    }

    #[test]
    fn guilds_go_to_their_partition_and_others_to_the_home_partition() {
        let topology = Topology::new(4, 16, 1).unwrap();
        let routes = Routes::new(1, topology);
        // Shard 1 holds partitions 1, 5, 9, 13 at indexes 0..4.
        for (index, p) in [1, 5, 9, 13].into_iter().enumerate() {
            assert_eq!(
                routes.partition_index(Some(guild_in(topology, p))),
                Ok(index)
            );
            assert_eq!(routes.dead_letter(Some(guild_in(topology, p))), Some(index));
        }
        assert_eq!(routes.partition_index(None), Ok(0));
        assert_eq!(routes.dead_letter(None), Some(0));
    }

    #[test]
    fn a_guild_of_another_shard_is_refused_but_its_dead_letter_goes_home() {
        let topology = Topology::new(4, 16, 1).unwrap();
        let routes = Routes::new(1, topology);
        let foreign = guild_in(topology, 6);
        assert_eq!(routes.partition_index(Some(foreign)), Err(PartitionId(6)));
        assert_eq!(routes.dead_letter(Some(foreign)), Some(0));
    }
}
