"""One push client under measurement, in its own process: sipis's ``ApnsClient`` or aioapns.

Run: ``python -m bench.push_client {sipis|aioapns} PORT CA KEY --count N --concurrency C
--seconds S``. Opens one HTTP/2 connection to the local APNs on 127.0.0.1:PORT, warms it up,
then keeps C pushes in flight until N pushes are answered or S seconds have passed, and prints
``{"pushes", "errors", "wall", "cpu"}`` for the measured part only (CPU of this whole process,
all threads, from ``os.times``). Both clients send the same VoIP call payload.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import time
import uuid
from pathlib import Path
from typing import Any

BUNDLE = "com.example.phone"
TEAM = "TEAM123456"
KEY_ID = "KEY1234567"
TOKEN = "ab" * 32


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _request_fields(n: int) -> dict[str, Any]:
    return {"instance": f"inst{n % 1000:04d}aaaaaaaaaaaaaaaa", "call": f"call{n}",
            "from_uri": "sip:bob@sip.test", "from_name": "Bob", "to_uri": "sip:alice@sip.test",
            "sip_call_id": f"{n}-bench@127.0.0.1", "sent_at": int(time.time())}


def _ssl_context(ca: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    context.set_alpn_protocols(["h2"])
    return context


def run_sipis(args: argparse.Namespace) -> dict[str, Any]:
    import trio

    from sipis.push.apns import ApnsSettings, open_apns_client
    from sipis.push.base import PushError, PushKind, PushRequest, PushTarget

    settings = ApnsSettings(team_id=TEAM, key_id=KEY_ID, key_file=Path(args.key),
                            production_url=f"https://127.0.0.1:{args.port}",
                            ca_file=Path(args.ca), ping_interval=0)
    target = PushTarget(provider="apns", token=TOKEN, app=BUNDLE, environment="production")

    async def main() -> dict[str, Any]:
        async with open_apns_client(settings) as client:
            counters = {"sent": 0, "done": 0, "errors": 0}

            async def one(n: int) -> None:
                try:
                    await client.send(PushRequest(kind=PushKind.CALL, target=target,
                                                  **_request_fields(n)))
                except PushError:
                    counters["errors"] += 1
                counters["done"] += 1

            async def worker(limit: int, deadline: float) -> None:
                while counters["sent"] < limit and time.monotonic() < deadline:
                    counters["sent"] += 1
                    await one(counters["sent"])

            async def phase(count: int, seconds: float) -> tuple[float, float]:
                counters.update(sent=0, done=0, errors=0)
                deadline = time.monotonic() + seconds
                t0, c0 = time.perf_counter(), _cpu()
                async with trio.open_nursery() as nursery:
                    for _ in range(args.concurrency):
                        nursery.start_soon(worker, count, deadline)
                return time.perf_counter() - t0, _cpu() - c0

            await phase(args.warmup, 10)
            if args.profile:
                from pyinstrument import Profiler
                profiler = Profiler(interval=0.0005, async_mode="disabled")
                profiler.start()
            wall, cpu = await phase(args.count, args.seconds)
            if args.profile:
                profiler.stop()
                Path(args.profile).write_text(profiler.output_text(unicode=False, color=False))
            return {"pushes": counters["done"] - counters["errors"],
                    "errors": counters["errors"], "wall": wall, "cpu": cpu}

    return trio.run(main)


def run_aioapns(args: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    from aioapns import APNs, NotificationRequest, PushType
    from aioapns.connection import APNsProductionClientProtocol

    # aioapns has no endpoint setting: point its production host at the local server.
    APNsProductionClientProtocol.APNS_SERVER = "127.0.0.1"
    APNsProductionClientProtocol.APNS_PORT = args.port

    async def main() -> dict[str, Any]:
        client = APNs(key=Path(args.key).read_text(), key_id=KEY_ID, team_id=TEAM,
                      topic=f"{BUNDLE}.voip", max_connections=1,
                      ssl_context=_ssl_context(args.ca))
        counters = {"sent": 0, "done": 0, "errors": 0}

        async def one(n: int) -> None:
            fields = _request_fields(n)
            payload = {"sipis": {k: str(v) for k, v in
                                 {"type": "call", **fields}.items()}}
            try:
                result = await client.send_notification(NotificationRequest(
                    device_token=TOKEN, message=payload, notification_id=str(uuid.uuid4()),
                    time_to_live=None, priority=10, push_type=PushType.VOIP))
                if not result.is_successful:
                    counters["errors"] += 1
            except Exception:
                counters["errors"] += 1
            counters["done"] += 1

        async def worker(limit: int, deadline: float) -> None:
            while counters["sent"] < limit and time.monotonic() < deadline:
                counters["sent"] += 1
                await one(counters["sent"])

        async def phase(count: int, seconds: float) -> tuple[float, float]:
            counters.update(sent=0, done=0, errors=0)
            deadline = time.monotonic() + seconds
            t0, c0 = time.perf_counter(), _cpu()
            await asyncio.gather(*(worker(count, deadline) for _ in range(args.concurrency)))
            return time.perf_counter() - t0, _cpu() - c0

        await phase(args.warmup, 10)
        wall, cpu = await phase(args.count, args.seconds)
        return {"pushes": counters["done"] - counters["errors"], "errors": counters["errors"],
                "wall": wall, "cpu": cpu}

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.push_client")
    parser.add_argument("client", choices=["sipis", "aioapns"])
    parser.add_argument("port", type=int)
    parser.add_argument("ca")
    parser.add_argument("key")
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--profile", default="", help="write a pyinstrument text profile here")
    args = parser.parse_args()
    result = run_sipis(args) if args.client == "sipis" else run_aioapns(args)
    print(json.dumps({"client": args.client, **result}), flush=True)


if __name__ == "__main__":
    main()
