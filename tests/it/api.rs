//! The guild API on a gateway pod (DESIGN §8): every guild the pod owns answers with what the
//! simulator sent, a guild of another pod gets 421 naming its owner, bad input gets 400 naming
//! the parameter, `/v1` needs the token, unauthenticated `/readyz` shows no sessions — and API
//! load during ingest leaves every message stored exactly once.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;
use shardlite::ownership::{PartitionId, Topology};
use shardlite::simulator::{SimConfig, Simulator};
use shardlite::store::PartitionStore;

use crate::harness::{API_TOKEN, NodeProcess, NodeSpec, get_authorized, wait_for};
use crate::s3;

/// GET with the token; the status and the JSON body.
async fn api(http: &str, path: &str) -> (u16, Value) {
    let resp = get_authorized(http, path).await.unwrap();
    let code = resp.status().as_u16();
    (code, resp.json().await.unwrap_or(Value::Null))
}

/// Every message of `guild`, paged newest first 100 at a time with `before`, as a client pages
/// Discord's own history.
async fn all_messages(http: &str, guild: u64) -> Vec<u64> {
    let mut ids = Vec::new();
    let mut before = String::new();
    loop {
        let (code, body) = api(
            http,
            &format!("/v1/guilds/{guild}/messages?limit=100{before}"),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        let page: Vec<u64> = body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().parse().unwrap())
            .collect();
        assert!(
            page.windows(2).all(|w| w[0] > w[1]),
            "newest first: {page:?}"
        );
        let Some(&last) = page.last() else {
            return ids;
        };
        ids.extend(&page);
        before = format!("&before={last}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_owned_guilds_refuses_bad_input_and_never_slows_ingest_into_loss() {
    const MESSAGES: u64 = 6_000;
    let bucket = s3::bucket("api").await;
    let sim = Simulator::start(SimConfig {
        guilds: 60,
        shards: 2,
        messages: MESSAGES,
        rate: Some(3_000),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    // Pod 0 of 2: it owns shard 0's guilds; shard 1's belong to pod 1, which is not started.
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(
        dir.path(),
        &sim,
        &NodeSpec {
            shards: 2,
            partitions: 4,
            cluster_toml: "pods = 2\nordinal = 0\n".into(),
            extra_toml: s3::replication_toml(&bucket, s3::endpoint(), 60),
            ..NodeSpec::default()
        },
    )
    .await;
    let topology = Topology::new(2, 4, 2).unwrap();
    let expected = sim.expected();
    let (ours, theirs): (Vec<u64>, Vec<u64>) = expected
        .guilds
        .keys()
        .partition(|&&g| topology.pod_of_guild(g) == 0);
    assert!(!ours.is_empty() && !theirs.is_empty());

    // API load while the stream flows: readers on every owned guild, as fast as they answer.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (http, ours, stop) = (node.http.clone(), ours.clone(), stop.clone());
        tokio::spawn(async move {
            let mut answered = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for g in &ours {
                    for path in [
                        format!("/v1/guilds/{g}"),
                        format!("/v1/guilds/{g}/messages?limit=100"),
                        format!("/v1/guilds/{g}/stats?group_by=user"),
                    ] {
                        let (code, body) = api(&http, &path).await;
                        // 503 while a partition is not open is allowed; nothing else.
                        assert!(
                            code == 200 || code == 404 || code == 503,
                            "{path}: {code} {body}"
                        );
                        answered += u64::from(code == 200);
                    }
                }
            }
            answered
        })
    };
    // Shard 1 has no pod here: only shard 0's script is sent.
    wait_for(
        "shard 0's whole script sent",
        Duration::from_secs(120),
        async || {
            let s = &sim.status().shards[0];
            (s.script_sent >= s.script_total).then_some(())
        },
    )
    .await;
    node.wait_caught_up_on(&sim, &[0], Duration::from_secs(60))
        .await;
    stop.store(true, Ordering::Relaxed);
    let answered = load.await.unwrap();
    assert!(answered > 0, "the load got answers");

    // Every owned guild: its cached entities and every message, paged.
    let mut paged = BTreeSet::new();
    for &g in &ours {
        let want = &expected.guilds[&g];
        let (code, body) = api(&node.http, &format!("/v1/guilds/{g}")).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["id"], g.to_string());
        assert_eq!(
            body["channels"].as_array().unwrap().len() as u32,
            want.channels,
            "{body}"
        );
        assert_eq!(
            body["roles"].as_array().unwrap().len() as u32,
            want.roles,
            "{body}"
        );
        let ids = all_messages(&node.http, g).await;
        assert_eq!(ids.len() as u32, want.messages_created, "guild {g}");
        paged.extend(ids);
        let (code, stats) = api(
            &node.http,
            &format!("/v1/guilds/{g}/stats?group_by=channel"),
        )
        .await;
        assert_eq!(code, 200, "{stats}");
        assert_eq!(
            stats["total"].as_u64().unwrap() as u32,
            want.messages_created,
            "{stats}"
        );
        let (_, by_day) = api(&node.http, &format!("/v1/guilds/{g}/stats")).await;
        assert_eq!(by_day["total"], stats["total"]);
        let (code, _) = api(&node.http, &format!("/v1/guilds/{g}/members/1")).await;
        assert_eq!(code, 404);
    }
    let owned_ids: BTreeSet<u64> = expected
        .message_ids
        .iter()
        .copied()
        .filter(|&id| paged.contains(&id))
        .collect();
    assert_eq!(
        paged, owned_ids,
        "paging returned only real messages, each once"
    );

    // Another pod's guild: 421 naming the owner.
    let (code, body) = api(&node.http, &format!("/v1/guilds/{}", theirs[0])).await;
    assert_eq!(code, 421, "{body}");
    assert_eq!(body["error"]["code"], "not_owner");
    assert_eq!(body["error"]["owner_pod"], 1);

    // Bad input: 400 naming the parameter, never 500.
    let g = ours[0];
    for (path, code, names) in [
        ("/v1/guilds/abc".to_owned(), 400, "guild_id"),
        ("/v1/guilds/-1".to_owned(), 400, "guild_id"),
        (
            "/v1/guilds/18446744073709551616".to_owned(),
            400,
            "guild_id",
        ),
        ("/v1/guilds/".to_owned(), 404, ""),
        (format!("/v1/guilds/{g}/members/x"), 400, "user_id"),
        (format!("/v1/guilds/{g}/messages?limit=0"), 400, "limit"),
        (format!("/v1/guilds/{g}/messages?limit=101"), 400, "limit"),
        (format!("/v1/guilds/{g}/messages?before=abc"), 400, "before"),
        (
            format!("/v1/guilds/{g}/messages?chanel_id=1"),
            400,
            "chanel_id",
        ),
        (format!("/v1/guilds/{g}/messages?%zz"), 400, ""),
        (
            format!("/v1/guilds/{g}/stats?group_by=week"),
            400,
            "group_by",
        ),
        (format!("/v1/guilds/{g}/stats?from=2026-13-01"), 400, "from"),
        (
            format!("/v1/guilds/{g}/stats?from=2026-12-03&to=2026-12-01"),
            400,
            "from",
        ),
        ("/v1/nothing".to_owned(), 404, ""),
    ] {
        let (got, body) = api(&node.http, &path).await;
        assert_eq!(got, code, "{path}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(names), "{path}: {body}");
    }
    // A guild this pod would own but has never seen.
    let unknown = (0..)
        .map(|k: u64| k << 22)
        .find(|&g| topology.pod_of_guild(g) == 0 && !expected.guilds.contains_key(&g))
        .unwrap();
    let (code, body) = api(&node.http, &format!("/v1/guilds/{unknown}")).await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (404, Some("unknown_guild")),
        "{body}"
    );

    // The token: required for /v1, compared exactly; health and metrics stay open.
    let client = reqwest::Client::new();
    let url = |path: &str| format!("http://{}{path}", node.http);
    for auth in [
        None,
        Some("Bearer wrong"),
        Some(&*format!("Bearer {API_TOKEN}x")),
    ] {
        let mut req = client.get(url(&format!("/v1/guilds/{g}")));
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        assert_eq!(req.send().await.unwrap().status().as_u16(), 401, "{auth:?}");
    }
    for open in ["/healthz", "/metrics", "/readyz"] {
        assert_eq!(
            client
                .get(url(open))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
            200,
            "{open}"
        );
    }
    // Unauthenticated readiness shows states only; with the token, the sessions too.
    let anonymous = client
        .get(url("/readyz"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !anonymous.contains("session_id") && !anonymous.contains("resume_url"),
        "{anonymous}"
    );
    let (_, full) = api(&node.http, "/readyz").await;
    assert!(full.to_string().contains("session_id"), "{full}");

    // Ownership: shard 0 with its two partitions, open, caught up, under a lease epoch.
    let (code, own) = api(&node.http, "/v1/ownership").await;
    assert_eq!(code, 200, "{own}");
    let shards = own["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 1, "{own}");
    assert_eq!(shards[0]["state"], "active");
    for p in shards[0]["partitions"].as_array().unwrap() {
        assert_eq!(p["state"], "open", "{own}");
        assert_eq!(p["lag"], 0, "{own}");
        assert!(p["epoch"].as_u64().unwrap() >= 1, "{own}");
    }

    let data_dir = node.data_dir.clone();
    assert!(node.stop().await.success());
    // Exactly once over pod 0's partitions (p0000, p0002): the API load lost and doubled nothing.
    let mut stored = Vec::new();
    for p in [0, 2] {
        let path = PartitionStore::path_in(&data_dir, PartitionId(p));
        stored.extend(
            PartitionStore::open_read_only(&path, PartitionId(p))
                .unwrap()
                .message_ids()
                .unwrap(),
        );
    }
    let unique: BTreeSet<u64> = stored.iter().copied().collect();
    assert_eq!(unique.len(), stored.len(), "no message stored twice");
    assert_eq!(unique, paged, "the files hold exactly what the API paged");
    let owned_created: u32 = ours
        .iter()
        .map(|g| expected.guilds[g].messages_created)
        .sum();
    assert_eq!(stored.len() as u64, u64::from(owned_created));
}
