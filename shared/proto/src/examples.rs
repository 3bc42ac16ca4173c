//! One realistic, valid example of every message kind.
//!
//! Used by `cloud-escalator codec example`, and by the test that keeps `docs/protocol.md` honest:
//! every JSON block there must decode, and every kind must have one.

use alloc::string::String;
use alloc::vec;

use crate::escalation::{
    ClassScore, Confidence, ConfidenceMetric, EdgeResult, EscalationRequest, Payload, PolicyRule,
    PrivacyMode, RejectReason, Rejection, Tensor, Timings, Verdict,
};
use crate::model::{ModelRef, Version};
use crate::ota::{ArtifactInfo, ArtifactKind, Chunk, ChunkRequest, Manifest, OtaState, OtaStatus};
use crate::ota::{DeltaFormat, DeltaInfo, TargetSelector};
use crate::policy::{Budget, ClassThreshold, Overflow, Policy};
use crate::signing::{Signed, SigningKey};
use crate::status::{Counters, DeviceStatus, Presence, Telemetry};
use crate::{Message, MessageKind};

/// The key that signs examples. Public knowledge: never trust it in a real keyring.
pub fn example_signing_key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

const ID: uuid::Uuid = uuid::Uuid::from_u128(0x6c1f_9a3e_5b2d_4e8f_9a10_2b3c_4d5e_6f70);

fn edge_model() -> ModelRef {
    ModelRef::new("digits-edge", Version::new(1, 2, 0))
}

/// A valid example of `kind`.
pub fn example(kind: MessageKind) -> Message {
    match kind {
        MessageKind::EscalationRequest => EscalationRequest {
            id: ID,
            device: "cam-01".into(),
            model: edge_model(),
            privacy: PrivacyMode::Raw,
            payload: Payload::Tensor(Tensor::from_f32(vec![1, 4], &[0.0, 0.25, 0.5, 1.0])),
            edge: EdgeResult {
                top_k: vec![
                    ClassScore {
                        class: 3,
                        score: 0.48,
                    },
                    ClassScore {
                        class: 8,
                        score: 0.41,
                    },
                ],
                confidence: Confidence {
                    metric: ConfidenceMetric::Margin,
                    value: 0.07,
                },
                rule: PolicyRule::LowConfidence { threshold: 0.2 },
                inference_us: 312,
            },
            sent_at_ms: 1_795_000_000_000,
        }
        .into(),
        MessageKind::Verdict => Verdict {
            id: ID,
            class: 8,
            label: Some(String::from("eight")),
            scores: vec![
                ClassScore {
                    class: 8,
                    score: 0.93,
                },
                ClassScore {
                    class: 3,
                    score: 0.05,
                },
            ],
            model: ModelRef::new("digits-cloud", Version::new(2, 0, 1)),
            timings: Timings {
                queue_us: 850,
                inference_us: 1_900,
                total_us: 2_950,
            },
            batch_size: 12,
        }
        .into(),
        MessageKind::Rejection => Rejection {
            id: Some(ID),
            reason: RejectReason::RateLimited,
            detail: "device cam-01 sent 140 escalations in 60 s; limit is 120".into(),
        }
        .into(),
        MessageKind::DeviceStatus => DeviceStatus {
            device: "cam-01".into(),
            presence: Presence::Online,
            agent_version: "0.1.0".into(),
            model: Some(edge_model()),
            policy_sequence: 4,
            counters: Counters {
                inputs: 12_000,
                escalations: 610,
                verdicts: 608,
                errors: 2,
            },
            uptime_s: 86_400,
            at_ms: 1_795_000_000_000,
        }
        .into(),
        MessageKind::Telemetry => Telemetry {
            device: "cam-01".into(),
            at_ms: 1_795_000_060_000,
            window_ms: 60_000,
            inputs: 600,
            escalations: 31,
            audits: 3,
            budget_overflows: 0,
            verdicts: 30,
            agreements: 21,
            errors: 0,
            inference_p50_us: 298,
            inference_p99_us: 610,
            queue_depth: 0,
        }
        .into(),
        MessageKind::OtaManifest => {
            let model = b"example model bytes";
            let delta = b"example delta";
            Message::OtaManifest(Signed::sign(
                Manifest {
                    model: ModelRef::new("digits-edge", Version::new(1, 3, 0)),
                    full: ArtifactInfo::describe(model, 8),
                    delta: Some(DeltaInfo {
                        base: Version::new(1, 2, 0),
                        format: DeltaFormat::ZstdPatch,
                        artifact: ArtifactInfo::describe(delta, 8),
                    }),
                    sidecar: r#"{"labels":["zero","one"]}"#.into(),
                    target: TargetSelector::Canary {
                        group: Some("lab".into()),
                        basis_points: 500,
                        salt: 9,
                    },
                    issued_at_ms: 1_795_000_000_000,
                },
                &example_signing_key(),
            ))
        }
        MessageKind::OtaChunkRequest => ChunkRequest {
            model: ModelRef::new("digits-edge", Version::new(1, 3, 0)),
            artifact: ArtifactKind::Delta,
            first: 0,
            count: 2,
        }
        .into(),
        MessageKind::OtaChunk => Chunk {
            model: ModelRef::new("digits-edge", Version::new(1, 3, 0)),
            artifact: ArtifactKind::Delta,
            index: 1,
            data: b"e delta".to_vec(),
        }
        .into(),
        MessageKind::OtaStatus => OtaStatus {
            device: "cam-01".into(),
            model: ModelRef::new("digits-edge", Version::new(1, 3, 0)),
            state: OtaState::Downloading {
                received_bytes: 8,
                total_bytes: 13,
            },
            at_ms: 1_795_000_000_500,
        }
        .into(),
        MessageKind::PolicyUpdate => Message::PolicyUpdate(Signed::sign(
            Policy {
                sequence: 5,
                metric: ConfidenceMetric::MaxProb,
                threshold: 0.6,
                class_thresholds: vec![ClassThreshold {
                    class: 8,
                    threshold: 0.75,
                }],
                budget: Budget {
                    per_minute: 60,
                    burst: 10,
                    overflow: Overflow::KeepEdge,
                },
                audit_rate: 0.01,
                privacy: PrivacyMode::Redacted,
                target: TargetSelector::All,
            },
            &example_signing_key(),
        )),
    }
}
