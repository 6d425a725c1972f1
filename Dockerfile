# tracker: the HTTP service. Build from the repository root:  docker build -t tracker .
FROM python:3.11-slim

# TRACKER_DATA_DIR holds the spool (events kept while Redis is away), the campaign snapshot,
# the generated token (when TRACKER_API_TOKEN is unset) and the per-worker metrics files; it
# is outside /app so that /app stays owned by root. Give it a volume (compose: a named volume;
# Kubernetes: a claim per pod). /metrics, /healthz, /readyz and /readyz/tracking answer on
# TRACKER_ADMIN_LISTEN only (404 on the public port): keep 9100 off the internet. Set it empty
# to answer them on the public port instead.
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TRACKER_LISTEN=0.0.0.0:8080 \
    TRACKER_ADMIN_LISTEN=0.0.0.0:9100 \
    TRACKER_DATA_DIR=/var/lib/tracker

RUN groupadd --system --gid 10001 tracker \
 && useradd --system --uid 10001 --gid tracker --home-dir /var/lib/tracker --no-create-home \
        --shell /usr/sbin/nologin tracker \
 && mkdir -p /var/lib/tracker \
 && chown tracker:tracker /var/lib/tracker

WORKDIR /app
# Everything, not only the package: migrations are read from /app/sql, next to tracker/,
# so the install is editable (the package runs from /app, not from site-packages).
COPY . /app
RUN pip install --no-cache-dir -e . \
 && python -m compileall -q /app/tracker

USER tracker
# 8080: redirects, pixels, the operator API. 9100: metrics and health (TRACKER_ADMIN_LISTEN).
EXPOSE 8080 9100

# Liveness of the process only, on the admin address when there is one, else the public one.
# Load balancers ask /readyz/tracking; /readyz (PostgreSQL, Redis, backlog) is for people.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; a = (os.environ.get('TRACKER_ADMIN_LISTEN', '').strip() or os.environ.get('TRACKER_LISTEN', '').strip() or '127.0.0.1:8080'); h, _, p = a.rpartition(':'); h = h.strip('[]'); h = '127.0.0.1' if h in ('', '0.0.0.0', '::') else h; h = f'[{h}]' if ':' in h else h; urllib.request.urlopen(f'http://{h}:{p}/healthz', timeout=2)"]

# `tracker serve` is PID 1: it forwards SIGTERM to its workers, which drain within 10 s.
STOPSIGNAL SIGTERM
CMD ["tracker", "serve"]
