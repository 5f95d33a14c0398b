//! The one REST call the node makes before connecting: `GET /gateway/bot`.
//!
//! Discord's "Get Gateway Bot" returns the gateway URL, the recommended shard count and the
//! `session_start_limit` (identifies left today, when the budget resets, and `max_concurrency`,
//! the number of identify buckets that may start every 5 s), from which the identify queue is built.

use std::time::Duration;

use twilight_model::gateway::connection_info::BotConnectionInfo;

use super::NodeError;
use crate::config::Secret;

/// Bound on the `/gateway/bot` request, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Fetches `GET {api_url}/v10/gateway/bot` with the bot token.
///
/// # Errors
/// [`NodeError::GatewayBot`] if the request fails or the body is not Discord's shape;
/// [`NodeError::GatewayBotStatus`] for a non-2xx answer (401: the token is wrong).
pub async fn gateway_bot(api_url: &str, token: &Secret) -> Result<BotConnectionInfo, NodeError> {
    let url = format!("{api_url}/v10/gateway/bot");
    let err = |source| NodeError::GatewayBot {
        url: url.clone(),
        source,
    };
    let response = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(err)?
        .get(&url)
        .header("Authorization", format!("Bot {}", token.expose()))
        .send()
        .await
        .map_err(err)?;
    let status = response.status();
    if !status.is_success() {
        return Err(NodeError::GatewayBotStatus {
            url,
            status: status.as_u16(),
        });
    }
    response.json().await.map_err(err)
}
