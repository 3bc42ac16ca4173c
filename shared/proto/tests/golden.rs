//! Golden byte vectors: the postcard wire format of protocol version 1 must not drift.
//!
//! If one of these fails, a change altered the bytes on the wire. That breaks every deployed
//! device: revert it, or make it an append-only change (see docs/protocol.md), or bump
//! `PROTOCOL_VERSION` and keep decoding version 1.

use cascade_proto::escalation::{
    ClassScore, Confidence, ConfidenceMetric, EdgeResult, EscalationRequest, Payload, PolicyRule,
    PrivacyMode, RejectReason, Rejection, Tensor, Timings, Verdict,
};
use cascade_proto::model::{ModelRef, Version};
use cascade_proto::ota::{ArtifactInfo, ArtifactKind, ChunkRequest, Manifest, TargetSelector};
use cascade_proto::signing::{Signed, SigningKey};
use cascade_proto::status::Telemetry;
use cascade_proto::{Limits, Message, decode, encode};

const ID: uuid::Uuid = uuid::Uuid::from_u128(0x0011_2233_4455_6677_8899_aabb_ccdd_eeff);

fn check(message: Message, golden_hex: &str) {
    let bytes = encode(&message);
    assert_eq!(
        hex::encode(&bytes),
        golden_hex,
        "wire bytes of {} changed",
        message.kind()
    );
    let golden = hex::decode(golden_hex).unwrap();
    assert_eq!(decode(&golden, &Limits::default()).unwrap(), message);
}

#[test]
fn rejection() {
    check(
        Rejection {
            id: Some(ID),
            reason: RejectReason::TooLarge,
            detail: "big".into(),
        }
        .into(),
        "0102011000112233445566778899aabbccddeeff0203626967",
    );
}

#[test]
fn chunk_request() {
    check(
        ChunkRequest {
            model: ModelRef::new("m", Version::new(1, 2, 300)),
            artifact: ArtifactKind::Full,
            first: 5,
            count: 2,
        }
        .into(),
        "0106016d0102ac02000502",
    );
}

#[test]
fn verdict() {
    check(
        Verdict {
            id: ID,
            class: 7,
            label: Some("seven".into()),
            scores: vec![ClassScore {
                class: 7,
                score: 0.5,
            }],
            model: ModelRef::new("cloud", Version::new(2, 0, 0)),
            timings: Timings {
                queue_us: 100,
                inference_us: 2000,
                total_us: 2200,
            },
            batch_size: 8,
        }
        .into(),
        "01011000112233445566778899aabbccddeeff070105736576656e01070000003f05636c6f756402000064d00f981108",
    );
}

#[test]
fn telemetry() {
    check(
        Telemetry {
            device: "d1".into(),
            at_ms: 1_700_000_000_000,
            window_ms: 60_000,
            inputs: 600,
            escalations: 30,
            audits: 3,
            budget_overflows: 1,
            verdicts: 29,
            agreements: 20,
            errors: 0,
            inference_p50_us: 250,
            inference_p99_us: 900,
            queue_depth: 2,
        }
        .into(),
        "010402643180d095ffbc31e0d403d8041e03011d1400fa01840702",
    );
}

#[test]
fn escalation_request_with_tensor() {
    check(
        EscalationRequest {
            id: ID,
            device: "d1".into(),
            model: ModelRef::new("edge", Version::new(1, 0, 0)),
            privacy: PrivacyMode::Raw,
            payload: Payload::Tensor(Tensor::from_f32(vec![1, 2], &[1.0, -0.5])),
            edge: EdgeResult {
                top_k: vec![ClassScore {
                    class: 1,
                    score: 0.25,
                }],
                confidence: Confidence {
                    metric: ConfidenceMetric::MaxProb,
                    value: 0.25,
                },
                rule: PolicyRule::LowConfidence { threshold: 0.5 },
                inference_us: 120,
            },
            sent_at_ms: 1_700_000_000_000,
        }
        .into(),
        "01001000112233445566778899aabbccddeeff026431046564676501000000000002010200080000803f000000bf01010000803e000000803e000000003f7880d095ffbc31",
    );
}

#[test]
fn signed_manifest() {
    // ed25519 signatures are deterministic, so the whole signed message is stable.
    let key = SigningKey::from_bytes(&[42; 32]);
    check(
        Message::OtaManifest(Signed::sign(
            Manifest {
                model: ModelRef::new("edge", Version::new(1, 1, 0)),
                full: ArtifactInfo::describe(b"abc", 2),
                delta: None,
                sidecar: "{}".into(),
                target: TargetSelector::Group {
                    group: "lab".into(),
                },
                issued_at_ms: 1_700_000_000_000,
            },
            &key,
        )),
        "010504656467650101000320ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad020220fb8e20fc2e4c3f248c60c39bd652f3c1347298bb977b8b4d5903b85055620603202e7d2c03a9507ae265ecf5b5356885a53393a2029d241394997265a1a25aefc600027b7d01036c616280d095ffbc3108b600306cfa76723f40040bdb3f4c134e9282305bcaed24d0a3104d4996f7dc8ef90a52499a0d81dbf0a15118f9f56b3e0495f1a87cbf1c8362582f3ef34e3aa2a90a723c3f18b3110e",
    );
}
