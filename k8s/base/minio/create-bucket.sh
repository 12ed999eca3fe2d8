#!/bin/sh
# One-shot MinIO set-up, idempotent: the platform's bucket (private), and the platform's own access key with a policy
# limited to that bucket, so that no pod but this one ever holds MinIO's root credentials.
# Run by the Kubernetes Job saev-minio-init (k8s/base/minio/) and by docker-compose's minio-init service, in the
# minio/mc image. Environment:
#   MINIO_ROOT_USER, MINIO_ROOT_PASSWORD   MinIO's administrator (from the minio root Secret / .env)
#   SAEV_S3_ENDPOINT                       host:port of the MinIO API, e.g. saev-minio:9000
#   SAEV_S3_BUCKET                         the bucket to create
#   SAEV_S3_ACCESS_KEY, SAEV_S3_SECRET_KEY the platform's identity: the same values its pods read (Settings)
# Credentials go into a URL: generate them as hex or alphanumerics (docs/deploy.md shows how).
set -eu
: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}" "${SAEV_S3_ENDPOINT:?}" "${SAEV_S3_BUCKET:?}"
: "${SAEV_S3_ACCESS_KEY:?}" "${SAEV_S3_SECRET_KEY:?}"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mcq() { mc --config-dir "$work/mc" --quiet --no-color "$@"; }
export MC_HOST_saev="http://${MINIO_ROOT_USER}:${MINIO_ROOT_PASSWORD}@${SAEV_S3_ENDPOINT}"

tries=0
until mcq ready saev >/dev/null 2>&1; do
  tries=$((tries + 1))
  [ "$tries" -lt 60 ] || { echo "minio-init: MinIO at $SAEV_S3_ENDPOINT not ready after 120 s" >&2; exit 1; }
  sleep 2
done

mcq mb --ignore-existing "saev/$SAEV_S3_BUCKET"
mcq anonymous set none "saev/$SAEV_S3_BUCKET"

cat > "$work/policy.json" <<JSON
{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow", "Action": ["s3:*"],
     "Resource": ["arn:aws:s3:::$SAEV_S3_BUCKET", "arn:aws:s3:::$SAEV_S3_BUCKET/*"]}
  ]
}
JSON
mcq admin policy create saev saev-platform "$work/policy.json"
mcq admin user add saev "$SAEV_S3_ACCESS_KEY" "$SAEV_S3_SECRET_KEY"
# Attaching a policy that is already attached is an error for mc: check first (plain sh: the mc image is minimal).
case "$(mcq admin user info saev "$SAEV_S3_ACCESS_KEY")" in
  *saev-platform*) ;;
  *) mcq admin policy attach saev saev-platform --user "$SAEV_S3_ACCESS_KEY" ;;
esac
echo "minio-init: bucket $SAEV_S3_BUCKET ready; access key $SAEV_S3_ACCESS_KEY limited to it"
