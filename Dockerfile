# syntax=docker/dockerfile:1
#
# One image for both commands of the eventrouter package:
#   IMAGE serve -f FILE ...   runs a router (the default command)
#   IMAGE operator ...        runs the Kubernetes operator
# The chart and the operator use it as ghcr.io/eventrouter/eventrouter:<version>:
#   docker build -t ghcr.io/eventrouter/eventrouter:0.1.0 .
#
# Python dependencies come from requirements.lock, pinned with hashes. After a
# change to the dependencies in pyproject.toml, regenerate it with the
# pip-compile command in its header.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/eventrouter
WORKDIR /src
COPY requirements.lock ./
# Wheels only: this stage has no compiler, so a package without a wheel for
# the platform fails here rather than half-building.
RUN /opt/eventrouter/bin/pip install --require-hashes --only-binary=:all: -r requirements.lock
COPY pyproject.toml README.md ./
COPY router ./router
COPY operator ./operator
# The package itself, without resolving dependencies again; pip check fails
# the build when requirements.lock misses one that pyproject.toml declares.
RUN /opt/eventrouter/bin/pip wheel --no-deps --wheel-dir /tmp/dist . \
    && /opt/eventrouter/bin/pip install --no-deps /tmp/dist/eventrouter-*.whl \
    && /opt/eventrouter/bin/pip check \
    && /opt/eventrouter/bin/python -m compileall -q /opt/eventrouter/lib \
    && /opt/eventrouter/bin/pip uninstall --yes pip setuptools

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="eventrouter" \
      org.opencontainers.image.description="Routes game events to Kafka, HTTP, log and file sinks; also runs the Kubernetes operator" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
# The same uid and gid that the chart and the operator's pod specs run as.
RUN groupadd --system --gid 10001 eventrouter \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin eventrouter
COPY --from=build /opt/eventrouter /opt/eventrouter
ENV PATH=/opt/eventrouter/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
# 7350: ingestion (HTTP and WebSocket); 7351: admin (probes, metrics).
EXPOSE 7350 7351
ENTRYPOINT ["eventrouter"]
CMD ["serve"]
