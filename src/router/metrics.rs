//! The router's Prometheus metrics: names, the recorder, and the per-request counter. No guild
//! id is a label (STYLE: unbounded cardinality); the pod ordinal is.

use std::time::Duration;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::error::RouterError;

/// Counter of responses the router sent, label `status` (the HTTP code, `"503"`).
pub const REQUESTS_TOTAL: &str = "shardlite_router_requests_total";

/// Histogram of the time from sending a request to a pod to its response headers, seconds, label
/// `pod` (the ordinal); one observation per attempt, failed attempts included.
pub const UPSTREAM_SECONDS: &str = "shardlite_router_upstream_seconds";

/// Buckets of [`UPSTREAM_SECONDS`], seconds: loopback to a slow cross-zone read.
pub const UPSTREAM_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The recorder's builder, with [`UPSTREAM_SECONDS`] as a histogram (the exporter's default
/// would render it as a summary).
///
/// # Panics
/// Never: the bucket list is not empty.
pub fn builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(UPSTREAM_SECONDS.to_owned()), UPSTREAM_BUCKETS)
        .expect("UPSTREAM_BUCKETS is not empty")
}

/// Installs the process-wide recorder behind the `metrics` macros, as `shardlite run` does, and
/// describes the router's metrics.
///
/// # Errors
/// [`RouterError::Metrics`] if a recorder is already installed in this process.
pub fn install() -> Result<PrometheusHandle, RouterError> {
    let handle = builder()
        .install_recorder()
        .map_err(|e| RouterError::Metrics(e.to_string()))?;
    metrics::describe_counter!(REQUESTS_TOTAL, "Responses the router sent, by HTTP status");
    metrics::describe_histogram!(
        UPSTREAM_SECONDS,
        metrics::Unit::Seconds,
        "Time from a request to a pod to its response headers, per attempt"
    );
    Ok(handle)
}

/// Middleware: counts every response by status.
pub async fn count(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    metrics::counter!(REQUESTS_TOTAL, "status" => response.status().as_u16().to_string())
        .increment(1);
    response
}

/// Records one attempt at pod `pod` that took `elapsed` until headers (or failure).
pub fn observe_upstream(pod: u32, elapsed: Duration) {
    metrics::histogram!(UPSTREAM_SECONDS, "pod" => pod.to_string()).record(elapsed.as_secs_f64());
}
