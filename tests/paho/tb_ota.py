"""Firmware OTA with ThingsBoard's own device SDK (tb-mqtt-client): the SDK connects, asks for
its firmware (nothing announced yet), prints READY; the test then announces a package through
the REST API; the SDK downloads it in chunks over MQTT (`v2/fw/request/…/chunk/…`), checks its
SHA-256, reports DOWNLOADING … UPDATED and writes the image to a file named after its title
in the working directory. Prints OK when that file has the expected digest.
Usage: tb_ota.py PORT TOKEN CHUNK_SIZE SHA256"""
import hashlib
import sys

from harness import fail, wait
from tb_device_mqtt import TBDeviceMqttClient


port, token, chunk, digest = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
c = TBDeviceMqttClient("127.0.0.1", port=port, username=token, chunk_size=chunk)
c.connect()
wait(c.is_connected, "the connection")
wait(lambda: c.rate_limits_received, "the session limits (getSessionLimits)")
# Subscribes to v2/fw/response/+, reports its current firmware and asks for fw_* attributes.
c.get_firmware_update()
# One more attribute request on the same connection: answered after the subscription above.
answered = []
c.request_attributes(shared_keys=["fw_title"], callback=lambda result, exc: answered.append(result))
wait(lambda: answered, "the attribute answer")
if answered[0].get("shared"):
    fail("a package was announced before the test announced one: %r" % answered[0])
print("READY", flush=True)
wait(lambda: c.current_firmware_info.get("fw_state") == "UPDATED", "the update (fw_state UPDATED)", secs=120)
title = c.current_firmware_info["current_fw_title"]
with open(title, "rb") as f:
    got = hashlib.sha256(f.read()).hexdigest()
if got != digest:
    fail("the written image has SHA-256 %s, not %s" % (got, digest))
print("VERSION", c.current_firmware_info["current_fw_version"], flush=True)
# The UPDATED report is sent; give the publish its acknowledgement before leaving.
c.send_telemetry({"ota_done": 1}).get()
c.disconnect()
print("OK tb ota", flush=True)
