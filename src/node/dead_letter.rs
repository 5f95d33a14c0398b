//! Dispatches the gateway delivered that twilight cannot turn into events, kept as dead letters.
//!
//! Two kinds reach here: a dispatch whose event type twilight-model 0.18 does not know (Discord
//! adds event types; twilight's `parse` returns nothing for them), and a dispatch whose payload
//! does not decode (a missing or mistyped field). Both carry a sequence, so skipping them silently
//! would lose what Discord delivered; instead the owning partition stores the frame as received
//! (`dead_letters`, DESIGN §5) in the same transaction that advances its applied sequence past it.
//! A frame that is not even valid JSON has no sequence to keep it by: it is logged and counted.

use twilight_gateway::EventTypeFlags;
use twilight_model::gateway::OpCode;
use twilight_model::gateway::event::GatewayEventDeserializer;

use crate::store::DeadLetter;

/// Why an unknown event type was not applied (the `error` column).
pub const UNKNOWN_EVENT_TYPE: &str = "event type unknown to twilight-model 0.18";

/// The dead letter of `frame` when it is a dispatch (op 0, with a sequence) of an event type
/// twilight does not know; `None` for everything else, which goes through twilight's `parse`.
/// Cheap: reads the envelope's `op`, `s` and `t` without decoding the payload.
pub fn unknown_event(frame: &str) -> Option<DeadLetter> {
    let envelope = GatewayEventDeserializer::from_json(frame)?;
    if envelope.op() != OpCode::Dispatch as u8 {
        return None;
    }
    let kind = envelope.event_type()?;
    if EventTypeFlags::try_from((OpCode::Dispatch, Some(kind))).is_ok() {
        return None;
    }
    letter(
        frame,
        envelope.sequence()?,
        kind,
        UNKNOWN_EVENT_TYPE.to_owned(),
    )
}

/// The dead letter of a dispatch whose payload twilight could not decode (`frame` is the text of
/// twilight's `Deserializing` error, `error` its message); `None` when the frame is not a dispatch
/// with a sequence and an event type.
pub fn undecodable(frame: &str, error: String) -> Option<DeadLetter> {
    let envelope = GatewayEventDeserializer::from_json(frame)?;
    if envelope.op() != OpCode::Dispatch as u8 {
        return None;
    }
    letter(frame, envelope.sequence()?, envelope.event_type()?, error)
}

fn letter(frame: &str, seq: u64, kind: &str, error: String) -> Option<DeadLetter> {
    Some(DeadLetter {
        seq,
        kind: kind.to_owned(),
        guild_id: guild_id(frame),
        payload: frame.to_owned(),
        error,
    })
}

/// `d.guild_id` of a frame (a snowflake string), when the frame is JSON and has one.
fn guild_id(frame: &str) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Frame {
        d: Option<Data>,
    }
    #[derive(serde::Deserialize)]
    struct Data {
        guild_id: Option<String>,
    }
    serde_json::from_str::<Frame>(frame)
        .ok()?
        .d?
        .guild_id?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_dispatch_is_a_dead_letter_with_its_guild() {
        let frame = r#"{"op":0,"s":42,"t":"GUILD_SOUNDBOARD_FUTURE","d":{"guild_id":"81384788765712384","x":1}}"#;
        let letter = unknown_event(frame).unwrap();
        assert_eq!(letter.seq, 42);
        assert_eq!(letter.kind, "GUILD_SOUNDBOARD_FUTURE");
        assert_eq!(letter.guild_id, Some(81_384_788_765_712_384));
        assert_eq!(letter.payload, frame);
        assert_eq!(letter.error, UNKNOWN_EVENT_TYPE);
    }

    #[test]
    fn known_dispatches_and_gateway_ops_are_not_dead_letters() {
        assert!(unknown_event(r#"{"op":0,"s":1,"t":"MESSAGE_CREATE","d":{}}"#).is_none());
        assert!(unknown_event(r#"{"op":11,"s":null,"t":null,"d":null}"#).is_none());
        assert!(unknown_event(r#"{"op":0,"s":null,"t":"NEW_THING","d":{}}"#).is_none());
        assert!(unknown_event("not json").is_none());
    }

    #[test]
    fn an_undecodable_dispatch_keeps_its_frame_and_error() {
        let frame = r#"{"op":0,"s":7,"t":"GUILD_MEMBER_ADD","d":{"user":{"id":"1"}}}"#;
        let letter = undecodable(frame, "missing field `guild_id`".into()).unwrap();
        assert_eq!((letter.seq, letter.guild_id), (7, None));
        assert_eq!(letter.kind, "GUILD_MEMBER_ADD");
        assert_eq!(letter.error, "missing field `guild_id`");
        // Truncated JSON has no sequence to keep it by.
        assert!(
            undecodable(
                r#"{"op":0,"s":null,"t":"MESSAGE_CREATE","d":{"id":"1","#,
                String::new()
            )
            .is_none()
        );
    }
}
