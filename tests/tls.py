"""The simulator behind real TLS: a private CA from trustme, server certificates for any host
names and validity, and a count of the TLS handshakes the server accepted."""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import trustme
from yarl import URL

from proxy.simulator import Simulator, SimulatorConfig, make_simulator_app
from proxy.simulator.gateway import SIMULATOR
from tests.conftest import ServerFactory


@dataclass
class PrivateCA:
    """A certificate authority no system trusts; `ca_file` is its certificate in PEM."""

    ca: trustme.CA
    ca_file: Path

    @classmethod
    def create(cls, directory: Path, name: str = "ca.pem") -> PrivateCA:
        ca = trustme.CA()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / name
        ca.cert_pem.write_to_path(str(path))
        return cls(ca, path)

    def server_context(
        self,
        *identities: str,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> ssl.SSLContext:
        """A server TLS context with a certificate from this CA for `identities`."""
        cert = self.ca.issue_cert(*identities, not_before=not_before, not_after=not_after)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        return context


@dataclass
class TLSSimulator:
    """The simulator served over HTTPS at `url`; `handshakes` lists the SNI name of each."""

    url: URL
    simulator: Simulator
    handshakes: list[str | None] = field(default_factory=list)


async def start_tls_simulator(
    start_server: ServerFactory,
    context: ssl.SSLContext,
    config: SimulatorConfig | None = None,
    host: str = "localhost",
) -> TLSSimulator:
    """Serve the simulator with `context` on 127.0.0.1; its URL names `host` (for SNI)."""
    handshakes: list[str | None] = []

    def count(_sock: ssl.SSLObject, name: str | None, _context: ssl.SSLContext) -> None:
        # Called once per ClientHello: every TLS connection the server accepts passes here.
        handshakes.append(name)

    context.sni_callback = count
    app = make_simulator_app(config or SimulatorConfig(qps=1000))
    server = await start_server(app, ssl=context)
    assert server.port is not None
    url = URL.build(scheme="https", host=host, port=server.port)
    return TLSSimulator(url, app[SIMULATOR], handshakes)
