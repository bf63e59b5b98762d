#!/usr/bin/env bash
# Fill .whl/ with the wheels bench/gpu_check.sh installs on a GPU machine that has PyTorch with CUDA but no
# package registry (the lent H200: torch 2.11+cu130, Python 3.12; no deepspeed, bitsandbytes, pydantic).
# Run it here, where pip reaches PyPI:   bash bench/gpu_wheels.sh [CUDA_VERSION, default 130]
# DeepSpeed publishes source only: it is built into a pure-Python wheel (its ops compile on first use).
# bitsandbytes ships a kernel library for every CUDA, ROCm and XPU version (43 MB); only CUDA_VERSION's and
# the CPU one are kept, so that the repository and .whl/ travel within the device tool's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA_VERSION="${1:-130}"
PY="${PYTHON:-.venv/bin/python}"
OUT=.whl
mkdir -p "$OUT"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
pin() { sed -n "s/^ *$1==\([^ ]*\)$/\1/p" setup.cfg; }  # a version pinned in setup.cfg
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d "$OUT" "bitsandbytes==$(pin bitsandbytes)" pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 hjson==3.1.0
if ! ls "$OUT"/deepspeed-*.whl >/dev/null 2>&1; then
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "deepspeed==$(pin deepspeed)"
fi
# Slim bitsandbytes: drop the other CUDA versions' libraries and their RECORD lines.
"$PY" - "$OUT" "$CUDA_VERSION" <<'EOF'
import re, sys, zipfile
from pathlib import Path
out, cuda = Path(sys.argv[1]), sys.argv[2]
for wheel in out.glob("bitsandbytes-*.whl"):
    with zipfile.ZipFile(wheel) as src:
        keep = [n for n in src.namelist() if not re.search(r"libbitsandbytes_\w+\.so$", n)
                or n.endswith(("_cpu.so", f"_cuda{cuda}.so"))]
        if len(keep) == len(src.namelist()):
            continue
        slim = wheel.with_suffix(".slim")
        with zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
            for name in keep:
                data = src.read(name)
                if name.endswith(".dist-info/RECORD"):
                    data = "".join(line for line in data.decode().splitlines(keepends=True)
                                   if line.split(",")[0] in keep or line.split(",")[0].endswith("RECORD")).encode()
                dst.writestr(name, data)
    slim.replace(wheel)
    print(f"{wheel.name}: kept CUDA {cuda} and CPU libraries, {wheel.stat().st_size / 2**20:.1f} MB")
EOF
du -sh "$OUT"
