#!/usr/bin/env bash
# Run a recipe on every worker of a TPU VM or pod slice at once. JAXCL_DISTRIBUTED=auto lets JAX
# find the other workers; out_dir must be a folder every worker sees (an NFS/Filestore mount or a
# gcsfuse-mounted bucket): checkpoints are written collectively, results by worker 0.
#   tpu/launch.sh NAME ZONE RECIPE [key=value ...]
# e.g. tpu/launch.sh jaxcl-v4 us-central2-b recipes/quickstart.yaml out_dir=/mnt/shared/qs \
#        mesh.data=1 mesh.fsdp=-1
set -euo pipefail
name=${1:?usage: tpu/launch.sh NAME ZONE RECIPE [key=value ...]}
zone=${2:?zone}
recipe=${3:?recipe}
shift 3
overrides=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
  cd ~/jaxcl && JAXCL_DISTRIBUTED=auto jaxcl run $recipe $overrides
"
