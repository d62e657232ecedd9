# One image for both services: docker-compose.yml picks the command
# (streamherd-orchestrator or streamherd-worker).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

WORKDIR /app

# Dependencies first, pinned by constraints.txt: this layer only changes with the pins.
COPY pyproject.toml constraints.txt README.md ./
RUN python -m venv /opt/venv \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -c constraints.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# The orchestrator finds alembic.ini and alembic/ beside its package
# (orchestrator/migrations.py, project_root), so the package is installed editable
# from /app rather than copied into site-packages, where our alembic/ would also
# collide with the alembic library.
COPY alembic.ini ./
COPY alembic ./alembic
COPY shared ./shared
COPY orchestrator ./orchestrator
COPY worker ./worker
RUN pip install --no-deps -c constraints.txt -e . \
 && python -m compileall -q /app/shared /app/orchestrator /app/worker /app/alembic

# Never root at run time. /var/lib/streamherd holds worker state (one volume per
# replica, see docker-compose.yml) and the SQLite file when no database URL is given.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/streamherd streamherd \
 && mkdir -p /var/lib/streamherd/state \
 && chown -R streamherd:streamherd /var/lib/streamherd
ENV ORCH_DATABASE_URL=sqlite+aiosqlite:////var/lib/streamherd/streamherd.db \
    WORKER_STATE_DIR=/var/lib/streamherd/state
USER streamherd:streamherd

EXPOSE 8000 8081
CMD ["streamherd-orchestrator"]
