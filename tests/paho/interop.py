"""MQTT 5.0 and 3.1.1 interoperability checks with Eclipse Paho (paho-mqtt 2.x).

Usage: interop.py PORT. Exits non-zero with a message on the first failed check.
Every wait is bounded; nothing sleeps to synchronise.
"""
import queue
import sys
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

PORT = int(sys.argv[1])
DEADLINE = 10


def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)


class Client:
    def __init__(self, cid, v5=True, clean=True, props=None, will=None, topic_alias_max=0):
        self.q = queue.Queue()
        self.connack = queue.Queue()
        self.subacks = queue.Queue()
        proto = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
        kw = {} if v5 else {"clean_session": clean}
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=proto, **kw)
        self.c.on_message = lambda c, u, m: self.q.put(m)
        self.c.on_connect = lambda c, u, f, rc, p: self.connack.put((f, rc, p))
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put(rcs)
        if will:
            self.c.will_set(*will[:4], properties=will[4] if len(will) > 4 else None)
        if v5:
            cp = props or Properties(PacketTypes.CONNECT)
            if topic_alias_max:
                cp.TopicAliasMaximum = topic_alias_max
            self.c.connect("127.0.0.1", PORT, keepalive=30, clean_start=clean, properties=cp)
        else:
            self.c.connect("127.0.0.1", PORT, keepalive=30)
        self.c.loop_start()
        flags, rc, p = self.connack.get(timeout=DEADLINE)
        if rc != 0:
            fail(f"{cid}: CONNACK {rc}")
        self.flags = flags
        self.props = p

    def sub(self, topic, qos=1, **opts):
        if opts or isinstance(qos, SubscribeOptions):
            o = qos if isinstance(qos, SubscribeOptions) else SubscribeOptions(qos=qos, **opts)
            self.c.subscribe(topic, options=o)
        else:
            self.c.subscribe(topic, qos)
        return self.subacks.get(timeout=DEADLINE)

    def msg(self):
        try:
            return self.q.get(timeout=DEADLINE)
        except queue.Empty:
            fail("no message within the deadline")

    def pub(self, topic, payload, qos=1, retain=False, props=None):
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=props)
        info.wait_for_publish(timeout=DEADLINE)
        if not info.is_published():
            fail(f"publish to {topic} not acknowledged")

    def drop(self):
        """Close the socket without DISCONNECT (abnormal)."""
        self.c.loop_stop()
        self.c.socket().close()

    def bye(self):
        self.c.disconnect()
        self.c.loop_stop()


# QoS 0/1/2 both versions, with the QoS downgraded to the subscription's.
s = Client("paho-sub")
s.sub("paho/#", 2)
p4 = Client("paho-pub4", v5=False)
for q in (0, 1, 2):
    p4.pub(f"paho/q{q}", f"m{q}", qos=q)
    m = s.msg()
    if (m.topic, m.payload, m.qos) != (f"paho/q{q}", f"m{q}".encode(), q):
        fail(f"QoS {q}: got {m.topic} {m.payload} {m.qos}")

# Properties pass through; subscription identifiers come back.
s2 = Client("paho-props")
sp = Properties(PacketTypes.SUBSCRIBE)
sp.SubscriptionIdentifier = 7
s2.c.subscribe("props/+", options=SubscribeOptions(qos=1), properties=sp)
s2.subacks.get(timeout=DEADLINE)
pp = Properties(PacketTypes.PUBLISH)
pp.ResponseTopic = "props/reply"
pp.CorrelationData = b"abc"
pp.UserProperty = ("k", "v")
pp.ContentType = "text/plain"
p4.c.loop_stop()
p5 = Client("paho-pub5")
p5.pub("props/x", "hi", props=pp)
m = s2.msg()
got = m.properties
if got.ResponseTopic != "props/reply" or got.CorrelationData != b"abc" or ("k", "v") not in got.UserProperty or got.SubscriptionIdentifier != [7]:
    fail(f"properties: {got}")

# No Local and Retain As Published / Retain Handling.
nl = Client("paho-nl")
nl.sub("nl/t", SubscribeOptions(qos=1, noLocal=True))
nl.sub("nl/marker", 1)
nl.pub("nl/t", "own")
nl.pub("nl/marker", "m")
if nl.msg().topic != "nl/marker":
    fail("No Local delivered the client's own message")
p5.pub("ret/a", "kept", retain=True)
r = Client("paho-rap")
r.sub("ret/a", SubscribeOptions(qos=1, retainAsPublished=True, retainHandling=SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE))
m = r.msg()
if not m.retain or m.payload != b"kept":
    fail("retained message at subscribe")
p5.pub("ret/a", "live", retain=True)
m = r.msg()
if not m.retain:
    fail("Retain As Published lost the flag")

# Session present and queued messages after reconnect; will with delay cancelled by reconnect.
cp = Properties(PacketTypes.CONNECT)
cp.SessionExpiryInterval = 300
wp = Properties(PacketTypes.WILLMESSAGE)
wp.WillDelayInterval = 60
watch = Client("paho-watch")
watch.sub("will/#", 1)
d = Client("paho-durable", clean=True, props=cp, will=("will/durable", "gone", 1, False, wp))
d.sub("dur/#", 1)
d.drop()
p5.pub("dur/x", "while away")
d = Client("paho-durable", clean=False, props=cp)
if not d.flags.session_present:
    fail("session not present after reconnect")
if d.msg().payload != b"while away":
    fail("queued message not delivered after reconnect")
# The delayed will must not have fired: the next message on will/# is this marker.
p5.pub("will/marker", "m")
if watch.msg().topic != "will/marker":
    fail("delayed will fired although the session was resumed")

# Topic alias from the server when the client allows some. (paho-mqtt does not resolve inbound
# aliases itself, so check the wire: topic + alias first, then the alias alone.)
a = Client("paho-alias", topic_alias_max=4)
a.sub("alias/t", 1)
for i in range(3):
    p5.pub("alias/t", f"a{i}")
first = a.msg()
if first.topic != "alias/t" or getattr(first.properties, "TopicAlias", None) is None:
    fail(f"first aliased message: {first.topic} {first.properties}")
for i in (1, 2):
    m = a.msg()
    if m.topic != "" or m.properties.TopicAlias != first.properties.TopicAlias or m.payload != f"a{i}".encode():
        fail(f"aliased message: {m.topic!r} {m.properties} {m.payload}")

# $SYS is not matched by #.
w = Client("paho-wild")
w.sub("#", 0)
p5.pub("after/sys", "x", qos=0)
m = w.msg()
if m.topic.startswith("$"):
    fail("# matched a $SYS topic")

print("OK paho interop")
