"""Write the README's configuration table from proxy.config.SETTINGS (run: python scripts/settings_table.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from proxy.config import SETTINGS

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- settings-table -->", "<!-- /settings-table -->"
_DEFAULTS = {
    "state_dir": "`$XDG_DATA_HOME/ctct-proxy` (else `~/.local/share/ctct-proxy`)",
    "log_format": "`console` on a TTY, else `json`",
    "ca_bundle": "system trust (`SSL_CERT_FILE` honoured)",
    "egress_proxy": "`HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`",
    "coalesce": "`true` (coalescing on)",
}


def table() -> str:
    """The markdown table, one row per setting."""
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = _DEFAULTS.get(s.name) or (f"`{s.default}`" if s.default is not None else "none")
        flag = f"`{s.flag}`" + (" (repeatable)" if s.repeatable else "")
        rows.append(f"| {flag} | `{s.env}` | {default} | {s.help} |")
    return "\n".join(rows)


def render(text: str) -> str:
    """README text with the table between the markers replaced."""
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{table()}\n{END}{tail}"


if __name__ == "__main__":
    current = README.read_text()
    new = render(current)
    if "--check" in sys.argv:
        sys.exit(0 if new == current else 1)
    README.write_text(new)
