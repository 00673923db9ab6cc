#!/usr/bin/env bash
# A health check that really infers: POST an all-zero uint8 image to the littlebig cascade over the
# KServe v2 REST protocol and fail unless HTTP 200 comes back with a LABEL output. Readiness alone is
# not enough: a Python-backend stub that died leaves the model "ready" while every request fails.
# threshold 1 escalates the image, so the answer proves little, big and the BLS model all work.
#
# Environment (all optional): HOST (127.0.0.1), PORT (8000), MODEL (littlebig), IMAGE_SHAPE (H,W,C of
# the service size: 28,28,1), TIMEOUT (seconds, 5). Needs bash, awk and curl (all in the NGC image).
set -euo pipefail

host=${HOST:-127.0.0.1}
port=${PORT:-8000}
model=${MODEL:-littlebig}
shape=${IMAGE_SHAPE:-28,28,1}
timeout=${TIMEOUT:-5}

if ! [[ $shape =~ ^[1-9][0-9]*,[1-9][0-9]*,[1-9][0-9]*$ ]]; then
  echo "healthcheck: IMAGE_SHAPE must be H,W,C (e.g. 28,28,1), got '$shape'" >&2
  exit 2
fi
IFS=, read -r h w c <<<"$shape"

body=$(mktemp)
reply=$(mktemp)
trap 'rm -f "$body" "$reply"' EXIT
awk -v n=$((h * w * c)) -v shape="1,$shape" 'BEGIN {
  printf "{\"inputs\":[{\"name\":\"IMAGE\",\"shape\":[%s],\"datatype\":\"UINT8\",\"data\":[", shape
  for (i = 1; i < n; i++) printf "0,"
  printf "0]}],\"outputs\":[{\"name\":\"LABEL\"}],\"parameters\":{\"threshold\":1}}"
}' >"$body"

code=$(curl -sS -o "$reply" -w '%{http_code}' --max-time "$timeout" \
  -H 'Content-Type: application/json' --data-binary "@$body" \
  "http://$host:$port/v2/models/$model/infer") || {
  echo "healthcheck: no answer from http://$host:$port/v2/models/$model/infer" >&2
  exit 1
}
if [[ $code != 200 ]]; then
  echo "healthcheck: HTTP $code from $model: $(head -c 300 "$reply")" >&2
  exit 1
fi
if ! grep -Eq '"name" *: *"LABEL"' "$reply"; then
  echo "healthcheck: no LABEL output in the reply: $(head -c 300 "$reply")" >&2
  exit 1
fi
echo "healthcheck: $model answered (image $shape)"
