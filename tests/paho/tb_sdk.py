"""ThingsBoard's own device SDK (tb-mqtt-client) against a node: it connects (MQTT 5.0) and
asks getSessionLimits, sends telemetry, and makes a client-side RPC that a platform service
answers through the REST API (the test does that part). Prints OK at the end; exits non-zero
with the reason otherwise. Usage: tb_sdk.py PORT TOKEN"""
import json
import sys
import time

from harness import fail, wait
from tb_device_mqtt import TBDeviceMqttClient


port, token = int(sys.argv[1]), sys.argv[2]
server_rpcs = []
c = TBDeviceMqttClient("127.0.0.1", port=port, username=token)
c.set_server_side_rpc_request_handler(lambda rid, body: server_rpcs.append(body))
c.connect()
wait(c.is_connected, "the connection")
# The SDK asks getSessionLimits itself at connect and holds back until it is answered.
wait(lambda: c.rate_limits_received, "the session limits (getSessionLimits)")
if c.max_payload_size != int(65536 * 80 / 100):
    fail("max payload size from the limits: %r" % c.max_payload_size)
rc = c.send_telemetry({"temperature": 21.5}).get()
if rc != 0:
    fail("telemetry publish result %r (stored telemetry is a success)" % rc)
answers = []
c.send_rpc_call("getCurrentTime", {"tz": "UTC"}, lambda rid, body, exc: answers.append(body))
print("RPC_SENT", flush=True)
wait(lambda: answers, "the answer to getCurrentTime", 60)
if answers[0] != {"time": 1700000000000, "tz": "UTC"}:
    fail("answer %r" % answers[0])
# Its own call never came back to it as a server-side RPC.
time.sleep(0.3)
if server_rpcs:
    fail("the device received a server-side RPC: %r" % server_rpcs)
c.disconnect()
print("OK tb sdk", json.dumps(answers[0]), flush=True)
