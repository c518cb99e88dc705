"""requests + urllib3's Retry through ctct-proxy: a 429 is retried after its Retry-After.

requests retries nothing by default (HTTPAdapter(max_retries=0)), and urllib3's Retry leaves
POST and PATCH out of `allowed_methods`: add them, since a 429 from the proxy means the request
was never sent. Retry-After is slept as given (recent urllib3 caps it at 6 hours, older ones
not at all), so a daily-quota 429, which says "come back after midnight UTC", is handed back
at once here instead of blocking the thread for hours.

Usage: python requests_retry.py BASE_URL [COUNT]
Fires COUNT concurrent calls (even: GET /v3/contacts, odd: POST /v3/contacts) and prints one
JSON line per call: {"client": "requests", "i": ..., "method": ..., "status": ..., "attempts": ...}
"""

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError, ResponseError
from urllib3.util.retry import Retry

LONGEST_WAIT = 60  # seconds; anything longer is the daily quota: give the 429 back


class QuotaRetry(Retry):
    """Retry after Retry-After, but hand back a 429 whose Retry-After is longer than LONGEST_WAIT."""

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        wait = self.get_retry_after(response) if response is not None else None
        if wait is not None and wait > LONGEST_WAIT:
            # With raise_on_status=False, urllib3 returns the 429 to the caller.
            raise MaxRetryError(_pool, url, ResponseError(f"Retry-After {wait:.0f} s"))
        return super().increment(method, url, response, error, _pool, _stacktrace)


def make_session(connections: int) -> requests.Session:
    retry = QuotaRetry(
        total=10,
        status_forcelist=[429],
        allowed_methods=Retry.DEFAULT_ALLOWED_METHODS | {"POST", "PATCH"},
        respect_retry_after_header=True,
        raise_on_status=False,  # the last answer comes back instead of an exception
    )
    adapter = HTTPAdapter(max_retries=retry, pool_maxsize=connections)
    session = requests.Session()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["Authorization"] = "Bearer dummy"  # the proxy puts in the real token
    return session


def call(session: requests.Session, base: str, i: int) -> dict:
    if i % 2:
        body = {"email_address": {"address": f"requests-{i}@example.com"}, "create_source": "Account"}
        response = session.post(f"{base}/v3/contacts", json=body, timeout=(5, 40))
    else:
        response = session.get(f"{base}/v3/contacts", params={"limit": 1}, timeout=(5, 40))
    history = response.raw.retries.history if response.raw.retries else ()
    return {
        "client": "requests",
        "i": i,
        "method": response.request.method,
        "status": response.status_code,
        "attempts": len(history) + 1,
    }


def main() -> None:
    base, count = sys.argv[1].rstrip("/"), int(sys.argv[2]) if len(sys.argv) > 2 else 10
    session = make_session(count)
    with ThreadPoolExecutor(count) as pool:
        for line in pool.map(lambda i: call(session, base, i), range(count)):
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
