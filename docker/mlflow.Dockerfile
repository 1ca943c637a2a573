# MLflow tracking server image for docker/compose.yaml: the same MLflow version as the trainer,
# with the PostgreSQL driver.
#
#   docker build -f docker/mlflow.Dockerfile -t pipeline-mlflow:3.17.2 docker
FROM python:3.11.11-slim-bookworm

RUN python -m pip install --no-cache-dir mlflow==3.17.2 psycopg2-binary==2.9.13 \
    && useradd --create-home --uid 1000 mlflow \
    && mkdir -p /mlartifacts \
    && chown mlflow:mlflow /mlartifacts
USER 1000:1000
WORKDIR /home/mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
