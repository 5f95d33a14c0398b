//! The guild API on gateway pods (DESIGN §8), under `/v1`, behind [`super::auth`]:
//!
//! | route | answers |
//! |---|---|
//! | `GET /v1/guilds/{guild_id}` | the cached guild, its channels and roles, member counts, `stale` / `unavailable` |
//! | `GET /v1/guilds/{guild_id}/members/{user_id}` | one cached member with its user |
//! | `GET /v1/guilds/{guild_id}/messages?channel_id&before&after&limit` | a page of messages, newest first (Discord's paging; `limit` 1..=100, default 50) |
//! | `GET /v1/guilds/{guild_id}/stats?from&to&group_by=day\|channel\|user` | messages posted per UTC day, channel or author; `from`/`to` are `YYYY-MM-DD`, inclusive |
//! | `GET /v1/ownership` | this pod's shards and partitions with their state, applied sequence, lag and lease epoch |
//!
//! Errors ([`ApiError`]): 400 naming the malformed parameter, 404 for a guild or member not
//! cached, 421 `not_owner` naming the owning pod for a guild this pod does not own (the router
//! sends each guild to its owner; a 421 means its config differs from this pod's), 503 with
//! `Retry-After` while the guild's partition is not open (starting, waiting for its lease,
//! restoring).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::PodStatus;
use super::error::ApiError;
use super::reader::Reader;
use crate::node::NodeStatus;
use crate::ownership::{PartitionId, Topology};
use crate::store::reads::{MessagePage, StatsGroup};

/// How old a node status may be before an API request asks the node again: API traffic costs
/// the actors at most one status round per second, however many requests arrive.
const SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(1);
/// Bound on gathering the node's status for the API.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// Messages per page when `limit` is not given (Discord's default).
const DEFAULT_LIMIT: u32 = 50;
/// Largest `limit` (Discord's).
const MAX_LIMIT: u32 = 100;

/// The last node status an API request fetched, and when.
type Snapshot = tokio::sync::Mutex<Option<(Instant, Arc<NodeStatus>)>>;

/// What the `/v1` handlers share.
#[derive(Clone)]
pub struct Api {
    status: PodStatus,
    reader: Reader,
    snapshot: Arc<Snapshot>,
}

impl Api {
    /// The API over `status`'s node, reading partition files with `reader`.
    pub fn new(status: PodStatus, reader: Reader) -> Self {
        Self {
            status,
            reader,
            snapshot: Arc::default(),
        }
    }

    /// The node's status, at most [`SNAPSHOT_MAX_AGE`] old; `None` while no node runs.
    async fn node_status(&self) -> Option<Arc<NodeStatus>> {
        let node = self.status.node.borrow().clone()?;
        let mut cached = self.snapshot.lock().await;
        if let Some((at, status)) = cached.as_ref()
            && at.elapsed() < SNAPSHOT_MAX_AGE
        {
            return Some(status.clone());
        }
        let status = Arc::new(node.status(STATUS_TIMEOUT).await.ok()?);
        *cached = Some((Instant::now(), status.clone()));
        Some(status)
    }

    /// The partition holding `guild_id` if this pod owns it and has it open.
    async fn open_partition(&self, guild_id: u64) -> Result<PartitionId, ApiError> {
        let Some(status) = self.node_status().await else {
            return Err(ApiError::unavailable(
                "starting",
                "this pod is starting (waiting for partition leases, restoring or opening)",
                5,
            ));
        };
        let topology = Topology::new(status.shard_total, status.partitions_total, status.pods)
            .map_err(|e| {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "starting", e.to_string())
            })?;
        let owner = topology.pod_of_guild(guild_id);
        if owner != status.ordinal {
            return Err(ApiError {
                owner: Some(owner),
                ..ApiError::new(
                    StatusCode::MISDIRECTED_REQUEST,
                    "not_owner",
                    format!(
                        "guild {guild_id} belongs to pod {owner}, not pod {} (DESIGN §2 ownership)",
                        status.ordinal
                    ),
                )
            });
        }
        let partition = topology.partition_of_guild(guild_id);
        let open = status
            .groups
            .iter()
            .any(|g| g.partitions.iter().any(|p| p.partition == partition));
        if !open {
            return Err(ApiError::unavailable(
                "partition_not_open",
                format!(
                    "partition {partition} is not open yet (its shard group is restarting or restoring)"
                ),
                2,
            ));
        }
        Ok(partition)
    }
}

