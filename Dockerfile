# tracker: the HTTP service. Build from the repository root:  docker build -t tracker .
FROM python:3.11-slim

# TRACKER_DATA_DIR holds the generated token (when TRACKER_API_TOKEN is unset) and the
# per-worker metrics files; it is outside /app so that /app stays owned by root.
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TRACKER_LISTEN=0.0.0.0:8080 \
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
EXPOSE 8080

# Liveness of the process only; readiness (PostgreSQL, Redis, backlog) is /readyz.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('TRACKER_LISTEN', '0.0.0.0:8080').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2)"]

# `tracker serve` is PID 1: it forwards SIGTERM to its workers, which drain within 10 s.
STOPSIGNAL SIGTERM
CMD ["tracker", "serve"]
