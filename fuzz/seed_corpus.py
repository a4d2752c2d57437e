#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets into fuzz/corpus/<target>/seed-*: realistic inputs the fuzzer starts
from (every example frame of docs/protocol.md, the bus events the router writes, WebSocket frames as a browser sends
them, typical connect queries). The committed corpus already holds them, merged with what fuzzing found and
minimized (`cargo fuzz cmin`); run this again only to re-seed, then fuzz and minimize (fuzz/README.md)."""

import json
import os
import re
import struct
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
TOKEN = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6MTc2NDI5NjAwMH0."
    "c2lnbmF0dXJlLW5vdC1jaGVja2VkLWJ5LXRoZS1wYXJzZXI"
)


def write(target, name, data):
    directory = os.path.join(ROOT, "corpus", target)
    os.makedirs(directory, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(directory, "seed-" + name), "wb") as file:
        file.write(data)


def compact(value):
    return json.dumps(value, separators=(",", ":"))


# --- protocol_decode: client frames of every type, and every example of docs/protocol.md ---------------------

CLIENT_FRAMES = {
    "send": {"type": "send", "req_id": "r1", "channel": "g:general", "client_msg_id": "c-1", "text": "hi"},
    "send-first": {"type": "send", "channel": "dm:alice:bob", "client_msg_id": "c-2",
                   "text": "h\u00e9\u2603 \ud83d\ude00", "first_attempt": True},
    "history": {"type": "history", "req_id": "r2", "channel": "g:general", "before": 120, "limit": 50},
    "history-after": {"type": "history", "channel": "g:general", "after": 3},
    "ack": {"type": "ack", "channel": "g:general", "seq": 7},
    "sync": {"type": "sync", "req_id": "r7", "channels": {"g:general": 7, "dm:alice:bob": 0}},
    "read": {"type": "read", "req_id": "r3", "channel": "g:general", "seq": 5},
    "subscribe-presence": {"type": "subscribe_presence", "req_id": "r8", "users": ["bob", "carol"]},
    "unsubscribe-presence": {"type": "subscribe_presence", "users": ["bob"], "watch": False},
    "set-presence": {"type": "set_presence", "status": "away"},
    "channel-presence": {"type": "channel_presence", "req_id": "r9", "channel": "g:general"},
    "ping": {"type": "ping", "req_id": "r5"},
    "create-channel": {"type": "create_channel", "req_id": "r3", "name": "general", "members": ["bob", "carol"],
                       "visibility": "private", "posting": "admins"},
    "join": {"type": "join", "channel": "g:general"},
    "leave": {"type": "leave", "req_id": "r4", "channel": "g:general"},
    "list-channels": {"type": "list_channels", "req_id": "r4"},
    "open-dm": {"type": "open_dm", "user": "bob"},
    "invite": {"type": "invite", "channel": "g:general", "user": "dave"},
    "remove-member": {"type": "remove_member", "channel": "g:general", "user": "dave"},
    "ban": {"type": "ban", "req_id": "r10", "channel": "g:general", "user": "mallory"},
    "unban": {"type": "unban", "channel": "g:general", "user": "mallory"},
    "set-role": {"type": "set_role", "channel": "g:general", "user": "bob", "role": "admin"},
    "update-channel": {"type": "update_channel", "channel": "g:general", "visibility": "public", "posting": "everyone"},
    "block": {"type": "block", "user": "mallory", "blocked": False},
}

ODD_FRAMES = {
    "not-json": b"not json",
    "array": b"[1,2]",
    "unknown-type": b'{"type":"teleport","req_id":"r6"}',
    "missing-field": b'{"type":"send","req_id":"r1","channel":"g:a"}',
    "no-type": b'{"channel":"g:a"}',
    "type-not-string": b'{"type":7}',
    "wrong-field-type": b'{"type":"history","req_id":"r9","limit":"x"}',
    "extra-fields": b'{"type":"ack","channel":"g:a","seq":1,"extra":{"nested":[1,2,{"a":null}]}}',
    "escapes": b'{"type":"send","channel":"g:a","client_msg_id":"c\\u0031","text":"\\ud83d\\ude00\\n\\"x\\""}',
    "big-numbers": b'{"type":"ack","channel":"g:a","seq":18446744073709551615}',
    "whitespace": b' \n{ "type" : "ping" }\t',
}


def channel_info(kind="group"):
    return {"id": "g:general", "kind": kind, "name": "general", "members": 12, "last_seq": 7, "joined": True,
            "read_seq": 5, "unread": 2}


def protocol_examples():
    """The JSON examples of docs/protocol.md, with their `<...>` placeholders filled in."""
    with open(os.path.join(ROOT, "..", "docs", "protocol.md"), encoding="utf-8") as file:
        text = file.read()
    message = {"channel": "g:general", "seq": 7, "id": "7265", "sender": "alice", "text": "hi",
               "ts": 1764296000000, "client_msg_id": "c-1"}
    examples = []
    # Frames may span lines inside ```json blocks: join each block and split it into objects.
    for block in re.findall(r"```json\n(.*?)```", text, flags=re.DOTALL):
        block = block.replace("<channel info>...", compact(channel_info())).replace(
            "<channel info>", compact(channel_info())).replace(
            '<message without "type">...', compact(message)).replace('"users":[...]', '"users":[]')
        decoder = json.JSONDecoder()
        position = 0
        while position < len(block):
            while position < len(block) and block[position].isspace():
                position += 1
            if position >= len(block):
                break
            value, position = decoder.raw_decode(block, position)
            examples.append(value)
    for inline in re.findall(r"`(\{\"[^`]*\})`", text):
        try:
            examples.append(json.loads(inline))
        except ValueError:
            pass
    return examples


def seed_protocol_decode():
    for name, frame in CLIENT_FRAMES.items():
        write("protocol_decode", "client-" + name, compact(frame))
    for name, data in ODD_FRAMES.items():
        write("protocol_decode", name, data)
    for index, example in enumerate(protocol_examples()):
        kind = example.get("type", "object") if isinstance(example, dict) else "value"
        write("protocol_decode", f"doc-{index:02}-{kind}", compact(example))


# --- bus_event_decode: the events the router publishes (bus/src/pubsub.rs) -----------------------------------

def seed_bus_event_decode():
    message = {"type": "message", "channel": "g:general", "seq": 7, "id": "7265000000000000001", "sender": "alice",
               "text": "hi", "ts": 1764296000000, "client_msg_id": "c-1"}
    frame = compact(message).encode()
    write("bus_event_decode", "message", b"T" + struct.pack(">QQ", 7, 1764296000000) + frame)
    write("bus_event_decode", "message-untimed", b"M" + struct.pack(">Q", 7) + frame)
    write("bus_event_decode", "feed", b"F" + struct.pack(">QQ", 41, 57))
    write("bus_event_decode", "feed-truncated", b"F123")
    write("bus_event_decode", "message-without-time", b"T12345678")
    controls = [
        {"kind": "member", "channel": "g:general", "user": "bob", "joined": True},
        {"kind": "delivered", "channel": "dm:alice:bob", "user": "bob", "seq": 7},
        {"kind": "read", "channel": "g:general", "user": "bob", "seq": 7},
        {"kind": "membership", "user": "bob", "channel": "g:general", "joined": False},
        {"kind": "invited", "user": "dave", "channel": "g:general", "by": "alice"},
        {"kind": "disconnect", "user": "mallory"},
        {"kind": "revoked", "user": "mallory", "before": 1764296000},
    ]
    for control in controls:
        write("bus_event_decode", "control-" + control["kind"], b"C" + compact(control).encode())
    write("bus_event_decode", "control-unknown", b'C{"kind":"teleport"}')
    write("bus_event_decode", "unknown-tag", b"?")


# --- websocket_frames: a client's frames after the handshake (first byte: the transport's shape) -------------

MASK = b"\x37\xfa\x21\x3d"


def frame(opcode, payload=b"", fin=True, mask=MASK, rsv=0):
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    masked = 0x80 if mask else 0
    length = len(payload)
    if length < 126:
        head += bytes([masked | length])
    elif length < 65536:
        head += bytes([masked | 126]) + struct.pack(">H", length)
    else:
        head += bytes([masked | 127]) + struct.pack(">Q", length)
    if mask:
        payload = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
        head += mask
    return head + payload


def close(code=None, reason=b""):
    return frame(0x8, b"" if code is None else struct.pack(">H", code) + reason)


def seed_websocket_frames():
    text = lambda data: frame(0x1, data)  # noqa: E731
    send = compact(CLIENT_FRAMES["send"]).encode()
    ack = compact(CLIENT_FRAMES["ack"]).encode()
    ping = compact(CLIENT_FRAMES["ping"]).encode()
    session = text(send) + text(ack) + frame(0x9, b"keepalive") + text(ping) + close(1000, b"bye")
    streams = {
        "session": session,
        "binary": frame(0x2, send) + close(1000),
        "fragmented": frame(0x1, send[:10], fin=False) + frame(0x9, b"p") + frame(0x0, send[10:20], fin=False)
        + frame(0x0, send[20:]) + close(1001, b"going away"),
        "fragmented-binary": frame(0x2, b"\x00\x01", fin=False) + frame(0x0, b"\x02"),
        "pong": frame(0xA, b"unsolicited") + text(ack),
        "close-empty": close(),
        "close-bad-code": close(999, b"x"),
        "close-invalid-utf8": close(1000, b"\xff\xfe"),
        "text-invalid-utf8": text(b'{"type":"ping","req_id":"\xc3\x28"}'),
        "text-split-utf8": frame(0x1, "\u2603".encode()[:1], fin=False) + frame(0x0, "\u2603".encode()[1:]),
        "unmasked": frame(0x1, ping, mask=None),
        "rsv-bits": frame(0x1, ping, rsv=4),
        "reserved-opcode": frame(0x3, b"x"),
        "continuation-first": frame(0x0, b"x"),
        "control-fragmented": frame(0x9, b"p", fin=False),
        "control-too-long": frame(0x9, b"p" * 126),
        "length-16": text(b" " * 200 + ping),
        "too-big-declared": frame(0x2, b"")[:1] + bytes([0x80 | 127]) + struct.pack(">Q", 1 << 40) + MASK,
        "too-big-16": frame(0x2, b"")[:1] + bytes([0x80 | 126]) + struct.pack(">H", 65535) + MASK + b"\x00" * 64,
        "too-big-64": frame(0x2, b"")[:1] + bytes([0x80 | 127]) + struct.pack(">Q", 65537) + MASK,
        "non-minimal-length": frame(0x1, b"")[:1] + bytes([0x80 | 127]) + struct.pack(">Q", 2) + MASK
        + bytes(a ^ b for a, b in zip(b"{}", MASK)),
        "truncated": session[:37],
        # Two fragments of 40,000 bytes: each frame is under max_frame_bytes, the message is over it.
        "message-over-limit": frame(0x2, b"a" * 40000, fin=False) + frame(0x0, b"b" * 40000),
        # One frame of exactly max_frame_bytes, then a ping.
        "frame-at-limit": frame(0x2, b"c" * 65536) + frame(0x9),
    }
    shapes = {"whole": 0x00, "bytewise": 0x01, "chunks-of-7": 0x07, "blocking": 0x80, "blocking-chunks-of-3": 0x83}
    for name, stream in streams.items():
        big = len(stream) > 4096
        for shape_name, shape in shapes.items():
            # The large inputs only in two shapes, to keep the corpus small.
            if big and shape_name not in ("whole", "blocking-chunks-of-3"):
                continue
            write("websocket_frames", f"{name}-{shape_name}", bytes([shape]) + stream)


# --- connect_query: the raw query of GET /v1/ws, GET /v1/sse, POST /v1/poll/connect ---------------------------

def seed_connect_query():
    queries = {
        "version-and-token": f"v=1&token={TOKEN}",
        "token-first": f"token={TOKEN}&v=1",
        "token-only": f"token={TOKEN}",
        "version-only": "v=1",
        "empty": "",
        "unsupported-version": "v=2",
        "version-not-a-number": "v=abc",
        "version-empty": "v=&token=x",
        "version-negative": "v=-1",
        "version-overflow": "v=99999999999999999999",
        "version-leading-zero": "v=01",
        "version-repeated": "v=1&v=1",
        "token-repeated": "token=a&token=b",
        "token-empty": "v=1&token=",
        "percent-encoded": "v=1&token=a%2Eb%2Ec%20d",
        "plus": "token=a+b",
        "bad-percent": "token=%zz%4",
        "percent-invalid-utf8": "token=%ff%fe",
        "unknown-key": "v=1&foo=bar&token=t",
        "bare-key": "v&token",
        "empty-pairs": "&&v=1&&",
        "semicolon": "v=1;token=x",
        "encoded-key": "%76=1&%74oken=x",
        "equals-in-value": "token=a=b==",
        "fragment": "v=1&token=x#frag",
    }
    for name, query in queries.items():
        write("connect_query", name, query)


def main():
    targets = {
        "protocol_decode": seed_protocol_decode,
        "bus_event_decode": seed_bus_event_decode,
        "websocket_frames": seed_websocket_frames,
        "connect_query": seed_connect_query,
    }
    for name in sys.argv[1:] or targets:
        targets[name]()


if __name__ == "__main__":
    main()
