# tagrelay: first-party server-side tracking relay.
#   docker build -t tagrelay .
#   docker run -p 8080:8080 -v tagrelay-data:/data \
#     -e TAGRELAY_BROWSER_KEY=... -e TAGRELAY_SERVER_KEY=... \
#     -e TAGRELAY_ALLOWED_ORIGIN=https://www.example.com tagrelay
# The configuration is deploy/tagrelay.yaml (production: no demo, no development keys);
# mount your own at /etc/tagrelay/tagrelay.yaml. deploy/compose.yaml adds Prometheus and
# Grafana.

# An exact release of the base image, so that a rebuild gets the same Python and Debian.
# To pin it by digest too: PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:<digest>.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# The relay and its dependencies go into a virtualenv, copied whole into the final stage:
# no wheel, no pip cache and no build tree is left in a layer of the image.
RUN python -m venv /opt/tagrelay
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
COPY templates ./templates
RUN /opt/tagrelay/bin/pip install --no-cache-dir . \
    && /opt/tagrelay/bin/pip uninstall --yes pip

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/tagrelay/bin:$PATH \
    TAGRELAY_CONFIG=/etc/tagrelay/tagrelay.yaml \
    TAGRELAY_DATA_DIR=/data \
    TAGRELAY_DEV=0
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin tagrelay \
    && mkdir -p /data /etc/tagrelay && chown tagrelay /data && chmod 0700 /data
COPY --from=build /opt/tagrelay /opt/tagrelay
COPY deploy/tagrelay.yaml /etc/tagrelay/tagrelay.yaml
USER tagrelay
WORKDIR /data
VOLUME ["/data"]
# 8080: ingest (server.port); 9100: the admin listener, when TAGRELAY_ADMIN_LISTEN opens it
EXPOSE 8080 9100
# Asks the port and base path of the configuration in use (TAGRELAY_CONFIG, PORT, ...).
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["tagrelay", "health"]
ENTRYPOINT ["tagrelay"]
CMD ["serve"]
