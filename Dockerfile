# syntax=docker/dockerfile:1
#
# The relay as a container image: `relay run` as an unprivileged user (UID/GID 10001).
#
#   docker build -t appfunnel-cio-relay .
#   docker run --rm appfunnel-cio-relay migrate          # with DATABASE_URL set, see below
#   docker run -d --stop-timeout 45 \
#       -e DATABASE_URL=postgresql://relay:...@db:5432/app \
#       -e CUSTOMERIO_WRITE_KEY=... -e CUSTOMERIO_REGION=eu appfunnel-cio-relay
#
# DATABASE_URL must name the application's database (the one its transactions write the
# outbox rows in): without it `relay run` refuses to start (exit 2), and the image never
# asks for the embedded server. The same image runs every operator command:
# `docker run --rm -e DATABASE_URL=... appfunnel-cio-relay status`.
#
# Give the container at least 45 s to stop (`docker run --stop-timeout 45`, compose
# `stop_grace_period: 45s`, Kubernetes `terminationGracePeriodSeconds: 45`): Docker's default
# of 10 s equals RELAY_HTTP_TIMEOUT, so a request in flight could be cut off before its outcome
# is recorded (nothing is lost then, but its messages are sent again after the lease expires).
# docs/operations.md has the arithmetic.
#
# tests/test_deploy.py builds this file's wheel from the context .dockerignore leaves and runs
# the final stage's ENTRYPOINT and CMD from it, with its ENV, against a real database.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: the relay's wheel and the wheels of everything it depends on ---------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
# pyproject.toml names README.md as the long description. relay/models and relay/migrations
# are symlinks to models/ and alembic/ (COPY keeps them as links), so both folders are copied
# beside relay/; the wheel holds real copies.
COPY pyproject.toml README.md ./
COPY models/ models/
COPY alembic/ alembic/
COPY relay/ relay/
# Every dependency is resolved and downloaded here, once: the final stage installs from these
# files only (--no-index), so it needs no compiler and no network.
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels .

# --- final: a virtual environment in /opt/relay/venv, owned by root, run by relay ---------------
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/relay/venv/bin:$PATH
# A fixed UID/GID, so volume permissions and Kubernetes' runAsUser/runAsNonRoot checks can
# name it. No home directory and no login shell: the relay writes no files.
RUN groupadd --system --gid 10001 relay \
    && useradd --system --uid 10001 --gid relay --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin relay
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv /opt/relay/venv \
    && /opt/relay/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels \
        appfunnel-cio-relay \
    && /opt/relay/venv/bin/relay --help >/dev/null
WORKDIR /opt/relay
# The numeric form: an orchestrator can tell it is not root without reading /etc/passwd.
USER 10001:10001
# SIGTERM: the requests in flight finish and are recorded, the rest of the claim is handed
# back, exit 0 (relay/service.py).
STOPSIGNAL SIGTERM
# /metrics, /livez and /readyz when RELAY_METRICS_PORT=9108 is set; RELAY_METRICS_HOST=0.0.0.0
# makes them reachable from outside the container.
EXPOSE 9108
ENTRYPOINT ["relay"]
CMD ["run"]
