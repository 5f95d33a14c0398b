//! Integration tests: the real binary against the in-process simulator, one test binary.

mod api;
mod bad_input;
mod cluster;
mod exactly_once;
mod harness;
mod ingest;
mod replication;
mod router;
mod s3;
mod supervision;
