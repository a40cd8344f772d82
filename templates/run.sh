#!/usr/bin/env bash
# Launches the streaming job or a backfill from the flex templates templates/build.sh wrote.
#
# Usage: templates/run.sh streaming|backfill [name=value ...]
#   Each name=value is a template parameter (templates/metadata.json, templates/backfill-metadata.json) or a Beam
#   pipeline option, e.g. bootstrap_servers=10.0.0.5:9092 postgres_dsn='host=10.0.0.7 dbname=engagement user=etl'
#   redis_url=redis://10.0.0.9:6379/0 http_api_url=https://api.example.com/v1/events (backfill: start=... end=...).
#   Values may hold commas and newlines (a repeatable option such as kafka_consumer_config takes one KEY=VALUE
#   per line).
# Environment (required):
#   PROJECT          Google Cloud project of the job
#   REGION           Dataflow region (e.g. us-central1)
#   REPOSITORY       Artifact Registry repository of the images (as for build.sh)
#   IMAGE_TAG        tag build.sh built; the workers run that image (sdk_container_image)
#   BUCKET           Cloud Storage bucket (name only) for staging and temporary files
# Environment (optional):
#   TEMPLATE_PATH    gs:// prefix build.sh wrote the specs to (default gs://$BUCKET/templates/engagement-pipeline/$IMAGE_TAG)
#   JOB_NAME         job name (default engagement-streaming, or engagement-backfill-<UTC time>); an update keeps it
#   SERVICE_ACCOUNT  worker and launcher service account email (needs Dataflow worker, BigQuery data editor,
#                    Secret Manager accessor for the token's and the passwords' secrets, and access to the
#                    network's services)
#   NETWORK, SUBNETWORK  VPC network and subnetwork (SUBNETWORK as regions/REGION/subnetworks/NAME or a full URL);
#                    the launcher and the workers reach Kafka, PostgreSQL, Redis and the HTTP API from there
#   PUBLIC_IPS       true to give workers public IPs (default false: use Cloud NAT or Private Google Access)
#   HTTP_API_TOKEN_SECRET  Secret Manager version of the HTTP API token, projects/P/secrets/S/versions/V; the
#                    launcher checks it and the workers read it (the token itself is never a parameter). Without it, disable the sink with
#                    http_api_sink=disabled.
#   POSTGRES_PASSWORD_SECRET  Secret Manager version of the PostgreSQL password (postgres_password_secret): the
#                    launcher checks it and the workers read it when they connect. postgres_dsn must then hold
#                    no password (one there would travel in the job graph, so the job refuses it).
#   REDIS_PASSWORD_SECRET  Secret Manager version of the Redis AUTH password (Memorystore's AUTH string), the same
#                    way (redis_password_secret); redis_url then holds no password.
#   STREAMING_MODE   exactly_once, the only mode this job accepts: Dataflow's at-least-once mode may deliver
#                    an element again after the de-duplication, and the aggregates would count it twice. For a
#                    cheaper BigQuery write, keep exactly once and pass bigquery_use_at_least_once=true.
#   MAX_WORKERS, WORKER_MACHINE_TYPE   autoscaling ceiling and machine type (defaults: Dataflow's)
#   UPDATE           true to replace the running streaming job named JOB_NAME in place (state is kept);
#                    TRANSFORM_NAME_MAPPINGS (old=new,...) when steps were renamed
#   DRY_RUN          true to print the gcloud command instead of running it
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}
die() {
  printf 'run.sh: error: %s\n' "$*" >&2
  exit 2
}
require() {
  local name
  for name in "$@"; do
    [ -n "${!name:-}" ] || die "$name is not set (see templates/run.sh --help)"
  done
}
is_true() { [ "${1:-false}" = true ]; }

case "${1:-}" in
  -h | --help | "") usage ;;
  streaming | backfill) pipeline="$1" ;;
  *) die "unknown pipeline '$1' (expected streaming or backfill)" ;;
esac
shift
require PROJECT REGION REPOSITORY IMAGE_TAG BUCKET

image="$REGION-docker.pkg.dev/$PROJECT/$REPOSITORY/engagement-$pipeline:$IMAGE_TAG"
template_path="${TEMPLATE_PATH:-gs://$BUCKET/templates/engagement-pipeline/$IMAGE_TAG}"
template_path="${template_path%/}"
if [ "$pipeline" = streaming ]; then
  job_name="${JOB_NAME:-engagement-streaming}"
