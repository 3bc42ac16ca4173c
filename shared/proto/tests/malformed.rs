//! Bad input gets a typed error that names what was wrong.

use cascade_proto::envelope::{DEFAULT_MAX_MESSAGE_BYTES, peek_header};
use cascade_proto::escalation::{Payload, PrivacyMode, Tensor};
use cascade_proto::examples::example;
use cascade_proto::validate::ValidationError;
use cascade_proto::{
    DecodeError, Limits, Message, MessageKind, PROTOCOL_VERSION, decode, decode_json, encode,
    encode_json,
};

fn limits() -> Limits {
    Limits::default()
}

fn escalation() -> cascade_proto::escalation::EscalationRequest {
    match example(MessageKind::EscalationRequest) {
        Message::EscalationRequest(e) => e,
        _ => unreachable!(),
    }
}

#[test]
fn oversized_input_is_refused_before_parsing() {
    let garbage = vec![0xffu8; 101];
    let small = Limits {
        max_message_bytes: 100,
    };
    assert_eq!(
        decode(&garbage, &small),
        Err(DecodeError::TooLarge { len: 101, max: 100 })
    );
    assert_eq!(
        decode_json(&garbage, &small),
        Err(DecodeError::TooLarge { len: 101, max: 100 })
    );
    let message = encode(&example(MessageKind::OtaChunk));
    assert!(
        decode(
            &message,
            &Limits {
                max_message_bytes: message.len()
            }
        )
        .is_ok()
    );
    assert!(matches!(
        decode(
            &message,
            &Limits {
                max_message_bytes: message.len() - 1
            }
        ),
        Err(DecodeError::TooLarge { .. })
    ));
}

#[test]
fn a_large_tensor_fits_the_default_limit_and_a_larger_one_does_not() {
    let mut esc = escalation();
    // 224 x 224 x 3 f32: a typical image model input, 602 KB.
    esc.payload = Payload::Tensor(Tensor::from_f32(
        vec![1, 224, 224, 3],
        &vec![0.5; 224 * 224 * 3],
    ));
    assert!(decode(&encode(&esc.clone().into()), &limits()).is_ok());
    esc.payload = Payload::Tensor(Tensor::from_f32(
        vec![1, 300, 300, 3],
        &vec![0.5; 300 * 300 * 3],
    ));
    let bytes = encode(&esc.into());
    assert!(bytes.len() > DEFAULT_MAX_MESSAGE_BYTES);
    assert!(matches!(
        decode(&bytes, &limits()),
        Err(DecodeError::TooLarge { .. })
    ));
}

#[test]
fn other_protocol_versions_are_refused() {
    let mut bytes = encode(&example(MessageKind::Verdict));
    bytes[0] = 2;
    assert_eq!(
        decode(&bytes, &limits()),
        Err(DecodeError::UnsupportedVersion {
            found: 2,
            supported: PROTOCOL_VERSION
        })
    );
    // A version too large for u16 is still "unsupported", not "malformed".
    let mut huge = vec![0xff; 9];
    huge.push(0x01);
    huge.extend_from_slice(&bytes[1..]);
    assert!(matches!(
        decode(&huge, &limits()),
        Err(DecodeError::UnsupportedVersion { .. })
    ));
    let json =
        encode_json(&example(MessageKind::Verdict)).replace("\"version\":1", "\"version\":7");
    assert_eq!(
        decode_json(json.as_bytes(), &limits()),
        Err(DecodeError::UnsupportedVersion {
            found: 7,
            supported: PROTOCOL_VERSION
        })
    );
}

#[test]
fn unknown_kinds_are_refused_with_their_tag() {
    assert_eq!(
        decode(&[1, 99, 0, 0], &limits()),
        Err(DecodeError::UnknownKindCode(99))
    );
    assert_eq!(
        peek_header(&[1, 10], &limits()),
        Err(DecodeError::UnknownKindCode(10))
    );
    let json = encode_json(&example(MessageKind::Verdict)).replace("\"verdict\"", "\"verdikt\"");
    assert_eq!(
        decode_json(json.as_bytes(), &limits()),
        Err(DecodeError::UnknownKindName("verdikt".into()))
    );
}

