# One image for every pacsbridge service: listener, worker and api differ only by their command
# (see docker-compose.yml). Builds on python:3.11-slim by default; on a machine that cannot pull
# images, any Debian/Ubuntu image with python3 and python3-venv will do:
#   podman build --build-arg BASE_IMAGE=localhost/pacsbridge-base .   (deploy/base-image.sh makes one)
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG PACSBRIDGE_UID=10001
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/venv \
    PATH=/venv/bin:$PATH

# The dependencies first, read from pyproject.toml alone, so that a change of code rebuilds only the
# last layers.
WORKDIR /src
COPY pyproject.toml ./
RUN python3 -m venv /venv \
 && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
      > /tmp/requirements.txt \
 && /venv/bin/pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# pacsbridge/shared, pacsbridge/listener, ... are links to shared/ and services/* (docs/architecture.md)
COPY README.md ./
COPY pacsbridge/ pacsbridge/
COPY shared/ shared/
COPY services/ services/
RUN /venv/bin/pip install --no-deps . \
 && cd / && rm -rf /src \
 && /venv/bin/python -c "import pacsbridge.cli, pacsbridge.shared.core.dicomsql, pacsbridge.listener.server, pacsbridge.worker.tasks"
WORKDIR /

COPY deploy/entrypoint.sh /usr/local/bin/pacsbridge-entrypoint
COPY deploy/healthcheck.py /usr/local/bin/pacsbridge-healthcheck

# A non-root user; storage (/data), job folders and a writable working directory belong to it.
# /data/.incoming exists in the image so that a new named volume starts with it (the api mounts
# storage read-only and `pacsbridge init` then finds the folder it would create).
RUN chmod 0755 /usr/local/bin/pacsbridge-entrypoint /usr/local/bin/pacsbridge-healthcheck \
 && useradd --uid "${PACSBRIDGE_UID}" --user-group --create-home --home-dir /home/pacsbridge \
            --shell /usr/sbin/nologin pacsbridge \
 && mkdir -p /data/.incoming /export /import \
 && chown -R pacsbridge:pacsbridge /data /export /import

ENV PACSBRIDGE_STORAGE=/data \
    PACSBRIDGE_EXPORT_ROOT=/export \
    PACSBRIDGE_IMPORT_ROOT=/import \
    PACSBRIDGE_LISTENER_HOST=0.0.0.0 \
    PACSBRIDGE_LISTENER_PORT=11112
USER pacsbridge
WORKDIR /home/pacsbridge
VOLUME ["/data"]
EXPOSE 11112 8080

# Works for every service: it finds which one runs in the container (listener: its port is
# listening; worker: it answers a Celery ping; api: GET /healthz) — see deploy/healthcheck.py.
HEALTHCHECK --interval=30s --timeout=15s --start-period=60s --retries=3 CMD ["pacsbridge-healthcheck"]

# With PACSBRIDGE_INIT_DB=1 the entrypoint runs `pacsbridge init` (idempotent) before the command.
ENTRYPOINT ["pacsbridge-entrypoint"]
CMD ["pacsbridge", "--help"]
