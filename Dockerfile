# syntax=docker/dockerfile:1
# Build stage: the toolchain, the locked dependencies and the package, in a virtualenv.
FROM python:3.11-slim-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY requirements/runtime.lock requirements/runtime.lock
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --require-hashes -r requirements/runtime.lock
COPY pyproject.toml README.md alembic.ini ./
COPY src ./src
COPY migrations ./migrations
RUN /opt/venv/bin/pip install --no-deps .

# Runtime stage: slim, non-root, with only the virtualenv and the migrations.
FROM python:3.11-slim-bookworm AS runtime
RUN useradd --create-home --uid 10001 joyhub
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app/alembic.ini /app/alembic.ini
COPY --from=build /app/migrations /app/migrations
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    JOYHUB_ROOT=/app \
    DATA_DIR=/app/var \
    HOST=0.0.0.0 \
    PORT=8000
RUN mkdir -p /app/var && chown joyhub:joyhub /app/var
USER joyhub
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status == 200 else 1)"
CMD ["sh", "-c", "joyhub serve --host \"$HOST\" --port \"$PORT\" --workers \"${WORKERS:-2}\""]
