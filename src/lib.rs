//! shardlite: a Discord bot's gateway at scale, without a central database.
//!
//! (Layout and glossary are completed once the modules land.)

pub mod cli;
pub mod config;
pub mod ownership;
pub mod simulator;
pub mod store;
