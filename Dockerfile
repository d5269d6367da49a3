# The pipeline's one image: every role (migrate, model workers, aggregator, Flower) runs it.
# The shipped models are trained at build time into /opt/pipeline/models, read-only to
# the app user, so every container of one image tag serves the same artifacts; to use
# others, mount a folder and point PIPELINE_MODELS_DIR at it (docs/deploy.md).
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
# Dependencies first, in their own layer: a code change does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && pip install -r requirements.txt
COPY README.md ./
COPY pipeline ./pipeline
COPY workers ./workers
COPY aggregator ./aggregator
COPY migrations ./migrations
RUN pip install --no-deps . \
    && PIPELINE_MODELS_DIR=/opt/pipeline/models pipeline models train

FROM python:3.11-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIPELINE_MODELS_DIR=/opt/pipeline/models \
    PIPELINE_DATA_DIR=/home/pipeline/.pipeline
RUN useradd --create-home --uid 10001 pipeline
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/pipeline/models /opt/pipeline/models
USER pipeline
WORKDIR /home/pipeline
CMD ["pipeline", "--help"]
