# tagrelay: first-party server-side tracking relay.
#   docker build -t tagrelay .
#   docker run -p 8080:8080 -v tagrelay-data:/data tagrelay
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY templates ./templates
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin tagrelay \
    && mkdir -p /data /etc/tagrelay && chown tagrelay /data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config/tagrelay.yaml /etc/tagrelay/tagrelay.yaml
USER tagrelay
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["tagrelay"]
CMD ["serve", "--config", "/etc/tagrelay/tagrelay.yaml", "--data-dir", "/data"]
