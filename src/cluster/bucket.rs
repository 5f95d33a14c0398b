//! The object-store client of the lease room, and the check that the store enforces the
//! conditional writes leases rely on (DESIGN §7).
//!
//! Leases are plain objects written with S3 conditional writes: `If-None-Match: *` creates one
//! only if it does not exist, `If-Match: <etag>` replaces it only if nobody replaced it since.
//! A store that accepts such a write without checking the condition would let two pods hold one
//! lease, so with `cluster.pods > 1` shardlite checks the store at start and refuses to run on
//! one that ignores either condition. Public reports disagree on whether DigitalOcean Spaces
//! enforces `If-Match` (one says only unquoted ETags work, another that it is ignored in some
//! regions): this check is how an operator finds out. ETags are always sent unquoted.
//!
//! moto (the local S3 server of the tests) enforces both conditions one request at a time but
//! not atomically under concurrent requests: tests against it prove the protocol, not the
//! store's atomicity.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{
    ClientOptions, ObjectStore, PutMode, PutOptions, PutPayload, PutResult, RetryConfig,
    UpdateVersion,
};

use crate::config::Config;

/// Bound on one object-store request, retries included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of building the client and of the capability check.
#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    /// `replication.endpoint` or `replication.bucket` is unset.
    #[error("leases need replication.endpoint and replication.bucket")]
    NotConfigured,
    /// Neither `AWS_…` nor `LITESTREAM_…` holds the S3 key pair.
    #[error(
        "{var} is not set: leases sign their requests with the key pair Litestream uses \
         (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or LITESTREAM_ACCESS_KEY_ID / \
         LITESTREAM_SECRET_ACCESS_KEY)"
    )]
    MissingCredentials {
        /// The variable looked for first.
        var: &'static str,
    },
    /// The S3 client could not be built from the config.
    #[error("cannot build the S3 client for {endpoint}")]
    Client {
        /// `replication.endpoint`.
        endpoint: String,
        /// The underlying error.
        #[source]
        source: object_store::Error,
    },
    /// The store accepted a write its precondition should have refused, or refused one it
    /// should have accepted.
    #[error(
        "object store {endpoint} does not enforce {header}: {what}; two pods could hold one \
         lease, so shardlite refuses to run with cluster.pods > 1 on it"
    )]
    Unenforced {
        /// `replication.endpoint`.
        endpoint: String,
        /// The precondition header (`If-None-Match: *` or `If-Match`).
        header: &'static str,
        /// What the store did.
        what: &'static str,
    },
    /// A request failed (unreachable store, bad credentials, missing bucket).
    #[error("object store {endpoint}: {step} failed")]
    Request {
        /// `replication.endpoint`.
        endpoint: String,
        /// Which request.
        step: &'static str,
        /// The underlying error.
        #[source]
        source: object_store::Error,
    },
    /// A request did not finish within [`REQUEST_TIMEOUT`].
    #[error("object store {endpoint}: {step} took longer than {REQUEST_TIMEOUT:?}")]
    Timeout {
        /// `replication.endpoint`.
        endpoint: String,
        /// Which request.
        step: &'static str,
    },
}

impl BucketError {
    /// True for what the operator must fix in the deployment — a store that ignores a
    /// precondition, missing credentials or endpoint — rather than a passing failure (exit
    /// code 2 rather than 1).
    #[must_use]
    pub fn is_deployment_error(&self) -> bool {
        matches!(
            self,
            BucketError::Unenforced { .. }
                | BucketError::MissingCredentials { .. }
                | BucketError::NotConfigured
        )
    }
}

/// An S3 client for `replication.endpoint` / `replication.bucket`, signing with the key pair
/// Litestream uses (`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, else `LITESTREAM_…`, the same
/// precedence as Litestream's). Credentials must be present: without them the S3 client would
/// ask the cloud's instance-metadata service, which shardlite never contacts.
///
/// Requests time out after 5 s (2 s to connect) and are retried at most twice, within
/// [`REQUEST_TIMEOUT`]: a lease holder must learn quickly that it cannot renew.
///
/// # Errors
/// [`BucketError::NotConfigured`], [`BucketError::MissingCredentials`], [`BucketError::Client`].
pub fn connect(config: &Config) -> Result<Arc<dyn ObjectStore>, BucketError> {
    let r = &config.replication;
    let (Some(endpoint), Some(bucket)) = (&r.endpoint, &r.bucket) else {
        return Err(BucketError::NotConfigured);
    };
    let key_id = credential("AWS_ACCESS_KEY_ID", "LITESTREAM_ACCESS_KEY_ID")?;
    let secret = credential("AWS_SECRET_ACCESS_KEY", "LITESTREAM_SECRET_ACCESS_KEY")?;
    let options = ClientOptions::new()
        .with_timeout(Duration::from_secs(5))
        .with_connect_timeout(Duration::from_secs(2))
        .with_allow_http(endpoint.starts_with("http://"));
    let retry = RetryConfig {
        max_retries: 2,
        retry_timeout: REQUEST_TIMEOUT,
        ..RetryConfig::default()
    };
    let store = AmazonS3Builder::new()
        .with_endpoint(endpoint)
        .with_bucket_name(bucket)
        .with_region(&r.region)
        .with_virtual_hosted_style_request(!r.path_style)
        .with_access_key_id(key_id)
        .with_secret_access_key(secret)
        .with_client_options(options)
        .with_retry(retry)
        .build()
        .map_err(|source| BucketError::Client {
            endpoint: endpoint.clone(),
            source,
        })?;
    Ok(Arc::new(store))
}