#[test]
fn header_is_readable_without_the_body() {
    let bytes = encode(&example(MessageKind::Telemetry));
    let header = peek_header(&bytes[..3], &limits()).unwrap();
    assert_eq!(header.kind, MessageKind::Telemetry);
}

#[test]
fn empty_and_truncated_input_is_malformed() {
    assert!(matches!(
        decode(&[], &limits()),
        Err(DecodeError::Malformed { kind: None, .. })
    ));
    let bytes = encode(&example(MessageKind::DeviceStatus));
    assert!(matches!(
        decode(&bytes[..bytes.len() - 1], &limits()),
        Err(DecodeError::Malformed {
            kind: Some(MessageKind::DeviceStatus),
            ..
        })
    ));
    assert!(matches!(
        decode_json(b"{\"version\":1,\"kind\":\"verdict\"", &limits()),
        Err(DecodeError::Malformed { kind: None, .. })
    ));
}

#[test]
fn trailing_bytes_are_refused() {
    let mut bytes = encode(&example(MessageKind::Rejection));
    bytes.push(0);
    assert_eq!(
        decode(&bytes, &limits()),
        Err(DecodeError::TrailingBytes {
            kind: MessageKind::Rejection,
            count: 1
        })
    );
}

#[test]
fn wrong_tensor_size_is_invalid_and_says_so() {
    let mut esc = escalation();
    if let Payload::Tensor(t) = &mut esc.payload {
        t.shape = vec![1, 5];
    }
    let err = decode(&encode(&esc.into()), &limits()).unwrap_err();
    assert!(
        matches!(
            &err,
            DecodeError::Invalid {
                kind: MessageKind::EscalationRequest,
                source: ValidationError::TensorSize { actual: 16, .. }
            }
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("[1, 5]") && text.contains("20 bytes expected"),
        "{text}"
    );
}

#[test]
fn payload_must_match_the_stated_privacy_mode() {
    let mut esc = escalation();
    esc.privacy = PrivacyMode::Embedding;
    assert!(matches!(
        decode(&encode(&esc.into()), &limits()),
        Err(DecodeError::Invalid {
            source: ValidationError::Inconsistent { .. },
            ..
        })
    ));
}

#[test]
fn json_body_errors_name_the_kind_and_the_field() {
    let json = br#"{"version":1,"kind":"ota_chunk_request","body":{"model":{"name":"m","version":"1.0.0"},"artifact":"full","first":0}}"#;
    let err = decode_json(json, &limits()).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::Malformed {
                kind: Some(MessageKind::OtaChunkRequest),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("count"), "{err}");
}

#[test]
fn json_unknown_fields_are_refused() {
    let json = encode_json(&example(MessageKind::Rejection))
        .replace("\"reason\"", "\"extra\":1,\"reason\"");
    assert!(matches!(
        decode_json(json.as_bytes(), &limits()),
        Err(DecodeError::Malformed { .. })
    ));
}

#[test]
fn json_numbers_that_overflow_f32_are_invalid() {
    let json = encode_json(&example(MessageKind::Verdict)).replace("0.93", "1e39");
    assert!(matches!(
        decode_json(json.as_bytes(), &limits()),
        Err(DecodeError::Invalid {
            source: ValidationError::NotFinite { .. },
            ..
        })
    ));
}

#[test]
fn json_bad_base64_is_malformed() {
    let json = encode_json(&example(MessageKind::OtaChunk));
    let broken = json.replacen("\"data\":\"", "\"data\":\"!!", 1);
    assert_ne!(json, broken);
    assert!(matches!(
        decode_json(broken.as_bytes(), &limits()),
        Err(DecodeError::Malformed {
            kind: Some(MessageKind::OtaChunk),
            ..
        })
    ));
}

#[test]
fn examples_are_valid_and_cover_every_kind() {
    for &kind in MessageKind::ALL {
        let msg = example(kind);
        assert_eq!(msg.kind(), kind);
        assert_eq!(msg.validate(), Ok(()), "{kind}");
    }
}
