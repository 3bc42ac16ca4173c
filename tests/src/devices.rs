//! Lightweight simulated devices: one MQTT connection each, a retained status with a last will,
//! telemetry on demand. Enough to drive the fleet registry without running agents.

use std::time::Duration;

use cascade_proto::model::{ModelRef, Version};
use cascade_proto::ota::{OtaState, OtaStatus};
use cascade_proto::status::{Counters, DeviceStatus, Presence, Telemetry};
use cascade_proto::topic::{Channel, DeviceTopic};
use cascade_proto::{Message, encode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::LastWill;
use rumqttc::v5::{AsyncClient, MqttOptions};
use tokio::task::JoinHandle;

/// One simulated device.
#[derive(Debug)]
pub struct SimDevice {
    /// Its id.
    pub id: String,
    fleet: String,
    client: AsyncClient,
    eventloop: JoinHandle<()>,
    /// Connections the broker accepted (CONNACKs), including reconnections.
    connacks: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn status(id: &str, presence: Presence, inputs: u64) -> Vec<u8> {
    encode(&Message::DeviceStatus(DeviceStatus {
        device: id.into(),
        presence,
        agent_version: "0.1.0".into(),
        model: Some(ModelRef::new("digits-edge", Version::new(1, 0, 0))),
        policy_sequence: 0,
        counters: Counters {
            inputs,
            escalations: inputs / 10,
            verdicts: inputs / 10,
            errors: 0,
        },
        uptime_s: 1,
        at_ms: now_ms(),
    }))
}

impl SimDevice {
    /// Connects to the broker at `port` as `id` and publishes its online status.
    pub async fn connect(fleet: &str, id: &str, port: u16) -> SimDevice {
        let topic = DeviceTopic::new(fleet, id, Channel::Status)
            .expect("valid ids")
            .to_string();
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_outgoing_inflight_upper_limit(16);
        options.set_last_will(LastWill::new(
            topic.clone(),
            status(id, Presence::Offline, 0),
            QoS::AtLeastOnce,
            true,
            None,
        ));
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        let connacks = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let seen = connacks.clone();
        let eventloop = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::v5::Event::Incoming(
                        rumqttc::v5::mqttbytes::v5::Packet::ConnAck(_),
                    )) => {
                        seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        client
            .publish(
                topic,
                QoS::AtLeastOnce,
                true,
                status(id, Presence::Online, 0),
            )
            .await
            .expect("queue the status");
        SimDevice {
            id: id.into(),
            fleet: fleet.into(),
            client,
            eventloop,
            connacks,
        }
    }

    /// How many times the broker accepted this device's connection.
    pub fn connections(&self) -> u32 {
        self.connacks.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn publish(&self, channel: Channel, retain: bool, payload: Vec<u8>) {
        let topic = DeviceTopic::new(&self.fleet, &self.id, channel)
            .expect("valid ids")
            .to_string();
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .expect("queue a publish");
    }

    /// Reports its status with `inputs` classified so far.
    pub async fn status(&self, inputs: u64) {
        self.publish(
            Channel::Status,
            true,
            status(&self.id, Presence::Online, inputs),
        )
        .await;
    }

    /// Reports one telemetry window.
    pub async fn telemetry(&self, inputs: u32, escalations: u32, agreements: u32) {
        let t = Telemetry {
            device: self.id.clone(),
            at_ms: now_ms(),
            window_ms: 10_000,
            inputs,
            escalations,
            audits: 0,
            budget_overflows: 0,
            verdicts: escalations,
            agreements,
            errors: 0,
            inference_p50_us: 40,
            inference_p99_us: 95,
            queue_depth: 1,
        };
        self.publish(Channel::Telemetry, false, encode(&Message::Telemetry(t)))
            .await;
    }

    /// Reports an OTA state for `model`.
    pub async fn ota(&self, model: ModelRef, state: OtaState) {
        let s = OtaStatus {
            device: self.id.clone(),
            model,
            state,
            at_ms: now_ms(),
        };
        self.publish(Channel::OtaStatus, false, encode(&Message::OtaStatus(s)))
            .await;
    }

    /// Drops the connection without a DISCONNECT, as a device losing power does: the broker
    /// publishes its last will.
    pub fn vanish(self) {
        self.eventloop.abort();
    }
}

impl Drop for SimDevice {
    fn drop(&mut self) {
        self.eventloop.abort();
    }
}
