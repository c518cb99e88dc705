"""`ctct-proxy demo` runs to completion and shows the problem and the fix."""

from __future__ import annotations

import io

from proxy.demo import run_demo


async def test_demo_shows_direct_errors_and_a_clean_proxied_run() -> None:
    out = io.StringIO()
    direct, proxied = await run_demo(count=12, qps=4, out=out)
    assert direct.statuses[403] > 0  # the raw gateway answers the burst with quota errors
    assert proxied.statuses == {200: 12}
    assert proxied.upstream["max_arrivals_1s"] in (1, 2, 3, 4)
    assert proxied.upstream["rejected"]["per_second"] == 0  # type: ignore[index]
    text = out.getvalue()
    assert "mashery.not.authorized.over.qps" in text
    assert "through ctct-proxy" in text and "12/12 answered" in text