/// A snowflake path or query parameter: decimal digits that fit in 64 bits.
fn parse_id(name: &str, value: &str) -> Result<u64, ApiError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::bad_request(
            "bad_id",
            format!("{name} = {value:?}: must be a snowflake (decimal digits)"),
        ));
    }
    value.parse().map_err(|_| {
        ApiError::bad_request(
            "bad_id",
            format!("{name} = {value:?}: does not fit in 64 bits"),
        )
    })
}

/// The query string as a map, refusing parameters not in `allowed` (a typo must not silently
/// mean "no filter").
fn query_params(
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    allowed: &[&str],
) -> Result<HashMap<String, String>, ApiError> {
    let Query(params) = query
        .map_err(|e| ApiError::bad_request("bad_query", format!("malformed query string: {e}")))?;
    if let Some(unknown) = params.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::bad_request(
            "bad_query",
            format!(
                "unknown query parameter {unknown:?}; this route takes {}",
                allowed.join(", ")
            ),
        ));
    }
    Ok(params)
}

fn optional_id(params: &HashMap<String, String>, name: &str) -> Result<Option<u64>, ApiError> {
    params.get(name).map(|v| parse_id(name, v)).transpose()
}

/// `YYYY-MM-DD` → days since 1970-01-01 (UTC).
fn parse_day(name: &str, value: &str) -> Result<i64, ApiError> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let date = time::Date::parse(value, format).map_err(|e| {
        ApiError::bad_request(
            "bad_date",
            format!("{name} = {value:?}: must be a date YYYY-MM-DD ({e})"),
        )
    })?;
    Ok((date - time::macros::date!(1970 - 01 - 01)).whole_days())
}

/// Days since 1970-01-01 → `YYYY-MM-DD`.
fn format_day(day: i64) -> String {
    let epoch = time::macros::date!(1970 - 01 - 01);
    i32::try_from(day)
        .ok()
        .and_then(|d| epoch.checked_add(time::Duration::days(i64::from(d))))
        .map_or_else(|| day.to_string(), |d| d.to_string())
}

/// `GET /v1/guilds/{guild_id}`.
pub async fn guild(
    State(api): State<Api>,
    Path(guild_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let guild_id = parse_id("guild_id", &guild_id)?;
    let partition = api.open_partition(guild_id).await?;
    let view = api
        .reader
        .read(partition, move |store| store.guild_view(guild_id))
        .await?
        .ok_or_else(|| unknown_guild(guild_id))?;
    Ok(Json(json!(view)))
}

fn unknown_guild(guild_id: u64) -> ApiError {
    ApiError::not_found(
        "unknown_guild",
        format!(
            "guild {guild_id} is not cached on its owner (the bot is not in it, or it was never received)"
        ),
    )
}

/// `GET /v1/guilds/{guild_id}/members/{user_id}`.
pub async fn member(
    State(api): State<Api>,
    Path((guild_id, user_id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let guild_id = parse_id("guild_id", &guild_id)?;
    let user_id = parse_id("user_id", &user_id)?;
    let partition = api.open_partition(guild_id).await?;
    let view = api
        .reader
        .read(partition, move |store| {
            Ok(match store.member_view(guild_id, user_id)? {
                Some(member) => Ok(member),
                None => Err(store.guild_view(guild_id)?.is_some()),
            })
        })
        .await?;
    match view {
        Ok(member) => Ok(Json(json!(member))),
        Err(true) => Err(ApiError::not_found(
            "unknown_member",
            format!("user {user_id} is not a cached member of guild {guild_id}"),
        )),
        Err(false) => Err(unknown_guild(guild_id)),
    }
}

/// `GET /v1/guilds/{guild_id}/messages`.
pub async fn messages(
    State(api): State<Api>,
    Path(guild_id): Path<String>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let guild_id = parse_id("guild_id", &guild_id)?;
    let params = query_params(query, &["channel_id", "before", "after", "limit"])?;
    let limit = match params.get("limit") {
        None => DEFAULT_LIMIT,
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=MAX_LIMIT).contains(l))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "bad_limit",
                    format!("limit = {v:?}: must be an integer from 1 to {MAX_LIMIT}"),
                )
            })?,
    };
    let page = MessagePage {
        channel_id: optional_id(&params, "channel_id")?,
        before: optional_id(&params, "before")?,
        after: optional_id(&params, "after")?,
        limit,
    };
    let partition = api.open_partition(guild_id).await?;
    let (known, messages) = api
        .reader
        .read(partition, move |store| {
            let known = store.guild_view(guild_id)?.is_some();
            Ok((known, store.messages_page(guild_id, page)?))
        })
        .await?;
    if !known && messages.is_empty() {
        return Err(unknown_guild(guild_id));
    }
    Ok(Json(
        json!({ "guild_id": guild_id.to_string(), "messages": messages }),
    ))
}

