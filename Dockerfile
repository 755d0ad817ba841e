#
# sequin-worker container image.
#
#   docker build -t sequin-worker:0.1.0 \
#     --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" .
#
# Two stages: `build` resolves the dependencies and installs the project into a
# virtualenv at /opt/venv; `runtime` is a fresh slim image that receives only that venv
# (no pip cache, no build frontend, no source tree).

# Both stages use the same base, so the venv's interpreter symlinks stay valid.
ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm


FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

RUN python3 -m venv /opt/venv

WORKDIR /src

# Dependencies first, from pyproject.toml alone, so this layer is reused as long as the
# dependency list does not change (editing worker/ or sql/ does not invalidate it).
# README.md is copied with it because pyproject.toml names it as the package readme.
COPY pyproject.toml README.md ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/requirements.txt', 'w').write('\n'.join(deps) + '\n')" \
 && pip install --requirement /tmp/requirements.txt

# Then the project itself, without touching the dependencies installed above. pip builds
# the wheel (hatchling, which also puts sql/ inside the package as worker/sql) and
# installs it; `pip check` fails the build if the dependency set is inconsistent.
COPY worker/ worker/
COPY sql/ sql/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps . \
 && pip check


FROM ${PYTHON_IMAGE} AS runtime

ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown

LABEL org.opencontainers.image.title="sequin-worker" \
      org.opencontainers.image.description="Pages through Sequin's records API and upserts into Postgres." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

# Fixed, non-root UID/GID so Kubernetes can enforce runAsNonRoot/runAsUser: 10001.
# No home directory and no login shell: the process needs neither.
RUN groupadd --gid 10001 sequin \
 && useradd --uid 10001 --gid 10001 --no-log-init --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin sequin

# The venv stays owned by root: the worker can read and execute its code, not change it.
# Its .pyc files were compiled at install time, so nothing needs writing at run time and
# the root filesystem can be mounted read-only.
COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# Empty working directory: the settings loader also reads ./.env, and none is shipped
# (.dockerignore keeps every .env out of the build context; configuration comes from the
# environment at run time).
WORKDIR /app

USER 10001:10001

# /metrics, /healthz, /readyz (SEQUIN_HTTP_PORT, default 9090).
EXPOSE 9090

# For plain `docker run`; Kubernetes ignores this and uses the probes in deploy/k8s.
# The slim image has no curl, so the check is Python's urllib: any connection error or a
# non-2xx answer raises, and the uncaught exception exits 1 (= unhealthy).
# Only `run` is expected to pass it; override it (--no-healthcheck) for `simulate` and
# the one-shot commands.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SEQUIN_HTTP_PORT', '9090') + '/healthz', timeout=4)"]

# PID 1: the worker runs directly as PID 1, without tini. The kernel delivers to PID 1 only
# the signals it has handlers for; `sequin-worker` installs its own SIGTERM handler
# (finishes the batch, releases the lock, exits 0 within seconds) and Python's default
# SIGINT handler makes Ctrl-C work. It spawns no child processes, so there are no zombies
# to reap. If that ever changes, add an init (`docker run --init`, or tini here).
STOPSIGNAL SIGTERM

ENTRYPOINT ["sequin-worker"]
CMD ["run"]
