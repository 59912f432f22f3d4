# Image of the fedmq coordinator and worker. docker-compose.yml runs both from it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# torch first, the CPU build from PyTorch's own index: PyPI's Linux wheel is the CUDA
# build, several GB larger. fedmq's own "torch>=2.2" requirement is then already met.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY pyproject.toml README.md ./
COPY fedmq ./fedmq
COPY coordinator ./coordinator
COPY worker ./worker
COPY schemas ./schemas
RUN pip install .

# The coordinator writes checkpoints and metrics under /app/runs.
RUN useradd --system --uid 10001 --create-home fedmq \
    && mkdir -p /app/runs \
    && chown fedmq /app/runs
USER fedmq

CMD ["fedmq", "--help"]
