//! The router's errors: [`RouterError`] stops the process; [`ApiError`] is one response, mapped
//! to its status and JSON body in one table.

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::guild_id::GuildIdError;
use super::retry::RETRY_AFTER_SECS;

/// Why the router could not start or stopped serving (exit code 1, DESIGN §12; a bad config is
/// reported before the router starts, with exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The HTTP listener could not be bound.
    #[error("cannot listen on http.listen = {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The Prometheus recorder could not be installed (one per process).
    #[error("cannot install the metrics recorder: {0}")]
    Metrics(String),
    /// The HTTP client toward the pods could not be built (TLS roots).
    #[error("cannot build the HTTP client toward the pods")]
    Client(#[source] reqwest::Error),
    /// The ready file could not be written.
    #[error("cannot write the ready file {path}")]
    ReadyFile {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The server failed while accepting connections.
    #[error("the HTTP server failed")]
    Serve(#[source] std::io::Error),
}

/// One request's failure, answered `{"error": {"code": "…", "message": "…"}}` with the status of
/// [`ApiError::status`]. Errors of the owner pod itself (its 4xx and 5xx) are not `ApiError`s:
/// they pass through as the pod sent them.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `bad_guild_id`: the path's `guild_id` is not a guild id.
    #[error(transparent)]
    BadGuildId(#[from] GuildIdError),
    /// 404 `not_found`: no such route on the router.
    #[error("no route for {method} {path}")]
    NotFound {
        /// The request method.
        method: String,
        /// The request path.
        path: String,
    },
    /// 405 `method_not_allowed`: the route exists with other methods.
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed {
        /// The request method.
        method: String,
        /// The request path.
        path: String,
    },
    /// 413 `body_too_large`: the request body is over the router's bound.
    #[error("the request body is over {limit} bytes")]
    BodyTooLarge {
        /// The bound, bytes ([`super::forward::MAX_REQUEST_BODY`]).
        limit: usize,
    },
    /// 400 `bad_body`: the client's request body could not be read.
    #[error("cannot read the request body: {0}")]
    BadBody(String),
    /// 503 `owner_unavailable` with `Retry-After`: the owner refused or did not accept the
    /// connection through every attempt (DESIGN §8: never another pod).
    #[error(
        "pod {pod} ({url}) owns this guild and is unreachable after {attempts} attempts: {cause}"
    )]
    OwnerUnavailable {
        /// The owner's ordinal.
        pod: u32,
        /// The owner's base URL.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// The last connection error, its causes on one line.
        cause: String,
    },
    /// 504 `owner_timeout`: the owner accepted the request but sent no response headers within
    /// [`super::retry::RESPONSE_TIMEOUT`]. Not retried: it may have handled the request.
    #[error("pod {pod} ({url}) owns this guild and did not answer within {secs} s")]
    OwnerTimeout {
        /// The owner's ordinal.
        pod: u32,
        /// The owner's base URL.
        url: String,
        /// The bound, seconds.
        secs: u64,
    },
    /// 502 `owner_failed`: the exchange with the owner broke after the connection was made
    /// (reset, malformed response). Not retried: it may have handled the request.
    #[error("pod {pod} ({url}) owns this guild and the request to it failed: {cause}")]
    OwnerFailed {
        /// The owner's ordinal.
        pod: u32,
        /// The owner's base URL.
        url: String,
        /// The error, its causes on one line.
        cause: String,
    },
    /// 401 `unauthorized`: every pod refused the credentials of a `/v1/ownership` request.
    #[error(
        "every pod refused the credentials (401); /v1 needs Authorization: Bearer $SHARDLITE_API_TOKEN"
    )]
    Unauthorized,
}

impl ApiError {
    /// The HTTP status: one arm per variant.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadGuildId(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BadBody(_) => StatusCode::BAD_REQUEST,
            ApiError::OwnerUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::OwnerTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::OwnerFailed { .. } => StatusCode::BAD_GATEWAY,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
        }
    }

    /// The stable machine-readable `error.code`.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadGuildId(_) => "bad_guild_id",
            ApiError::NotFound { .. } => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::BodyTooLarge { .. } => "body_too_large",
            ApiError::BadBody(_) => "bad_body",
            ApiError::OwnerUnavailable { .. } => "owner_unavailable",
            ApiError::OwnerTimeout { .. } => "owner_timeout",
            ApiError::OwnerFailed { .. } => "owner_failed",
            ApiError::Unauthorized => "unauthorized",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": { "code": self.code(), "message": self.to_string() }
        });
        let mut response = (self.status(), Json(body)).into_response();
        let headers = response.headers_mut();
        match self {
            ApiError::OwnerUnavailable { .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            }
            ApiError::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_unavailable_names_the_pod_and_retry_after() {
        let e = ApiError::OwnerUnavailable {
            pod: 2,
            url: "http://gw-2:3000".into(),
            attempts: 3,
            cause: "connection refused".into(),
        };
        assert!(
            e.to_string().starts_with("pod 2 (http://gw-2:3000) "),
            "{e}"
        );
        let r = e.into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }
}
