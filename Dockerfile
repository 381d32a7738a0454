# Container images of the imgcache controller (the default target) and of its
# helper (--target helper), built for linux/amd64 and linux/arm64 by
# .github/workflows/image.yml with docker buildx.

# Python base for every stage. It is Debian bookworm, so the helper stage below
# installs busybox-static from the same Debian release.
# NOTE: the digest was taken from public Dockerfiles that pin this tag and was
# not checked against Docker Hub when it was written. The CI job resolves the
# current digest of python:3.11-slim-bookworm and passes it with
# --build-arg PYTHON_IMAGE=..., so update the default here when the job reports
# a newer one.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b
ARG UV_VERSION=0.13.8

# Stage 1: install imgcache and its locked dependencies into a virtual
# environment at the path that the runtime stage uses.
FROM ${PYTHON_IMAGE} AS builder
ARG UV_VERSION
RUN pip install --no-cache-dir "uv==${UV_VERSION}"
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/imgcache/venv
WORKDIR /src
# Dependencies first, so that a change to imgcache/ reuses this layer.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY imgcache ./imgcache
# --no-editable installs imgcache as a package, so the venv does not need /src.
RUN uv sync --frozen --no-dev --no-editable

# Stage 2: the helper binary that prepull and pinner pods run inside images
# that may have no shell and no sleep (scratch and distroless images). An init
# container copies it into an emptyDir mounted at /imgcache. Pinner containers
# run "/imgcache/busybox sleep 2147483647", and prepull containers run
# "/imgcache/busybox true". Debian's busybox-static package ships a statically
# linked /bin/busybox for amd64 and arm64, so the binary runs in any Linux image
# of the node's architecture.
FROM ${PYTHON_IMAGE} AS helpers
RUN apt-get update \
    && apt-get install -y --no-install-recommends busybox-static \
    && rm -rf /var/lib/apt/lists/*

# Stage 3: the helper image, which holds nothing but that busybox. Prepull and
# pinner pods name it in their init container (IMGCACHE_HELPER_IMAGE in the
# Deployment), so a new node pulls about 1 MB before its first prepull starts
# instead of the whole controller image with Python. Build it with
# --target helper.
FROM scratch AS helper
COPY --from=helpers /bin/busybox /usr/local/lib/imgcache/busybox
USER 65532:65532

# Stage 4: the runtime image. It keeps a copy of the helper, so that a
# controller started without IMGCACHE_HELPER_IMAGE can use its own image.
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 65532 imgcache \
    && useradd --system --uid 65532 --gid 65532 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin imgcache
COPY --from=builder /opt/imgcache/venv /opt/imgcache/venv
COPY --from=helpers /bin/busybox /usr/local/lib/imgcache/busybox
ENV PATH=/opt/imgcache/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
EXPOSE 8080
# Kubernetes probes /healthz and /readyz, so the image has no HEALTHCHECK.
ENTRYPOINT ["imgcache"]
CMD ["run"]
