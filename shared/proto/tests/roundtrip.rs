//! Every message survives both encodings unchanged, and no input makes a decoder panic.

use cascade_proto::escalation::{
    ClassScore, Confidence, ConfidenceMetric, DType, EdgeResult, EscalationRequest, Field, Payload,
    PolicyRule, PrivacyMode, Quantization, RedactedRecord, Redaction, RejectReason, Rejection,
    Tensor, Timings, Verdict,
};
use cascade_proto::model::{ModelRef, Version};
use cascade_proto::ota::{
    ArtifactInfo, ArtifactKind, Chunk, ChunkRequest, DeltaFormat, DeltaInfo, Manifest, OtaState,
    OtaStatus, TargetSelector,
};
use cascade_proto::policy::{Budget, ClassThreshold, Overflow, Policy};
use cascade_proto::signing::{Signed, SigningKey};
use cascade_proto::status::{Counters, DeviceStatus, Presence, Telemetry};
use cascade_proto::{Limits, Message, decode, decode_json, encode, encode_json};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

fn ident() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,64}"
}

fn text() -> impl Strategy<Value = String> {
    ".{0,40}"
}

fn finite() -> impl Strategy<Value = f32> {
    prop::num::f32::NORMAL | prop::num::f32::SUBNORMAL | prop::num::f32::ZERO
}

fn unit() -> impl Strategy<Value = f32> {
    0.0f32..=1.0
}

fn version() -> impl Strategy<Value = Version> {
    any::<(u16, u16, u16)>().prop_map(|(a, b, c)| Version::new(a, b, c))
}

fn model() -> impl Strategy<Value = ModelRef> {
    (ident(), version()).prop_map(|(name, version)| ModelRef { name, version })
}

fn id() -> impl Strategy<Value = uuid::Uuid> {
    any::<u128>().prop_map(uuid::Uuid::from_u128)
}

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![
        Just(DType::F32),
        Just(DType::F16),
        Just(DType::I8),
        Just(DType::U8),
        Just(DType::I16),
        Just(DType::I32),
        Just(DType::I64),
    ]
}

fn tensor() -> impl Strategy<Value = Tensor> {
    (dtype(), vec(0u32..5, 0..4)).prop_flat_map(|(dtype, shape)| {
        let len = shape.iter().product::<u32>() as usize * dtype.size();
        let quantized = !matches!(dtype, DType::F32 | DType::F16);
        let quant = (1e-6f32..10.0, any::<i32>())
            .prop_map(|(scale, zero_point)| Quantization { scale, zero_point });
        (
            vec(any::<u8>(), len),
            if quantized {
                option::of(quant).boxed()
            } else {
                Just(None).boxed()
            },
        )
            .prop_map(move |(data, quantization)| Tensor {
                dtype,
                shape: shape.clone(),
                quantization,
                data,
            })
    })
}

fn scores() -> impl Strategy<Value = Vec<ClassScore>> {
    vec(
        (any::<u32>(), finite()).prop_map(|(class, score)| ClassScore { class, score }),
        0..6,
    )
}

fn metric() -> impl Strategy<Value = ConfidenceMetric> {
    prop_oneof![
        Just(ConfidenceMetric::MaxProb),
        Just(ConfidenceMetric::Margin),
        Just(ConfidenceMetric::Entropy),
    ]
}

fn privacy() -> impl Strategy<Value = PrivacyMode> {
    prop_oneof![
        Just(PrivacyMode::Raw),
        Just(PrivacyMode::Redacted),
        Just(PrivacyMode::Embedding),
    ]
}

fn payload() -> impl Strategy<Value = Payload> {
    let redaction = prop_oneof![
        any::<u32>().prop_map(|count| Redaction::FieldsDropped { count }),
        Just(Redaction::IdentifiersPseudonymized),
        any::<u16>().prop_map(|factor| Redaction::Downscaled { factor }),
        any::<u8>().prop_map(|bits| Redaction::Quantized { bits }),
    ];
    let record = (
        option::of(tensor()),
        vec(
            (text(), text()).prop_map(|(name, value)| Field { name, value }),
            0..4,
        ),
        vec(redaction, 0..4),
    )
        .prop_map(|(tensor, fields, redactions)| RedactedRecord {
            tensor,
            fields,
            redactions,
        });
    prop_oneof![
        tensor().prop_map(Payload::Tensor),
        tensor().prop_map(Payload::Embedding),
        record.prop_map(Payload::Redacted),
    ]
}

