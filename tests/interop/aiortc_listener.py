"""An independent listener, written from docs/protocol.md alone, on aiortc (Python's WebRTC).

    python aiortc_listener.py BASE_URL ROOM SECONDS

Gets a dev token (`POST /dev/token`), opens the WebSocket with it as a bearer token, joins ROOM,
asks to `listen`, answers the server's offer with aiortc, and takes the audio it hears for
SECONDS. Prints one JSON line ({"connection", "packets", "frames", "setup", "now_playing"}:
RTP packets received by aiortc's SRTP, frames its decoder made of them); exits 0 when more than
100 packets came. The certificate is the server's self-signed one: not verified.
"""

import asyncio
import json
import ssl
import sys
import time
import urllib.request

import websockets
from aiortc import RTCPeerConnection, RTCSessionDescription

BASE, ROOM, SECONDS = sys.argv[1], sys.argv[2], float(sys.argv[3])
TLS = ssl.create_default_context()
TLS.check_hostname = False
TLS.verify_mode = ssl.CERT_NONE


def dev_token(uid):
    request = urllib.request.Request(
        f"{BASE}/dev/token",
        data=json.dumps({"uid": uid, "role": "listener"}).encode(),
        headers={"content-type": "application/json"},
    )
    return json.load(urllib.request.urlopen(request, context=TLS))["idToken"]


async def main():
    token = dev_token("aiortc-listener")
    ws_url = BASE.replace("https://", "wss://") + "/ws"
    headers = {"Authorization": f"Bearer {token}"}
    async with websockets.connect(ws_url, ssl=TLS, additional_headers=headers) as ws:
        now_playing = []

        def notice(message):
            if message.get("type") == "now_playing" and message.get("utterance"):
                now_playing.append(message["utterance"])

        async def request(id_, body):
            await ws.send(json.dumps({"id": id_, **body}))
            while True:
                message = json.loads(await ws.recv())
                if message.get("id") == id_:
                    if not message["ok"]:
                        raise RuntimeError(f"{body['type']}: {message['error']}")
                    return message["data"]
                notice(message)

        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome", welcome
        await request(1, {"type": "join", "room": ROOM, "name": "aiortc"})
        offer = (await request(2, {"type": "listen"}))["offer"]

        pc = RTCPeerConnection()
        frames = 0

        @pc.on("track")
        def on_track(track):
            async def pull():
                nonlocal frames
                try:
                    while True:
                        await track.recv()
                        frames += 1
                except Exception:
                    pass  # the track ends when the connection closes

            asyncio.ensure_future(pull())

        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        setup = [l for l in pc.localDescription.sdp.splitlines() if l.startswith("a=setup:")]
        await request(3, {"type": "answer", "answer": pc.localDescription.sdp})

        deadline = time.monotonic() + SECONDS
        while time.monotonic() < deadline:
            try:
                notice(json.loads(await asyncio.wait_for(ws.recv(), 0.25)))
            except asyncio.TimeoutError:
                pass
        state = pc.connectionState
        stats = await pc.getStats()
        packets = sum(s.packetsReceived for s in stats.values() if s.type == "inbound-rtp")
        await pc.close()
        report = {"connection": state, "packets": packets, "frames": frames, "setup": setup, "now_playing": now_playing}
        print(json.dumps(report))
        return 0 if packets > 100 else 1


sys.exit(asyncio.run(main()))
