//! The guild id of a `/v1/guilds/{guild_id}/…` path: the one input the router computes the owner
//! from, so a malformed one is the client's error (400), never a 500 or a guess.

use std::fmt;

/// The path prefix the router forwards, without the trailing `/`.
pub const GUILDS_PREFIX: &str = "/v1/guilds";

/// Why a `guild_id` path segment is not a guild id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuildIdError {
    /// No segment: `/v1/guilds` or `/v1/guilds/`, `/v1/guilds//messages`.
    Empty,
    /// Something other than ASCII digits (`abc`, `-1`, `+5`, `1e9`, `%31`).
    NotDigits(String),
    /// Digits beyond `u64::MAX` (`18446744073709551616`).
    OutOfRange(String),
}

impl fmt::Display for GuildIdError {
    /// `guild_id "abc": must be …`, naming the parameter as the path spells it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuildIdError::Empty => f.write_str(
                "guild_id \"\": missing; the path is /v1/guilds/{guild_id}/… with a Discord \
                 snowflake (decimal digits)",
            ),
            GuildIdError::NotDigits(raw) => write!(
                f,
                "guild_id {raw:?}: must be a Discord snowflake, decimal digits only"
            ),
            GuildIdError::OutOfRange(raw) => write!(
                f,
                "guild_id {raw:?}: out of range; a Discord snowflake is at most {}",
                u64::MAX
            ),
        }
    }
}

impl std::error::Error for GuildIdError {}

/// The raw `guild_id` segment of `path` if `path` is `/v1/guilds` or under `/v1/guilds/`
/// (`Some("")` when the segment is missing); `None` for any other path.
pub fn guild_segment(path: &str) -> Option<&str> {
    let rest = path.strip_prefix(GUILDS_PREFIX)?;
    if rest.is_empty() {
        return Some("");
    }
    let rest = rest.strip_prefix('/')?;
    Some(rest.split('/').next().unwrap_or(""))
}

/// Parses a `guild_id` segment as written in the path (no percent-decoding: ids are digits).
///
/// # Errors
/// [`GuildIdError`] for an empty segment, anything but ASCII digits, or a value over `u64::MAX`.
pub fn parse_guild_id(raw: &str) -> Result<u64, GuildIdError> {
    if raw.is_empty() {
        return Err(GuildIdError::Empty);
    }
    // `u64::from_str` alone would take a leading `+`.
    if !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(GuildIdError::NotDigits(raw.to_owned()));
    }
    raw.parse()
        .map_err(|_| GuildIdError::OutOfRange(raw.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments() {
        assert_eq!(guild_segment("/v1/guilds"), Some(""));
        assert_eq!(guild_segment("/v1/guilds/"), Some(""));
        assert_eq!(guild_segment("/v1/guilds//messages"), Some(""));
        assert_eq!(guild_segment("/v1/guilds/42"), Some("42"));
        assert_eq!(guild_segment("/v1/guilds/42/messages/7"), Some("42"));
        assert_eq!(guild_segment("/v1/guildsx/42"), None);
        assert_eq!(guild_segment("/v1/ownership"), None);
    }

    #[test]
    fn ids() {
        assert_eq!(parse_guild_id("81384788765712384"), Ok(81384788765712384));
        assert_eq!(parse_guild_id("18446744073709551615"), Ok(u64::MAX));
        for bad in ["abc", "-1", "+1", "1.0", "%31", " 1"] {
            assert_eq!(
                parse_guild_id(bad),
                Err(GuildIdError::NotDigits(bad.into()))
            );
        }
        assert_eq!(
            parse_guild_id("18446744073709551616"),
            Err(GuildIdError::OutOfRange("18446744073709551616".into()))
        );
        assert_eq!(parse_guild_id(""), Err(GuildIdError::Empty));
        assert!(
            GuildIdError::NotDigits("abc".into())
                .to_string()
                .starts_with("guild_id \"abc\": ")
        );
    }
}
