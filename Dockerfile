# whisper-exporter: a sidecar beside a Whisper server.
#   docker build -t whisper-exporter .
#   docker run --rm -p 10111:10111 --pid=container:whisper --gpus all \
#     -v $PWD/config.yml:/etc/whisper-exporter/config.yml:ro \
#     -e WHISPER_EXPORTER_CONFIG=/etc/whisper-exporter/config.yml whisper-exporter
FROM python:3.12-slim

# Build in one stage, keep only the installed package.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY whisper_exporter ./whisper_exporter
COPY collectors ./collectors
RUN pip install --no-cache-dir . && rm -rf /src

# Non-root: the exporter only reads (logs, /proc, NVML) and serves one port.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin exporter \
    && mkdir -p /etc/whisper-exporter
USER 10001
WORKDIR /

# Mount a config here and point WHISPER_EXPORTER_CONFIG at it; without one the
# built-in defaults apply.
VOLUME ["/etc/whisper-exporter"]
# 10111: metrics; 10112: the request tap, when collectors.tap is on (docs/tap.md)
EXPOSE 10111 10112

HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:10111/-/healthy', timeout=2)"]

ENTRYPOINT ["whisper-exporter"]
CMD ["run"]
