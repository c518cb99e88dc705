"""aiohttp through ctct-proxy: 429 retried after Retry-After.

aiohttp retries nothing on a status; its default timeout (5 minutes in total) is above the
proxy's --max-wait, so a queued request is not lost; a tighter one should stay above
--max-wait. It follows redirects (the proxy rewrites a Location that points at the API back to
itself) and ignores HTTP(S)_PROXY unless `trust_env=True`.

Usage: python aiohttp_retry.py BASE_URL [COUNT]   (prints one JSON line per call)
"""

import asyncio
import json
import sys

import aiohttp

LONGEST_WAIT = 60  # seconds; a longer Retry-After is the daily quota: give the 429 back
ATTEMPTS = 10


async def call(session: aiohttp.ClientSession, base: str, i: int) -> dict:
    method = "POST" if i % 2 else "GET"
    body = {"email_address": {"address": f"aiohttp-{i}@example.com"}, "create_source": "Account"}
    for attempt in range(1, ATTEMPTS + 1):
        kwargs = {"json": body} if method == "POST" else {"params": {"limit": "1"}}
        async with session.request(method, f"{base}/v3/contacts", **kwargs) as response:
            await response.read()
            value = response.headers.get("Retry-After", "1")
            wait = int(value) if value.isdigit() else 1
            status = response.status
        if status != 429 or wait > LONGEST_WAIT or attempt == ATTEMPTS:
            break
        await asyncio.sleep(wait)
    return {"client": "aiohttp", "i": i, "method": method, "status": status, "attempts": attempt}


async def main() -> None:
    base, count = sys.argv[1].rstrip("/"), int(sys.argv[2]) if len(sys.argv) > 2 else 10
    headers = {"Authorization": "Bearer dummy"}  # the proxy puts in the real token
    async with aiohttp.ClientSession(headers=headers) as session:
        for line in await asyncio.gather(*(call(session, base, i) for i in range(count))):
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
