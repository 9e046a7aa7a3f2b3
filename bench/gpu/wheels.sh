#!/usr/bin/env bash
# `make gpu-wheels`: the wheels bench/gpu/check.sh installs on a bare GPU machine that has Python 3.12, torch,
# h5py, mpi4py, scikit-learn, matplotlib and tqdm but no package index. Into .whl/ (ignored by git, carried
# with the working tree): nflows and zarr with zarr's dependencies, and pytest with its own, at the versions this environment runs,
# for CPython 3.12 on manylinux x86_64 (the nflows wheel is built here:
# it is published as a source archive only). nflows comes without its declared tensorboard/umnn, which it never
# imports. numpy is carried in case the machine's is older than zarr's >= 2.0.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
LIMIT_MIB=40
pins=$("$PY" - <<'PY'
from importlib.metadata import version
names = ["zarr", "numcodecs", "donfig", "google-crc32c", "pyyaml", "packaging", "typing-extensions",
         "numpy", "pytest", "pluggy", "iniconfig", "pygments"]
print(" ".join(f"{n}=={version(n)}" for n in names))
PY
)
rm -rf .whl && mkdir -p .whl
nflows=$("$PY" -c 'from importlib.metadata import version; print(version("nflows"))')
"$PY" -m pip wheel --quiet --no-deps --wheel-dir .whl "nflows==$nflows"
# shellcheck disable=SC2086
"$PY" -m pip download --quiet --dest .whl --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 $pins
size=$(du -sm .whl | cut -f1)
ls -1 .whl
echo "gpu wheels: $(ls .whl | wc -l) files, ${size} MiB in .whl/ (limit ${LIMIT_MIB} MiB)"
if (( size > LIMIT_MIB )); then
    echo "error: .whl/ is ${size} MiB, over the ${LIMIT_MIB} MiB a device run may carry" >&2
    exit 1
fi
