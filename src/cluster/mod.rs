//! One writer per partition across pods (DESIGN §7): partition leases kept as small objects
//! beside the replicas, taken and renewed with S3 conditional writes, and the start-time check
//! that the object store really enforces those conditions.
//!
//! | file | owns |
//! |---|---|
//! | [`keeper`] | the leases of one run: acquire a shard group's at a time, renew in the background, report each loss, release with positions |
//! | [`lease`] | the lease record, its object key, and acquire / renew / release with `If-None-Match` / `If-Match` |
//! | [`bucket`] | the S3 client built from `replication.*`, and the conditional-write capability check |
//! | [`local`] | local guards: an exclusive lock on `storage.data_dir`, the partition count recorded with the data |
//!
//! This module knows no actors: the node drives it (DESIGN §13).

pub mod bucket;
pub mod keeper;
pub mod lease;
pub mod local;

pub use bucket::{BucketError, connect, verify_conditional_writes};
pub use keeper::{Acquired, Acquirer, LeaseKeeper, LeaseWait, LeaseWaits, LostLease};
pub use lease::{
    Acquire, HeldLease, LeaseError, LeaseRecord, Leases, ReleasedPosition, holder_name,
};
pub use local::{DataDirLock, LocalError, check_topology};
