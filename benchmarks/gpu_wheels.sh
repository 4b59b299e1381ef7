#!/usr/bin/env bash
# Prepare, on this machine, the files an offline GPU machine that has only PyTorch (Python
# 3.12, x86_64) needs to run the project: diffusers, deepspeed, a trimmed ray and their
# missing dependencies, in a git-ignored folder (default .whl/, about 45 MB). Run it from the
# repository root with the project's python (torch must import: deepspeed's wheel is built
# against it):
#
#   benchmarks/gpu_wheels.sh [DEST]
#
# Then, on the GPU machine, from the repository root and before anything else:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && tar xJf .whl/ray-slim.tar.xz -C /tmp/site && \
#   export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 \
#          RAY_AUTH_MODE=disabled || exit
#
# Why it looks like this (seen on an H200, torch 2.11 + CUDA 13, Python 3.12):
# - the ray wheel is 79 MB; without its Java jars and rllib and packed with xz it is ~32 MB,
#   and Ray Train + DeepSpeed ZeRO-2 run from it;
# - that machine sets TORCH_CUDA_ARCH_LIST=9.0a, which deepspeed 0.19 fails to parse; 9.0 works;
# - deepspeed JIT-compiles its fused AdamW at first use unless the config says torch_adam;
# - mlflow is left out: set tracking.enabled=false for runs there.
set -euo pipefail
PY=${PYTHON:-python3}
DEST=${1:-.whl}
version() { $PY -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo "$2"; }
RAY_VERSION=${RAY_VERSION:-$(version ray 2.60.0)}
DIFFUSERS_VERSION=${DIFFUSERS_VERSION:-$(version diffusers 0.42.1)}
DEEPSPEED_VERSION=${DEEPSPEED_VERSION:-$(version deepspeed 0.19.8)}

mkdir -p "$DEST"
# Keep the folder out of git without touching .gitignore.
if [ -d .git ] && ! grep -qx "/$DEST/" .git/info/exclude 2>/dev/null; then
  echo "/$DEST/" >>.git/info/exclude
fi
TARGET=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64)
$PY -m pip download -q "${TARGET[@]}" -d "$DEST" "diffusers==$DIFFUSERS_VERSION" \
  importlib_metadata jsonschema jsonschema-specifications referencing rpds-py tensorboardX \
  pydantic pydantic-core annotated-types typing-inspection hjson

# deepspeed is published as an sdist: build a pure-Python wheel (its ops JIT-build there).
if ! ls "$DEST"/deepspeed-"$DEEPSPEED_VERSION"-*.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" \
    "deepspeed==$DEEPSPEED_VERSION"
fi

# ray: drop what a Python training or serving job never loads, repack with xz.
if [ ! -f "$DEST/ray-slim.tar.xz" ]; then
  work=$(mktemp -d)
  $PY -m pip download -q "${TARGET[@]}" -d "$work" "ray==$RAY_VERSION" >/dev/null
  (cd "$work" && unzip -q ray-*.whl && rm -rf ray/jars ray/rllib ray-*.whl &&
    tar cf - ray ray-*.dist-info | xz -T0 -6 >ray-slim.tar.xz)
  mv "$work/ray-slim.tar.xz" "$DEST/"
  rm -rf "$work"
fi
du -sh "$DEST"
