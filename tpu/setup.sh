#!/usr/bin/env bash
# Install jaxcl (this checkout) on every worker of a TPU VM or pod slice.
#   tpu/setup.sh NAME [ZONE]
set -euo pipefail
name=${1:?usage: tpu/setup.sh NAME [ZONE]}
zone=${2:-us-central2-b}
here=$(cd "$(dirname "$0")/.." && pwd)
archive=$(mktemp -d)/jaxcl.tar.gz
git -C "$here" archive --format=tar.gz -o "$archive" HEAD
gcloud compute tpus tpu-vm scp "$archive" "$name":~/jaxcl.tar.gz --zone="$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command='
  set -e
  mkdir -p ~/jaxcl && tar -xzf ~/jaxcl.tar.gz -C ~/jaxcl
  python3 -m pip install -U pip
  python3 -m pip install "jax[tpu]" -e ~/jaxcl
  python3 -c "import jax; print(jax.process_index(), jax.device_count())"
'