fn rule() -> impl Strategy<Value = PolicyRule> {
    prop_oneof![
        finite().prop_map(|threshold| PolicyRule::LowConfidence { threshold }),
        (any::<u32>(), finite())
            .prop_map(|(class, threshold)| PolicyRule::ClassThreshold { class, threshold }),
        Just(PolicyRule::Audit),
        Just(PolicyRule::Manual),
    ]
}

fn escalation() -> impl Strategy<Value = EscalationRequest> {
    (
        id(),
        ident(),
        model(),
        payload(),
        scores(),
        (metric(), unit()),
        rule(),
        any::<u32>(),
        any::<u64>(),
    )
        .prop_map(
            |(id, device, model, payload, top_k, (metric, value), rule, inference_us, sent)| {
                EscalationRequest {
                    id,
                    device,
                    model,
                    privacy: payload.privacy_mode(),
                    payload,
                    edge: EdgeResult {
                        top_k,
                        confidence: Confidence { metric, value },
                        rule,
                        inference_us,
                    },
                    sent_at_ms: sent,
                }
            },
        )
}

fn verdict() -> impl Strategy<Value = Verdict> {
    (
        id(),
        any::<u32>(),
        option::of(text()),
        scores(),
        model(),
        any::<(u32, u32, u32)>(),
        any::<u16>(),
    )
        .prop_map(
            |(id, class, label, scores, model, (q, i, t), batch_size)| Verdict {
                id,
                class,
                label,
                scores,
                model,
                timings: Timings {
                    queue_us: q,
                    inference_us: i,
                    total_us: t,
                },
                batch_size,
            },
        )
}

fn rejection() -> impl Strategy<Value = Rejection> {
    let reason = prop_oneof![
        Just(RejectReason::Malformed),
        Just(RejectReason::UnknownModel),
        Just(RejectReason::TooLarge),
        Just(RejectReason::RateLimited),
        Just(RejectReason::Expired),
        Just(RejectReason::Overloaded),
        Just(RejectReason::PrivacyModeNotAccepted),
    ];
    (option::of(id()), reason, text()).prop_map(|(id, reason, detail)| Rejection {
        id,
        reason,
        detail,
    })
}

fn status() -> impl Strategy<Value = DeviceStatus> {
    (
        ident(),
        any::<bool>(),
        text(),
        option::of(model()),
        any::<u64>(),
        any::<(u64, u64, u64, u64)>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(device, online, agent_version, model, seq, (a, b, c, d), uptime_s, at_ms)| {
                DeviceStatus {
                    device,
                    presence: if online {
                        Presence::Online
                    } else {
                        Presence::Offline
                    },
                    agent_version,
                    model,
                    policy_sequence: seq,
                    counters: Counters {
                        inputs: a,
                        escalations: b,
                        verdicts: c,
                        errors: d,
                    },
                    uptime_s,
                    at_ms,
                }
            },
        )
}

fn telemetry() -> impl Strategy<Value = Telemetry> {
    (ident(), any::<u64>(), any::<[u32; 11]>()).prop_map(|(device, at_ms, n)| {
        let escalations = n[1].max(n[2]);
        let verdicts = n[4].max(n[5]);
        Telemetry {
            device,
            at_ms,
            window_ms: n[0],
            inputs: n[0],
            escalations,
            audits: n[2],
            budget_overflows: n[3],
            verdicts,
            agreements: n[5],
            errors: n[6],
            inference_p50_us: n[7],
            inference_p99_us: n[8],
            queue_depth: n[9],
        }
    })
}

fn target() -> impl Strategy<Value = TargetSelector> {
    prop_oneof![
        Just(TargetSelector::All),
        ident().prop_map(|group| TargetSelector::Group { group }),
        vec(ident(), 0..4).prop_map(|devices| TargetSelector::Devices { devices }),
        (option::of(ident()), 0u16..=10_000, any::<u32>()).prop_map(
            |(group, basis_points, salt)| TargetSelector::Canary {
                group,
                basis_points,
                salt,
            }
        ),
    ]
}

fn artifact() -> impl Strategy<Value = ArtifactInfo> {
    (vec(any::<u8>(), 0..300), 1u32..100)
        .prop_map(|(bytes, chunk_size)| ArtifactInfo::describe(&bytes, chunk_size))
}

fn signing_key() -> impl Strategy<Value = SigningKey> {
    any::<[u8; 32]>().prop_map(|seed| SigningKey::from_bytes(&seed))
}

fn manifest() -> impl Strategy<Value = Signed<Manifest>> {
    (
        ident(),
        1u16..100,
        artifact(),
        option::of(artifact()),
        text(),
        target(),
        any::<u64>(),
        signing_key(),
    )
        .prop_map(|(name, major, full, delta, sidecar, target, at, key)| {
            let manifest = Manifest {
                model: ModelRef::new(name, Version::new(major, 0, 0)),
                full,
                delta: delta.map(|artifact| DeltaInfo {
                    base: Version::new(major - 1, 9, 9),
                    format: DeltaFormat::ZstdPatch,
                    artifact,
                }),
                sidecar,
                target,
                issued_at_ms: at,
            };
            Signed::sign(manifest, &key)
        })
}

