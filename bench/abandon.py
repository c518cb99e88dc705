"""Clients that give up behind a long queue cost nothing upstream.

Queues a long line of patient requests at 4/s, then 40 impatient clients that disconnect
after 1 s; reports how many of the impatient ones reached the upstream (only those whose
turn came within their second may) and that the patient ones were all served.

    python bench/abandon.py --patient 2 --impatient 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile

import aiohttp

from bench.common import free_port, recording_upstream, start, stop, wait_ready


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patient", type=int, default=2)
    parser.add_argument("--impatient", type=int, default=40)
    parser.add_argument("--give-up-after", type=float, default=1.0)
    args = parser.parse_args()

    seen: list[str] = []

    runner, up_port = await recording_upstream(lambda r: seen.append(r.headers["X-Request-Id"]))
    proxy_port = free_port()
    with tempfile.TemporaryDirectory() as state:
        proxy = start(
            [
                "serve",
                "--port",
                str(proxy_port),
                "--api-key",
                "k",
                "--qps",
                "4",
                "--max-wait",
                "120",
                # Every request its own send: this measures the queue, not shared reads.
                "--no-coalesce",
                "--upstream-v2",
                f"http://127.0.0.1:{up_port}",
                "--upstream-v3",
                f"http://127.0.0.1:{up_port}",
                "--state-dir",
                state,
            ]
        )
        try:
            base = f"http://127.0.0.1:{proxy_port}"
            await wait_ready(base + "/healthz")
            gave_up = 0
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

                async def call(name: str, timeout: float | None) -> int:
                    nonlocal gave_up
                    try:
                        async with session.get(
                            f"{base}/v2/lists",
                            headers={"X-Request-Id": name},
                            timeout=aiohttp.ClientTimeout(total=timeout),
                        ) as resp:
                            await resp.read()
                            return resp.status
                    except TimeoutError:
                        gave_up += 1
                        return 0

                patient = [asyncio.create_task(call(f"p{i}", None)) for i in range(args.patient)]
                await asyncio.sleep(0.2)
                impatient = [
                    asyncio.create_task(call(f"i{i}", args.give_up_after))
                    for i in range(args.impatient)
                ]
                statuses = await asyncio.gather(*patient, *impatient)
        finally:
            stop(proxy)
            await runner.cleanup()
    reached = [name for name in seen if name.startswith("i")]
    result = {
        "patient": args.patient,
        "patient_served": sum(1 for s in statuses[: args.patient] if s == 200),
        "impatient": args.impatient,
        "impatient_gave_up": gave_up,
        "impatient_reached_upstream": len(reached),
        "impatient_answered_200": sum(1 for s in statuses[args.patient :] if s == 200),
        "upstream_total": len(seen),
    }
    for name, value in result.items():
        print(f"{name:>28}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