else
  job_name="${JOB_NAME:-engagement-backfill-$(date -u +%Y%m%d-%H%M%S)}"
fi

# Parameters are joined with a separator no value holds (gcloud's ^SEP^ syntax), so values may contain commas.
separator=$'\x1f'
parameters=("sdk_container_image=$image")
if [ -n "${HTTP_API_TOKEN_SECRET:-}" ]; then
  parameters+=("http_api_token_secret=$HTTP_API_TOKEN_SECRET")
fi
if [ -n "${POSTGRES_PASSWORD_SECRET:-}" ]; then
  parameters+=("postgres_password_secret=$POSTGRES_PASSWORD_SECRET")
fi
if [ -n "${REDIS_PASSWORD_SECRET:-}" ]; then
  parameters+=("redis_password_secret=$REDIS_PASSWORD_SECRET")
fi
case "${STREAMING_MODE:-exactly_once}" in
  exactly_once) ;;
  at_least_once)
    die "STREAMING_MODE=at_least_once is refused: this job counts and sums, and Dataflow's at-least-once mode may" \
      "deliver an element again after the de-duplication, so the window aggregates (BigQuery, Redis) would count it" \
      "twice. Keep exactly_once; bigquery_use_at_least_once=true makes only the BigQuery writes at-least-once" \
      "(the views hide their copies)."
    ;;
  *) die "STREAMING_MODE must be exactly_once or at_least_once (got ${STREAMING_MODE})" ;;
esac
for parameter in "$@"; do
  [[ "$parameter" == ?*=* ]] || die "expected name=value, got '$parameter'"
  [[ "$parameter" != *"$separator"* ]] || die "parameter '${parameter%%=*}' holds the separator character"
  case "${parameter%%=*}" in
    http_api_token | token) die "never pass the HTTP API token as a parameter: set HTTP_API_TOKEN_SECRET" ;;
    postgres_dsn)
      [[ "$parameter" != *password=* ]] ||
        die "postgres_dsn holds a password, which would travel in the job graph: set POSTGRES_PASSWORD_SECRET"
      ;;
    redis_url)
      [[ "$parameter" != *://*:*@* ]] ||
        die "redis_url holds a password, which would travel in the job graph: set REDIS_PASSWORD_SECRET"
      ;;
  esac
  parameters+=("$parameter")
done
joined="$(printf "%s$separator" "${parameters[@]}")"

command=(
  gcloud dataflow flex-template run "$job_name"
  --project "$PROJECT"
  --region "$REGION"
  --template-file-gcs-location "$template_path/$pipeline.json"
  --staging-location "gs://$BUCKET/staging"
  --temp-location "gs://$BUCKET/temp"
  --parameters "^$separator^${joined%"$separator"}"
)
[ -z "${SERVICE_ACCOUNT:-}" ] || command+=(--service-account-email "$SERVICE_ACCOUNT")
[ -z "${NETWORK:-}" ] || command+=(--network "$NETWORK")
[ -z "${SUBNETWORK:-}" ] || command+=(--subnetwork "$SUBNETWORK")
is_true "${PUBLIC_IPS:-false}" || command+=(--disable-public-ips)
[ -z "${MAX_WORKERS:-}" ] || command+=(--max-workers "$MAX_WORKERS")
[ -z "${WORKER_MACHINE_TYPE:-}" ] || command+=(--worker-machine-type "$WORKER_MACHINE_TYPE")
if is_true "${UPDATE:-false}"; then
  [ "$pipeline" = streaming ] || die "UPDATE applies to the streaming job only"
  command+=(--update)
  [ -z "${TRANSFORM_NAME_MAPPINGS:-}" ] || command+=(--transform-name-mappings "$TRANSFORM_NAME_MAPPINGS")
fi

if is_true "${DRY_RUN:-false}"; then
  printf '%q ' "${command[@]}"
  printf '\n'
  exit 0
fi
command -v gcloud >/dev/null 2>&1 || die "gcloud is required (https://cloud.google.com/sdk/docs/install)"
exec "${command[@]}"
