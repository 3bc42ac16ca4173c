//! Converts Cascade messages between the wire encoding (postcard) and integration JSON.
//!
//! This is what an integrator reaches for when a payload captured with `mosquitto_sub` needs
//! reading, or a hand-written JSON message needs sending to devices that speak postcard.

use cascade_proto::envelope::encode_json_pretty;
use cascade_proto::topic::{DeviceTopic, TopicError};
use cascade_proto::{DecodeError, Limits, Message, decode, decode_json, encode};

/// How input bytes are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// JSON if the input starts with `{` (after whitespace), else postcard.
    Auto,
    /// The postcard wire encoding.
    Postcard,
    /// Integration JSON.
    Json,
    /// The postcard wire encoding written as hex text.
    Hex,
}

/// A codec command that could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The input is not a valid Cascade message.
    #[error("input is not a valid Cascade message: {0}")]
    Decode(#[from] DecodeError),
    /// Hex input with a non-hex character or odd length.
    #[error("input is not hex: {0}")]
    Hex(#[from] hex::FromHexError),
    /// A topic outside the scheme.
    #[error("not a Cascade topic: {0}")]
    Topic(#[from] TopicError),
}

/// Decodes `input` in `format`.
pub fn read_message(
    input: &[u8],
    format: InputFormat,
    limits: &Limits,
) -> Result<Message, CodecError> {
    let format = match format {
        InputFormat::Auto if input.trim_ascii_start().starts_with(b"{") => InputFormat::Json,
        InputFormat::Auto => InputFormat::Postcard,
        other => other,
    };
    Ok(match format {
        InputFormat::Json => decode_json(input, limits)?,
        InputFormat::Hex => decode(&hex::decode(input.trim_ascii())?, limits)?,
        InputFormat::Postcard | InputFormat::Auto => decode(input, limits)?,
    })
}

/// The message as indented integration JSON.
pub fn to_pretty_json(message: &Message) -> String {
    encode_json_pretty(message)
}

/// The message in the wire encoding.
pub fn to_wire(message: &Message) -> Vec<u8> {
    encode(message)
}

/// Explains a concrete topic: fleet, device, channel, and who publishes on it.
pub fn explain_topic(topic: &str) -> Result<String, CodecError> {
    let t = DeviceTopic::parse(topic)?;
    let direction = if t.channel.from_device() {
        "device → cloud"
    } else {
        "cloud → device"
    };
    Ok(format!(
        "fleet:   {}\ndevice:  {}\nchannel: {} ({direction})",
        t.fleet, t.device, t.channel
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cascade_proto::MessageKind;
    use cascade_proto::examples::example;

    #[test]
    fn every_format_reads_the_same_message() {
        let msg = example(MessageKind::Telemetry);
        let limits = Limits::default();
        let wire = to_wire(&msg);
        let json = to_pretty_json(&msg);
        let hex_text = hex::encode(&wire) + "\n";
        assert_eq!(
            read_message(&wire, InputFormat::Auto, &limits).unwrap(),
            msg
        );
        assert_eq!(
            read_message(json.as_bytes(), InputFormat::Auto, &limits).unwrap(),
            msg
        );
        assert_eq!(
            read_message(hex_text.as_bytes(), InputFormat::Hex, &limits).unwrap(),
            msg
        );
    }

    #[test]
    fn explains_topics_and_rejects_filters() {
        let text = explain_topic("cascade/v1/acme/cam-01/ota/chunk").unwrap();
        assert!(
            text.contains("cam-01") && text.contains("cloud → device"),
            "{text}"
        );
        assert!(matches!(
            explain_topic("cascade/v1/acme/+/escalate"),
            Err(CodecError::Topic(TopicError::Wildcard(_)))
        ));
    }
}
