"""The floor for an MQTT request/response round trip: two paho-mqtt clients on one broker, a
requester and a responder, QoS 1 both ways, one request in flight, TCP_NODELAY on both sockets.

    python bench/mqtt_ping_pong.py HOST PORT N WARMUP PAYLOAD_BYTES

Prints one JSON object: p50/p95/p99/max in microseconds and the count over 40 ms.
"""

import json
import socket
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

host, port, n, warmup, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
tag = f"{time.time_ns()}"
request_topic, response_topic = f"pingpong/{tag}/request", f"pingpong/{tag}/response"


def client(name):
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{tag}", protocol=mqtt.MQTTv5)
    connected = threading.Event()
    c.on_connect = lambda *args: connected.set()
    c.connect(host, port)
    c.loop_start()
    if not connected.wait(10):
        sys.exit(f"{name}: no connection to {host}:{port}")
    c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


responder = client("responder")
responder.on_message = lambda c, userdata, message: c.publish(response_topic, message.payload, qos=1)
subscribed = threading.Event()
responder.on_subscribe = lambda *args: subscribed.set()
responder.subscribe(request_topic, qos=1)

requester = client("requester")
answered = threading.Event()
requester.on_message = lambda *args: answered.set()
requester.on_subscribe = lambda *args: subscribed.set()
subscribed.wait(10)
subscribed.clear()
requester.subscribe(response_topic, qos=1)
subscribed.wait(10)

payload = bytes(size)
samples = []
for i in range(warmup + n):
    answered.clear()
    started = time.perf_counter()
    requester.publish(request_topic, payload, qos=1)
    if not answered.wait(10):
        sys.exit(f"no answer to request {i}")
    if i >= warmup:
        samples.append((time.perf_counter() - started) * 1e6)

samples.sort()
at = lambda p: samples[round((len(samples) - 1) * p)]
print(json.dumps({"system": "paho-mqtt ping-pong", "payload_bytes": size, "latency": {
    "n": len(samples), "p50_us": at(0.5), "p95_us": at(0.95), "p99_us": at(0.99), "max_us": samples[-1],
    "over_40ms": sum(1 for s in samples if s > 40_000)}}))
for c in (requester, responder):
    c.loop_stop()
    c.disconnect()
