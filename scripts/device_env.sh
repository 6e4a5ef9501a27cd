#!/usr/bin/env bash
# Source this on a lent GPU machine (see scripts/fetch_device_wheels.sh): installs the carried wheels
# into /tmp/site and puts them and the repository on PYTHONPATH; `python3 -m pdserve.cli` is the CLI.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
export NCCL_NVLS_ENABLE=0
export PDSERVE_CACHE=/tmp/pdserve-cache
