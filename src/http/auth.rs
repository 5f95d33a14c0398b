//! Bearer-token authentication of `/v1` (DESIGN §8): `Authorization: Bearer $SHARDLITE_API_TOKEN`,
//! compared in constant time so response timing does not reveal how much of a guess was right.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq as _;

use super::error::ApiError;
use crate::config::Secret;

/// The configured token, or `None` (then the API answers 503 to everyone).
#[derive(Clone)]
pub struct ApiToken(pub Option<Secret>);

impl ApiToken {
    /// Whether `headers` carry `Authorization: Bearer <the token>`. Always false without a
    /// configured token.
    pub fn accepts(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.0 else {
            return false;
        };
        let Some(given) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        else {
            return false;
        };
        given.ct_eq(token.expose().as_bytes()).into()
    }
}

/// Middleware for `/v1`: 503 `api_token_not_configured` without a token (the API is never open),
/// 401 `unauthorized` for a missing or wrong one.
pub async fn require_token(
    State(token): State<ApiToken>,
    request: Request,
    next: Next,
) -> Response {
    if token.0.is_none() {
        return ApiError::unavailable(
            "api_token_not_configured",
            "the API is disabled: set SHARDLITE_API_TOKEN on this pod to enable it",
            3600,
        )
        .into_response();
    }
    if !token.accepts(request.headers()) {
        let mut response = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send Authorization: Bearer <SHARDLITE_API_TOKEN>",
        )
        .into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            "Bearer".parse().expect("static header"),
        );
        return response;
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_is_accepted() {
        let token = ApiToken(Some(Secret::new("s3cret")));
        let with = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, value.parse().unwrap());
            h
        };
        assert!(token.accepts(&with("Bearer s3cret")));
        for wrong in [
            "Bearer s3cre",
            "Bearer s3cret2",
            "bearer s3cret",
            "s3cret",
            "Bearer ",
        ] {
            assert!(!token.accepts(&with(wrong)), "{wrong}");
        }
        assert!(!token.accepts(&HeaderMap::new()));
        assert!(!ApiToken(None).accepts(&with("Bearer s3cret")));
    }
}