fn credential(primary: &'static str, fallback: &'static str) -> Result<String, BucketError> {
    [primary, fallback]
        .into_iter()
        .find_map(|var| std::env::var(var).ok().filter(|v| !v.is_empty()))
        .ok_or(BucketError::MissingCredentials { var: primary })
}

/// An ETag as the `If-Match` header must carry it: without quotes (DigitalOcean Spaces rejects
/// quoted ones; S3 and moto accept both) and without a weak marker.
#[must_use]
pub fn unquoted(etag: &str) -> String {
    etag.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_owned()
}

/// Checks that `store` enforces `If-None-Match: *` and `If-Match` on writes, with four requests
/// on a scratch object under `{prefix}/leases/` (deleted afterwards): a create, a second create
/// (must be refused), an update with the current ETag (must succeed) and one with the stale
/// ETag (must be refused). `endpoint` names the store in errors.
///
/// # Errors
/// [`BucketError::Unenforced`] naming the ignored header; [`BucketError::Request`] or
/// [`BucketError::Timeout`] when a request fails for another reason.
pub async fn verify_conditional_writes(
    store: &dyn ObjectStore,
    prefix: &str,
    endpoint: &str,
) -> Result<(), BucketError> {
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let key = ObjectPath::from(format!(
        "{prefix}/leases/capability-check-{}-{nonce}",
        std::process::id()
    ));
    let put = async |step: &'static str, mode: PutMode, body: &'static str| {
        let opts = PutOptions {
            mode,
            ..PutOptions::default()
        };
        match tokio::time::timeout(
            REQUEST_TIMEOUT,
            store.put_opts(&key, PutPayload::from_static(body.as_bytes()), opts),
        )
        .await
        {
            Ok(result) => Ok(result),
            Err(_) => Err(BucketError::Timeout {
                endpoint: endpoint.to_owned(),
                step,
            }),
        }
    };
    let request_error = |step: &'static str, source: object_store::Error| BucketError::Request {
        endpoint: endpoint.to_owned(),
        step,
        source,
    };
    let unenforced = |header: &'static str, what: &'static str| BucketError::Unenforced {
        endpoint: endpoint.to_owned(),
        header,
        what,
    };
    let etag = |r: &PutResult| {
        r.e_tag
            .as_deref()
            .map(unquoted)
            .ok_or_else(|| unenforced("If-Match", "a write returned no ETag"))
    };

    let step = "create the check object (If-None-Match: *)";
    let first = put(step, PutMode::Create, "1")
        .await?
        .map_err(|e| request_error(step, e))?;
    let first_etag = etag(&first)?;
    let result = async {
        let step = "create it again (If-None-Match: *)";
        match put(step, PutMode::Create, "2").await? {
            Err(object_store::Error::AlreadyExists { .. }) => {}
            Ok(_) => {
                return Err(unenforced(
                    "If-None-Match: *",
                    "a second create of the same key succeeded",
                ));
            }
            Err(e) => return Err(request_error(step, e)),
        }
        let step = "update it with the current ETag (If-Match)";
        let current = UpdateVersion {
            e_tag: Some(first_etag.clone()),
            version: None,
        };
        match put(step, PutMode::Update(current), "3").await? {
            Ok(second) => {
                if etag(&second)? == first_etag {
                    // Same body length, different body: S3's ETag (an MD5) must change.
                    return Err(unenforced("If-Match", "an update left the ETag unchanged"));
                }
            }
            Err(object_store::Error::Precondition { .. }) => {
                return Err(unenforced(
                    "If-Match",
                    "an update carrying the current (unquoted) ETag was refused",
                ));
            }
            Err(e) => return Err(request_error(step, e)),
        }
        let step = "update it with the stale ETag (If-Match)";
        let stale = UpdateVersion {
            e_tag: Some(first_etag.clone()),
            version: None,
        };
        match put(step, PutMode::Update(stale), "4").await? {
            Err(object_store::Error::Precondition { .. }) => Ok(()),
            Ok(_) => Err(unenforced(
                "If-Match",
                "an update carrying a stale ETag succeeded",
            )),
            Err(e) => Err(request_error(step, e)),
        }
    }
    .await;
    // The scratch object holds nothing of value; a failed delete only leaves a few bytes.
    if let Err(error) = store.delete(&key).await {
        tracing::warn!(%error, key = %key, "cannot delete the capability-check object");
    }
    result
}
