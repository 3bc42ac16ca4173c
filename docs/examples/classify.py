"""Send inputs to a Cascade edge agent over MQTT and print its answers.

Against the demo (run from the repository root):

    cargo run --release -p cloud-escalator -- demo --port 18830 --stay     # one terminal
    pip install paho-mqtt numpy
    python docs/examples/classify.py --port 18830 --count 20                # another

The agent answers every input at once with its edge model ("stage": "edge"); for an input it is
unsure about, a second answer follows from the cloud ("stage": "cloud").
"""

import argparse
import json
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=18830)
parser.add_argument("--device", default="demo-00", help="which demo agent to talk to")
parser.add_argument("--count", type=int, default=10, help="how many test digits to send")
parser.add_argument("--inputs", default="models/data/digits-test/inputs.npy")
parser.add_argument("--labels", default="models/data/digits-test/labels.npy")
args = parser.parse_args()

inputs, labels = np.load(args.inputs), np.load(args.labels)
input_topic, result_topic = f"demo/{args.device}/input", f"demo/{args.device}/result"
pending = {}  # input id -> answers still expected (1, or 2 once escalated)
done = threading.Event()
lock = threading.Lock()


def on_message(client, userdata, message):
    result = json.loads(message.payload)
    with lock:
        if result["input"] not in pending:
            return
        n = int(result["input"].split("-")[1])
        extra = f" (escalated: {result['rule']})" if result.get("escalation") and result["stage"] == "edge" else ""
        print(f"digit {n:>3}  true {labels[n]}  {result['stage']:<5} says {result.get('class')}"
              f"  p={result.get('probability', 0):.2f}{extra}")
        if result["stage"] == "edge" and result.get("escalation"):
            pending[result["input"]] += 1  # a cloud verdict will follow
        pending[result["input"]] -= 1
        if pending[result["input"]] == 0:
            del pending[result["input"]]
        if not pending:
            done.set()


client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"classify-{time.time_ns()}", protocol=mqtt.MQTTv5)
client.on_message = on_message
client.connect(args.host, args.port)
client.subscribe(result_topic, qos=1)
client.loop_start()
time.sleep(0.5)  # let the subscription settle before the first answer can come

for n in range(args.count):
    with lock:
        pending[f"py-{n}"] = 1
    payload = {"id": f"py-{n}", "input": inputs[n].tolist(), "fields": {"user": "python-example"}}
    client.publish(input_topic, json.dumps(payload), qos=1)

if not done.wait(30):
    print(f"no answer in 30 s for: {sorted(pending)}")
client.loop_stop()
client.disconnect()
