#!/usr/bin/env bash
# Builds the flex templates' image with Cloud Build and writes both template specs to Cloud Storage.
#
# Usage: templates/build.sh
# Environment (required):
#   PROJECT       Google Cloud project of the registry, the build and the bucket
#   REGION        region of the Artifact Registry repository (e.g. us-central1)
#   REPOSITORY    Artifact Registry Docker repository (created beforehand)
#   BUCKET        Cloud Storage bucket (name only) that receives the template specs
# Environment (optional):
#   IMAGE_TAG     image tag (default: the current git commit, or a timestamp outside git)
#   TEMPLATE_PATH gs:// prefix of the specs (default gs://$BUCKET/templates/engagement-pipeline/$IMAGE_TAG);
#                 streaming.json and backfill.json are written under it
# Needs gcloud, authenticated, with Cloud Build, Artifact Registry and Storage permissions. The images carry the
# expansion service jars, so a launch downloads nothing; see README.md, "Deploy on Dataflow".
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}
die() {
  printf 'build.sh: error: %s\n' "$*" >&2
  exit 2
}
require() {
  local name
  for name in "$@"; do
    [ -n "${!name:-}" ] || die "$name is not set (see templates/build.sh --help)"
  done
}

case "${1:-}" in
  -h | --help) usage ;;
  "") ;;
  *) die "unexpected argument '$1' (configuration is by environment variables; see --help)" ;;
esac
require PROJECT REGION REPOSITORY BUCKET
command -v gcloud >/dev/null 2>&1 || die "gcloud is required (https://cloud.google.com/sdk/docs/install)"

# The one Beam pin: the image's SDK boot loader and expansion services must match the Python SDK.
beam_version="$(sed -n 's/^apache-beam\(\[[a-z,]*\]\)\{0,1\}==\(.*\)$/\2/p' "$repo/requirements.txt")"
[ -n "$beam_version" ] || die "no apache-beam pin found in requirements.txt"

image_tag="${IMAGE_TAG:-$(git -C "$repo" rev-parse --short=12 HEAD 2>/dev/null || date -u +%Y%m%d-%H%M%S)}"
registry="$REGION-docker.pkg.dev/$PROJECT/$REPOSITORY"
streaming_image="$registry/engagement-streaming:$image_tag"
backfill_image="$registry/engagement-backfill:$image_tag"
template_path="${TEMPLATE_PATH:-gs://$BUCKET/templates/engagement-pipeline/$image_tag}"
template_path="${template_path%/}"
[[ "$template_path" == gs://* ]] || die "TEMPLATE_PATH must start with gs:// (got $template_path)"

printf 'build.sh: building %s and %s (Beam %s)\n' "$streaming_image" "$backfill_image" "$beam_version"
gcloud builds submit "$repo" \
  --project "$PROJECT" \
  --region "$REGION" \
  --config "$repo/templates/cloudbuild.yaml" \
  --substitutions "_STREAMING_IMAGE=$streaming_image,_BACKFILL_IMAGE=$backfill_image,_BEAM_VERSION=$beam_version"

gcloud dataflow flex-template build "$template_path/streaming.json" \
  --project "$PROJECT" \
  --image "$streaming_image" \
  --sdk-language PYTHON \
  --metadata-file "$repo/templates/metadata.json"

gcloud dataflow flex-template build "$template_path/backfill.json" \
  --project "$PROJECT" \
  --image "$backfill_image" \
  --sdk-language PYTHON \
  --metadata-file "$repo/templates/backfill-metadata.json"

printf 'build.sh: templates %s/{streaming,backfill}.json\n' "$template_path"
printf 'build.sh: launch with IMAGE_TAG=%s TEMPLATE_PATH=%s templates/run.sh streaming|backfill\n' \
  "$image_tag" "$template_path"
