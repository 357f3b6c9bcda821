#!/usr/bin/env bash
# Writes ~/.mlflow/credentials, which the MLflow client reads when MLFLOW_TRACKING_USERNAME/PASSWORD are
# not set, from Secret Manager: the VMs of ray_cluster.yaml run it at setup, so that the pipeline user's
# password is in no file we ship and not in any job's environment (where the Ray dashboard would show it).
# Needs gcloud (on every Google image) and roles/secretmanager.secretAccessor on the secret.
set -euo pipefail
user="${GSS_MLFLOW_USER:-gss-pipeline}"
secret="${GSS_MLFLOW_SECRET:-gss-mlflow-pipeline-password}"
password="$(gcloud secrets versions access latest --secret="$secret")"
umask 077
mkdir -p ~/.mlflow
printf '[mlflow]\nmlflow_tracking_username = %s\nmlflow_tracking_password = %s\n' "$user" "$password" \
  > ~/.mlflow/credentials
