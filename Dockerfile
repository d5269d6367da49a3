FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY workers ./workers
COPY aggregator ./aggregator
COPY migrations ./migrations
RUN pip install --no-cache-dir . && useradd --create-home pipeline && mkdir /models && chown pipeline /models
USER pipeline
ENV PIPELINE_MODELS_DIR=/models
ENTRYPOINT ["pipeline"]