/// `GET /v1/guilds/{guild_id}/stats`.
pub async fn stats(
    State(api): State<Api>,
    Path(guild_id): Path<String>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let guild_id = parse_id("guild_id", &guild_id)?;
    let params = query_params(query, &["from", "to", "group_by"])?;
    let from = params
        .get("from")
        .map(|v| parse_day("from", v))
        .transpose()?;
    let to = params.get("to").map(|v| parse_day("to", v)).transpose()?;
    if let (Some(f), Some(t)) = (from, to)
        && f > t
    {
        return Err(ApiError::bad_request(
            "bad_date",
            "from is after to: the range is empty",
        ));
    }
    let (group, key) = match params.get("group_by").map(String::as_str) {
        None | Some("day") => (StatsGroup::Day, "day"),
        Some("channel") => (StatsGroup::Channel, "channel_id"),
        Some("user") => (StatsGroup::User, "user_id"),
        Some(other) => {
            return Err(ApiError::bad_request(
                "bad_group_by",
                format!("group_by = {other:?}: must be day, channel or user"),
            ));
        }
    };
    let partition = api.open_partition(guild_id).await?;
    let (known, rows) = api
        .reader
        .read(partition, move |store| {
            let known = store.guild_view(guild_id)?.is_some();
            Ok((known, store.guild_stats(guild_id, from, to, group)?))
        })
        .await?;
    if !known {
        return Err(unknown_guild(guild_id));
    }
    let total: u64 = rows.iter().map(|r| r.messages).sum();
    let groups: Vec<Value> = rows
        .iter()
        .map(|r| {
            let k = match group {
                StatsGroup::Day => Value::from(format_day(r.key)),
                // Ids as strings, like everywhere else.
                StatsGroup::Channel | StatsGroup::User => Value::from((r.key as u64).to_string()),
            };
            json!({ key: k, "messages": r.messages })
        })
        .collect();
    Ok(Json(json!({
        "guild_id": guild_id.to_string(),
        "group_by": key.trim_end_matches("_id"),
        "from": from.map(format_day),
        "to": to.map(format_day),
        "total": total,
        "groups": groups,
    })))
}

