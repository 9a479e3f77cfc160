#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Set up everything sage_ros needs on a machine without a ROS 2 distribution, in ./.venv:
# ROS 2 Kilted wheels, torch/timm and the rest (pinned in constraints.txt), sage_ros_msgs
# built with cmake into the venv, and sage_ros installed editable. Idempotent and fast when
# nothing changed: a stamp records a hash of every input. Everything comes from package
# registries (PyPI here); colcon is among it, for the test that builds a clean copy.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${SAGE_ROS_VENV:-$root/.venv}
python=${PYTHON:-python3}
stamp=$venv/.sage_ros_stamp
build=$root/build/sage_ros_msgs

inputs_hash() {
  (cd "$root" && cat requirements.txt constraints.txt scripts/bootstrap.sh \
     sage_ros_msgs/package.xml sage_ros_msgs/CMakeLists.txt sage_ros_msgs/msg/*.msg \
     sage_ros/setup.py sage_ros/setup.cfg) | sha256sum | cut -d' ' -f1
}

want=$(inputs_hash)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi

log() { printf '[bootstrap] %s\n' "$*" >&2; }

# Several ./dev commands may start at once (parallel shells, tests spawning ./dev): one builds,
# the others wait for it and then find the stamp current.
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi

if [[ ! -x $venv/bin/python ]]; then
  log "creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
log "installing pinned packages (first run downloads about 5 GB: torch's CUDA build, used on the CPU)"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  -r "$root/requirements.txt" -c "$root/constraints.txt"

# The published message wheels export CMake targets naming include directories of the machine
# they were built on; point them at this venv's interpreter and numpy instead.
py_inc=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
np_inc=$("$venv/bin/python" -c 'import numpy; print(numpy.get_include())')
{ grep -rlZ '/opt/python/cp311-cp311' "$venv/share" --include='*.cmake' 2>/dev/null || true; } \
  | xargs -0 -r sed -i \
      -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#$np_inc#g" \
      -e "s#/opt/python/cp311-cp311/include/python3.11#$py_inc#g"

log "building sage_ros_msgs into the venv"
rm -rf "$build"
mkdir -p "$build"
(
  export PATH=$venv/bin:$PATH CMAKE_PREFIX_PATH=$venv AMENT_PREFIX_PATH=$venv
  cmake -S "$root/sage_ros_msgs" -B "$build" -DCMAKE_BUILD_TYPE=Release \
    -DPython3_EXECUTABLE="$venv/bin/python" -DCMAKE_INSTALL_PREFIX="$venv" \
    -DBUILD_TESTING=OFF >"$build.log" 2>&1 \
  && make -C "$build" -j"$(nproc)" install >>"$build.log" 2>&1
) || { log "sage_ros_msgs build failed; see $build.log"; tail -30 "$build.log" >&2; exit 1; }

log "installing sage_ros (editable)"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
  -e "$root/sage_ros"

echo "$want" >"$stamp"
log "ready: $venv"
