//! `X-Request-Id`: kept when the client sent a usable one, created otherwise; passed to the owner
//! pod, returned to the client and recorded on the request's tracing span, so one id follows a
//! request through the router and the pod's logs.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument as _;

/// The header's name (lowercase, as HTTP/2 requires).
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest request id the router passes on; a longer one is replaced, so a client cannot make
/// every log line huge.
pub const MAX_LEN: usize = 128;

/// The request's id, in its extensions for handlers.
#[derive(Clone, Debug)]
pub struct RequestId(pub HeaderValue);

/// A new id: 128 random bits as 32 lowercase hex digits.
pub fn new_id() -> HeaderValue {
    HeaderValue::from_str(&format!("{:032x}", fastrand::u128(..)))
        .expect("hex digits are a valid header value")
}

/// The client's id if it is 1..=[`MAX_LEN`] visible ASCII characters.
fn usable(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    (1..=MAX_LEN).contains(&bytes.len()) && bytes.iter().all(|b| b.is_ascii_graphic())
}

/// Middleware: sets the request's `X-Request-Id` (the client's or a new one), runs the rest in a
/// span carrying it, and puts the same id on the response.
pub async fn propagate(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(&X_REQUEST_ID)
        .filter(|v| usable(v))
        .cloned()
        .unwrap_or_else(new_id);
    request.headers_mut().insert(X_REQUEST_ID, id.clone());
    request.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!(
        "request",
        request_id = %String::from_utf8_lossy(id.as_bytes()),
        method = %request.method(),
        path = %request.uri().path(),
    );
    let mut response = next.run(request).instrument(span).await;
    response.headers_mut().insert(X_REQUEST_ID, id);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        let a = new_id();
        assert_eq!(a.len(), 32);
        assert_ne!(a, new_id());
        assert!(usable(&HeaderValue::from_static("abc-123")));
        assert!(!usable(&HeaderValue::from_static("")));
        assert!(!usable(&HeaderValue::from_static("a b")));
        assert!(!usable(
            &HeaderValue::from_str(&"x".repeat(MAX_LEN + 1)).unwrap()
        ));
    }
}
