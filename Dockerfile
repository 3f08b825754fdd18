# FaceMoE Edge: the daemon (`facemoe run`), the review UI (`facemoe serve`) and the CLI
# (`facemoe enroll`, `facemoe process`, ...) in one image. README, "Install" has the commands;
# compose.yaml runs the daemon, the review UI and mosquitto.
#
#   podman build --build-context shared=../shared/models -t facemoe-edge .
#
# The `shared` build context is a folder holding the YuNet detector
# (face_detection_yunet_2026may.onnx, MIT), which install.sh takes from ../shared/models; it is
# read during the build (checksum verified by install.sh) and nothing else of ../shared is used.
# Everything else comes from Debian and PyPI, and torch (only to export the model to ONNX) as
# install.sh takes it: a CPU wheel pip finds (CI gives the build its machine's pip sources,
# .ci/container.sh), else the PyTorch CPU index (FACEMOE_TORCH_INDEX).

FROM docker.io/library/debian:bookworm-slim
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
# Debian's Python and GStreamer (the PyPI GStreamer wheels are Windows/macOS only): the packages
# install.sh installs (tests/test_container_files.py checks the list), tini as PID 1
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tini \
      python3 python3-venv python3-dev python3-gi python3-gst-1.0 gir1.2-gstreamer-1.0 \
      gir1.2-gst-plugins-base-1.0 gir1.2-gst-rtsp-server-1.0 gstreamer1.0-tools \
      gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad \
      gstreamer1.0-plugins-ugly gstreamer1.0-libav gstreamer1.0-rtsp \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 1000 facemoe \
 && useradd --uid 1000 --gid facemoe --groups video --home-dir /data --no-create-home \
      --shell /usr/sbin/nologin facemoe \
 && mkdir -p /data /etc/facemoe && chown facemoe:facemoe /data

# The Python dependencies first, in their own layer: a change to the code reuses it
COPY pyproject.toml /opt/facemoe/
RUN --mount=type=cache,target=/root/.cache/pip \
    /usr/bin/python3 -m venv --system-site-packages /opt/facemoe/.venv \
 && /usr/bin/python3 -c 'import tomllib; p = tomllib.load(open("/opt/facemoe/pyproject.toml", "rb"))["project"]; x = p["optional-dependencies"]; print("\n".join(p["dependencies"] + x["web"] + x["mqtt"]))' > /tmp/requirements.txt \
 && PIP_DISABLE_PIP_VERSION_CHECK=1 /opt/facemoe/.venv/bin/pip install -q -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# The product, installed by install.sh as on a Debian machine (the YuNet detector, checksum
# verified, and the default model's ONNX export). torch, which only exports the model, is
# removed in the same step: the image runs the model with ONNX Runtime. As in a wheel, only the
# default model (configs/app.yaml's) ships; install.sh's downloads it was made from do not.
ARG FACEMOE_TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY . /opt/facemoe/
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,from=shared,target=/opt/shared/models \
    cd /opt/facemoe && export PIP_DISABLE_PIP_VERSION_CHECK=1 \
 && FACEMOE_SHARED=/opt/shared FACEMOE_EXTRAS=mqtt ./install.sh \
 && .venv/bin/pip uninstall -q -y torch sympy mpmath networkx \
 && ! .venv/bin/python -c 'import torch' 2>/dev/null \
 && default="$(.venv/bin/python -c 'from app.config import load_config; print(load_config().model.dir)')" \
 && [ -f "$default/manifest.json" ] \
 && find models -mindepth 1 -maxdepth 1 -type d ! -name detector ! -path "models/${default##*/}" \
      -exec rm -rf {} + \
 && rm -rf .venv/share/facemoe \
 && .venv/bin/python -m compileall -q app engine trainer

# FACEMOE_HOME: relative paths of the config (gallery.db, events, snapshots) and the user's own
# configs/app.yaml or models/ are looked for in /data first (README, "Install")
ENV PATH=/opt/facemoe/.venv/bin:$PATH FACEMOE_HOME=/data PYTHONUNBUFFERED=1 \
    FACEMOE_HEALTH_PORT=9464
VOLUME /data
WORKDIR /data
USER facemoe
# /healthz of the daemon's metrics server (daemon.metrics_port; FACEMOE_HEALTH_PORT if the
# config names another port): 200 "ok", 503 "degraded"
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ['FACEMOE_HEALTH_PORT'], timeout=4)"]
EXPOSE 9464 8080
ENTRYPOINT ["tini", "--", "facemoe"]
CMD ["run", "--config", "/etc/facemoe/app.yaml"]
