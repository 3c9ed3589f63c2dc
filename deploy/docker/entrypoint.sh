#!/bin/sh
# The image's entry point: `smartpush` with the container's arguments, after emptying the folder that
# prometheus-client's multiprocess mode writes to. Counters of processes that are gone are summed for
# ever, so the folder must start empty every time (prometheus-client's and Dramatiq's docs); it is a
# tmpfs of this container in the compose file and the Kubernetes manifests.
set -eu
if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
  mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
  find "$PROMETHEUS_MULTIPROC_DIR" -mindepth 1 -delete
fi
exec smartpush "$@"
