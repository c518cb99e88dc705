# ctct-proxy as a container or a sidecar: `docker build -t ctct-proxy .`
# How to run it (docker run, compose, a Kubernetes pod): docs/operations.md.

# An exact Python release on Debian 12 slim: rebuilds are repeatable; bump it on purpose.
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src

# Dependencies first, read from pyproject.toml alone, so that a change to the code does not
# reinstall them (uvloop, the `fast` extra, included: the image is where speed matters).
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['fast']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the code, installed as a regular (non-editable) package without touching the deps;
# the sources are not needed once installed.
COPY proxy/ proxy/
WORKDIR /
RUN pip install --no-deps /src \
    && rm -rf /src

# A fixed numeric id, so that Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 ctct \
    && useradd --system --uid 10001 --gid ctct --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin ctct \
    && mkdir -p /var/lib/ctct-proxy \
    && chown 10001:10001 /var/lib/ctct-proxy
WORKDIR /var/lib/ctct-proxy
USER 10001:10001

# Listen on every interface of the container. Beyond loopback the proxy demands client
# tokens (CTCT_PROXY_CLIENT_TOKENS) and refuses to start without them, unless
# CTCT_PROXY_TRUST_NETWORK=true says every program that can reach it may use the
# credentials: the image deliberately sets neither.
# The proxy is gone within the grace + 1 s: 9 s, inside `docker stop`'s and `podman stop`'s
# default 10 s; raise both together (docs/operations.md).
ENV CTCT_PROXY_HOST=0.0.0.0 \
    CTCT_PROXY_PORT=8080 \
    CTCT_PROXY_STATE_DIR=/var/lib/ctct-proxy \
    CTCT_PROXY_SHUTDOWN_GRACE=8
EXPOSE 8080

# No curl in a slim image: ask /healthz with the Python that is already there.
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('CTCT_PROXY_PORT', '8080') + '/healthz', timeout=2)"]

CMD ["ctct-proxy", "serve"]
