#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice for jaxcl.
#   tpu/create.sh NAME [ZONE] [ACCELERATOR] [RUNTIME]
# e.g. tpu/create.sh jaxcl-v4 us-central2-b v4-32 tpu-ubuntu2204-base
set -euo pipefail
name=${1:?usage: tpu/create.sh NAME [ZONE] [ACCELERATOR] [RUNTIME]}
zone=${2:-us-central2-b}
accelerator=${3:-v4-8}
runtime=${4:-tpu-ubuntu2204-base}
gcloud compute tpus tpu-vm create "$name" \
  --zone="$zone" --accelerator-type="$accelerator" --version="$runtime"