fn artifact_kind() -> impl Strategy<Value = ArtifactKind> {
    prop_oneof![Just(ArtifactKind::Full), Just(ArtifactKind::Delta)]
}

fn chunk_request() -> impl Strategy<Value = ChunkRequest> {
    (model(), artifact_kind(), any::<u32>(), 1u16..=64).prop_map(
        |(model, artifact, first, count)| ChunkRequest {
            model,
            artifact,
            first,
            count,
        },
    )
}

fn chunk() -> impl Strategy<Value = Chunk> {
    (
        model(),
        artifact_kind(),
        any::<u32>(),
        vec(any::<u8>(), 0..200),
    )
        .prop_map(|(model, artifact, index, data)| Chunk {
            model,
            artifact,
            index,
            data,
        })
}

fn ota_status() -> impl Strategy<Value = OtaStatus> {
    let state = prop_oneof![
        Just(OtaState::Available),
        (any::<u64>(), any::<u64>()).prop_map(|(a, b)| OtaState::Downloading {
            received_bytes: a.min(b),
            total_bytes: a.max(b),
        }),
        Just(OtaState::Verified),
        Just(OtaState::Activated),
        text().prop_map(|reason| OtaState::RolledBack { reason }),
        text().prop_map(|reason| OtaState::Failed { reason }),
    ];
    (ident(), model(), state, any::<u64>()).prop_map(|(device, model, state, at_ms)| OtaStatus {
        device,
        model,
        state,
        at_ms,
    })
}

fn policy() -> impl Strategy<Value = Signed<Policy>> {
    let overflow = prop_oneof![
        Just(Overflow::KeepEdge),
        any::<u32>().prop_map(|max| Overflow::Queue { max }),
    ];
    (
        any::<u64>(),
        metric(),
        unit(),
        vec(
            (any::<u32>(), unit())
                .prop_map(|(class, threshold)| ClassThreshold { class, threshold }),
            0..4,
        ),
        (any::<u32>(), any::<u32>(), overflow),
        unit(),
        privacy(),
        target(),
        signing_key(),
    )
        .prop_map(
            |(
                sequence,
                metric,
                threshold,
                class_thresholds,
                (pm, burst, of),
                audit,
                privacy,
                target,
                key,
            )| {
                let policy = Policy {
                    sequence,
                    metric,
                    threshold,
                    class_thresholds,
                    budget: Budget {
                        per_minute: pm,
                        burst,
                        overflow: of,
                    },
                    audit_rate: audit,
                    privacy,
                    target,
                };
                Signed::sign(policy, &key)
            },
        )
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        escalation().prop_map(Message::from),
        verdict().prop_map(Message::from),
        rejection().prop_map(Message::from),
        status().prop_map(Message::from),
        telemetry().prop_map(Message::from),
        manifest().prop_map(Message::OtaManifest),
        chunk_request().prop_map(Message::from),
        chunk().prop_map(Message::from),
        ota_status().prop_map(Message::from),
        policy().prop_map(Message::PolicyUpdate),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn postcard_round_trip(msg in message()) {
        prop_assert_eq!(msg.validate(), Ok(()));
        let bytes = encode(&msg);
        prop_assert_eq!(decode(&bytes, &Limits::default()), Ok(msg));
    }

    #[test]
    fn json_round_trip(msg in message()) {
        let text = encode_json(&msg);
        prop_assert_eq!(decode_json(text.as_bytes(), &Limits::default()), Ok(msg));
    }

    #[test]
    fn both_encodings_agree(msg in message()) {
        let via_json = decode_json(encode_json(&msg).as_bytes(), &Limits::default()).unwrap();
        prop_assert_eq!(encode(&via_json), encode(&msg));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..512)) {
        let _ = decode(&bytes, &Limits::default());
        let _ = decode_json(&bytes, &Limits::default());
    }

    #[test]
    fn corrupted_messages_never_panic(msg in message(), flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut bytes = encode(&msg);
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        let _ = decode(&bytes, &Limits::default());
    }

    #[test]
    fn every_strict_prefix_is_rejected(msg in message()) {
        let bytes = encode(&msg);
        for len in 0..bytes.len() {
            prop_assert!(decode(&bytes[..len], &Limits::default()).is_err(), "prefix of {} bytes accepted", len);
        }
    }
}