/// `GET /v1/ownership`: this pod's shards and partitions. Each shard: `state` (its
/// connection phase: `connecting`, `resuming`, `active`, `disconnected`, `fatally_closed`, or
/// `restarting` while its group restarts), `last_seq`, `identifies`, `resumes`, `restarts`.
/// Each partition: `state` (`open`, `busy` — a commit is taking long — or `restoring` while its
/// group restarts), `applied_seq`, `lag` (the shard's last sequence minus it) and the lease
/// `epoch` it writes under. `pending_shards`: owned shards whose group has not started yet, and
/// `partitions_waiting`: the leases awaited (`holder`, `epoch`, `live`).
pub async fn ownership(State(api): State<Api>) -> Json<Value> {
    let epochs = api.status.epochs.borrow().clone();
    let waits = api.status.waits.borrow().clone();
    let Some(status) = api.node_status().await else {
        let phase = if waits.is_empty() {
            "starting"
        } else {
            "waiting_for_leases"
        };
        return Json(json!({
            "phase": phase,
            "ready": false,
            "partitions_waiting": waits
                .iter()
                .map(|(p, w)| (p.to_string(), json!({ "state": "waiting", "holder": w.holder, "epoch": w.epoch, "live": w.live })))
                .collect::<BTreeMap<_, _>>(),
        }));
    };
    let shards: Vec<Value> = status
        .groups
        .iter()
        .map(|g| {
            let shard = g.shard_status.as_ref();
            let last_seq = shard.map_or(0, |s| s.last_seq);
            let state = shard.map_or(Value::from("restarting"), |s| json!(s.phase));
            let partitions: Vec<Value> = if g.partitions.is_empty() {
                Topology::new(status.shard_total, status.partitions_total, status.pods)
                    .map(|t| t.partitions_of_shard(g.shard))
                    .unwrap_or_default()
                    .into_iter()
                    .map(|p| json!({ "partition": p.to_string(), "state": "restoring", "epoch": epochs.get(&p) }))
                    .collect()
            } else {
                g.partitions
                    .iter()
                    .map(|p| {
                        let applied = p.session.as_ref().map(|s| s.applied_seq);
                        json!({
                            "partition": p.partition.to_string(),
                            "state": if p.busy { "busy" } else { "open" },
                            "applied_seq": applied,
                            "lag": applied.map(|a| last_seq.saturating_sub(a)),
                            "epoch": epochs.get(&p.partition),
                        })
                    })
                    .collect()
            };
            json!({
                "shard": g.shard,
                "state": state,
                "last_seq": last_seq,
                "identifies": shard.map_or(0, |s| s.identifies),
                "resumes": shard.map_or(0, |s| s.resumes),
                "restarts": g.restarts,
                "fatal_close_code": g.fatal_close_code,
                "partitions": partitions,
            })
        })
        .collect();
    Json(json!({
        "phase": "running",
        "ready": status.ready,
        "pending_shards": status.pending_shards,
        "partitions_waiting": waits
            .iter()
            .map(|(p, w)| (p.to_string(), json!({ "state": "waiting", "holder": w.holder, "epoch": w.epoch, "live": w.live })))
            .collect::<BTreeMap<_, _>>(),
        "ordinal": status.ordinal,
        "pods": status.pods,
        "shard_total": status.shard_total,
        "partitions_total": status.partitions_total,
        "shards": shards,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_decimal_snowflakes_that_fit_in_64_bits() {
        assert_eq!(
            parse_id("guild_id", "175928847299117063").unwrap(),
            175928847299117063
        );
        assert_eq!(parse_id("g", "18446744073709551615").unwrap(), u64::MAX);
        for bad in [
            "",
            "abc",
            "-1",
            "+1",
            "1.0",
            " 1",
            "18446744073709551616",
            "0x10",
        ] {
            let e = parse_id("guild_id", bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad:?}");
            assert!(e.message.starts_with("guild_id = "), "{}", e.message);
        }
    }

    #[test]
    fn days_parse_and_format_as_utc_dates() {
        assert_eq!(parse_day("from", "1970-01-01").unwrap(), 0);
        assert_eq!(parse_day("from", "2026-12-03").unwrap(), 20_790);
        assert_eq!(format_day(20_790), "2026-12-03");
        for bad in ["2026-13-01", "yesterday", "2026-12-3", ""] {
            assert_eq!(
                parse_day("to", bad).unwrap_err().code,
                "bad_date",
                "{bad:?}"
            );
        }
    }
}
