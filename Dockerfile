# AVCap stack: the data pipeline (Prefect flows), training (torchrun) and captioning in one image.
#
# The PyPI torch 2.11 wheels for Linux x86_64 carry their own CUDA runtime (nvidia-* wheels), so a slim Python
# base is CUDA-capable: the host needs only the NVIDIA driver and the container toolkit (`docker run --gpus all`).
#
#   docker build -t avcap .
#   docker run --rm -v "$PWD/out:/data" avcap                                  # the embedded demo
#   docker run --rm avcap python -m pytest -q                                  # the tests
#   docker run --rm -v /data:/data avcap python flows.py build --split train --out /data/ac \
#       --cookies /data/cookies.txt                                            # the image's data/audiocaps CSVs
#   docker run --rm --gpus all --ipc=host -v /data:/data avcap \
#       torchrun --nproc_per_node 8 train.py --data /data/ac --out /data/runs/avcap
FROM python:3.11-slim-bookworm

# ffmpeg: extraction and yt-dlp's range downloads; Java 17: METEOR and the PTB tokenizer (pycocoevalcap);
# espeak-ng: the demo's speech clips; chromium: the browser the gallery tests load pages in (headless); nginx: the
# tests' remote shard store (its echo module: the remote benchmark's latency); tini: forwards signals to torchrun
# and its workers and reaps them. No curl binary: remote shards are read through libcurl in the pycurl wheel,
# manifests through fsspec (aiohttp).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg openjdk-17-jre-headless espeak-ng chromium nginx \
       libnginx-mod-http-echo tini \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

WORKDIR /opt/avcap

# The pinned dependencies first, from pyproject.toml alone (yt-dlp[default,deno] brings the deno binary, on PATH
# as /usr/local/bin/deno, and the EJS scripts YouTube downloads need): this layer (torch trio included) is rebuilt
# only when the pins change, not on every source edit.
# The test extra (pytest, moto) and the s3 extra (s3fs) come too: the image documents `python -m pytest`, and
# reads s3:// shards.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['test'] + p['optional-dependencies']['s3']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt \
    && deno --version && python -c "import yt_dlp_ejs"

# Only the project's sources (no .venv, outputs or caches from the build context).
COPY pipeline/ pipeline/
COPY shards/ shards/
COPY avcap/ avcap/
COPY demo/ demo/
COPY tests/ tests/
COPY scripts/ scripts/
# data/: the AudioCaps CSVs that `flows.py build --split S` reads by default (and the tests check).
COPY data/ data/
COPY flows.py train.py README.md ARCHITECTURE.md LICENSE .gitattributes ./
RUN pip install --no-deps . \
    && python -c "import torch, torchaudio, torchvision, pipeline, shards, avcap, demo, flows, train"

# An unprivileged user; mount writable volumes for outputs (e.g. -v "$PWD/out:/data", with --user "$(id -u)"
# when the host directory belongs to another uid).
RUN useradd --create-home --uid 1000 avcap \
    && mkdir -p /data \
    && chown -R avcap:avcap /data /opt/avcap
USER 1000:1000
ENV PREFECT_HOME=/home/avcap/.prefect
VOLUME ["/data"]

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "-m", "demo.run", "--out", "/data/demo"]
