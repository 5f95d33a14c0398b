//! Forwarding `/v1/guilds/{guild_id}/…` to the pod that owns the guild (DESIGN §8): the owner is
//! [`Topology::pod_of_guild`](crate::ownership::Topology::pod_of_guild) under the current config,
//! the URL `cluster.peer_url_template` with its ordinal plus the request's path and query. Method,
//! headers (`Authorization` included) and body go as received; the pod's status, headers and
//! body come back as sent, the body streamed.
//!
//! Retries follow [`super::retry`]: only a refused or timed-out connection and a 503 from the
//! owner are retried, and only at the owner. A 421 (Misdirected Request) means the pod computes
//! another owner, i.e. the configs drifted apart: the router reads its config again once and
//! sends the request once more to the owner it now computes, then passes on whatever comes.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, Method, StatusCode, header};
use axum::response::Response;
use futures_util::StreamExt as _;
use tokio::time::Instant;
use tracing::Instrument as _;

use super::Shared;
use super::error::ApiError;
use super::guild_id::{guild_segment, parse_guild_id};
use super::metrics::observe_upstream;
use super::retry::{Attempts, RESPONSE_TIMEOUT};
use crate::error_chain;

/// Largest request body the router forwards, bytes (16 MiB). Request bodies are held in memory
/// because a retry must send them again; the `/v1` API takes small JSON bodies. Responses are
/// streamed and not bounded here.
pub const MAX_REQUEST_BODY: usize = 16 * 1024 * 1024;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1): never forwarded in
/// either direction. `Host` is set by the client toward the pod, `Content-Length` from the body.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes the hop-by-hop headers, and the ones the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// Reads the client's body, up to [`MAX_REQUEST_BODY`].
async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut buffer = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadBody(error_chain(&e)))?;
        if buffer.len() + chunk.len() > MAX_REQUEST_BODY {
            return Err(ApiError::BodyTooLarge {
                limit: MAX_REQUEST_BODY,
            });
        }
        buffer.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buffer))
}

/// The request as it goes to the owner, sent as often as the retries need.
struct Outgoing {
    method: Method,
    /// Path and query as the client wrote them.
    path_and_query: String,
    headers: HeaderMap,
    body: Bytes,
    /// Whether to send `body` even when empty (the client sent a `Content-Length`).
    has_body: bool,
}

/// Handles one `/v1/guilds/{guild_id}[/…]` request: any method.
///
/// # Errors
/// [`ApiError::BadGuildId`] before anything is sent; [`ApiError::BodyTooLarge`] /
/// [`ApiError::BadBody`] for the client's body; [`ApiError::OwnerUnavailable`],
/// [`ApiError::OwnerTimeout`], [`ApiError::OwnerFailed`] for the owner.
pub async fn guild_request(state: Arc<Shared>, request: Request) -> Result<Response, ApiError> {
    let guild = parse_guild_id(guild_segment(request.uri().path()).unwrap_or(""))?;
    let (parts, body) = request.into_parts();
    let has_body = parts.headers.contains_key(header::CONTENT_LENGTH)
        || parts.headers.contains_key(header::TRANSFER_ENCODING);
    let body = read_body(body).await?;
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    headers.remove(header::CONTENT_LENGTH);
    let outgoing = Outgoing {
        method: parts.method,
        path_and_query: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned()),
        headers,
        has_body,
        body,
    };
    let mut config = state.config();
    let mut reread = false;
    loop {
        let pod = config.topology().pod_of_guild(guild);
        let base = config.cluster.peer_url(pod);
        let span = tracing::info_span!("forward", guild, pod);
        let response = send_to_owner(&state.client, pod, &base, &outgoing)
            .instrument(span)
            .await?;
        if response.status() == StatusCode::MISDIRECTED_REQUEST && !reread {
            reread = true;
            tracing::warn!(guild, pod, url = %base,
                "pod answered 421: it computes another owner (config drift); reading the config again");
            match state.reread_config().await {
                Ok(new) => {
                    config = new;
                    continue;
                }
                Err(e) => tracing::error!(error = %e,
                    "the config does not load; the pod's 421 goes to the client"),
            }
        } else if response.status() == StatusCode::MISDIRECTED_REQUEST {
            tracing::warn!(guild, pod, url = %base,
                "pod answered 421 again after the config was read again; passed on");
        }
        return Ok(relay(response));
    }
}

/// Sends `outgoing` to pod `pod` at `base`, retrying connection failures and 503s within the
/// bounds of [`super::retry`]. A 503 that outlasts them is returned as the pod sent it.
async fn send_to_owner(
    client: &reqwest::Client,
    pod: u32,
    base: &str,
    outgoing: &Outgoing,
) -> Result<reqwest::Response, ApiError> {
    let url = format!("{base}{}", outgoing.path_and_query);
    let mut attempts = Attempts::start();
    loop {
        let mut request = client
            .request(outgoing.method.clone(), &url)
            .headers(outgoing.headers.clone());
        if outgoing.has_body || !outgoing.body.is_empty() {
            request = request.body(outgoing.body.clone());
        }
        let started = Instant::now();
        let result = tokio::time::timeout(RESPONSE_TIMEOUT, request.send()).await;
        observe_upstream(pod, started.elapsed());
        let retry = match result {
            Err(_) => {
                return Err(ApiError::OwnerTimeout {
                    pod,
                    url: base.to_owned(),
                    secs: RESPONSE_TIMEOUT.as_secs(),
                });
            }
            Ok(Ok(response)) if response.status() == StatusCode::SERVICE_UNAVAILABLE => {
                match attempts.next_wait() {
                    Some(wait) => {
                        tracing::info!(attempt = attempts.made(), "owner answered 503; retrying");
                        wait
                    }
                    None => return Ok(response),
                }
            }
            Ok(Ok(response)) => return Ok(response),
            Ok(Err(e)) if e.is_connect() => match attempts.next_wait() {
                Some(wait) => {
                    tracing::info!(attempt = attempts.made(), error = %error_chain(&e),
                        "owner unreachable; retrying");
                    wait
                }
                None => {
                    tracing::warn!(error = %error_chain(&e), "owner unreachable; answering 503");
                    return Err(ApiError::OwnerUnavailable {
                        pod,
                        url: base.to_owned(),
                        attempts: attempts.made(),
                        cause: error_chain(&e),
                    });
                }
            },
            Ok(Err(e)) => {
                return Err(ApiError::OwnerFailed {
                    pod,
                    url: base.to_owned(),
                    cause: error_chain(&e),
                });
            }
        };
        tokio::time::sleep(retry).await;
    }
}

/// The pod's response for the client: status and end-to-end headers as sent, body streamed.
fn relay(response: reqwest::Response) -> Response {
    let status = response.status();
    let mut headers = response.headers().clone();
    strip_hop_by_hop(&mut headers);
    let mut out = Response::new(Body::from_stream(response.bytes_stream()));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn hop_by_hop_headers_stay() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h[header::AUTHORIZATION], "Bearer t");
    }

    #[tokio::test]
    async fn body_bound() {
        let big = Body::from(vec![0u8; MAX_REQUEST_BODY + 1]);
        assert!(matches!(
            read_body(big).await,
            Err(ApiError::BodyTooLarge { .. })
        ));
        assert_eq!(read_body(Body::from("abc")).await.unwrap(), "abc");
    }
}
