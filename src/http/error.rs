//! The API's error responses (DESIGN §8): JSON `{"error": {"code", "message"}}` with the status
//! that says who must act — the client (400, 401, 404, 421) or time (503 with `Retry-After`).
//! Nothing a client sends produces a 500.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// One API error: an HTTP status, a stable machine-readable `code`, a message for people, and
/// for 503 the seconds after which a retry may succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// Stable snake_case code clients may match on, e.g. `bad_guild_id`, `not_owner`.
    pub code: &'static str,
    /// What was wrong, naming the parameter or the pod.
    pub message: String,
    /// `Retry-After`, seconds (503 only).
    pub retry_after_secs: Option<u64>,
    /// For 421: the ordinal of the pod that owns the guild.
    pub owner: Option<u32>,
}

impl ApiError {
    /// 400: a path segment or query parameter the client sent is malformed; `message` names it.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404: the thing asked for is not cached here.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    /// 503 with `Retry-After: retry_after_secs`.
    pub fn unavailable(
        code: &'static str,
        message: impl Into<String>,
        retry_after_secs: u64,
    ) -> Self {
        Self {
            retry_after_secs: Some(retry_after_secs),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
        }
    }

    /// Any status.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_secs: None,
            owner: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({
            "error": { "code": self.code, "message": self.message }
        });
        if let Some(owner) = self.owner {
            body["error"]["owner_pod"] = owner.into();
        }
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
