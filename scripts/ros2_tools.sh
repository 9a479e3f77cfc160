#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Install ROS 2's own Python tools into the venv for the tests: colcon (PyPI, pinned in
# constraints.txt) and, from the vendored sources in ../shared/vendor/ros2-python (no registry
# has them; never copied into this repository), launch, launch_ros, ros2launch,
# ros2cli with its verbs, rosidl_runtime_py and composition_interfaces (built with cmake like
# sage_ros_msgs). Run by scripts/bootstrap.sh after the main setup. Idempotent: a stamp
# records a hash of the inputs. Without the vendored folder it does nothing (the tests that
# need the tools then skip, or fail when CI=true); a failed install only warns, except in CI.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${SAGE_ROS_VENV:-$root/.venv}
vendor=${SAGE_ROS_VENDOR:-$root/../shared/vendor/ros2-python}
stamp=$venv/.ros2_tools_stamp

[[ -d $vendor/ros2cli ]] || exit 0
vendor=$(cd "$vendor" && pwd)

inputs_hash() {
  { (cd "$root" && cat requirements-ros2-tools.txt constraints.txt scripts/ros2_tools.sh)
    (cd "$vendor" && find . -type f -not -path '*/build/*' -not -path '*.egg-info/*' -printf '%P %s %T@\n' | sort)
  } | sha256sum | cut -d' ' -f1
}
want=$(inputs_hash)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi

log() { printf '[ros2-tools] %s\n' "$*" >&2; }
exec 8>"$venv.ros2_tools.lock"
flock 8
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi

fail() {
  log "$1"
  if [[ ${CI:-} == true ]]; then exit 1; fi
  log "continuing without them: the tests that run ros2 launch / ros2 param / colcon will skip"
  exit 0
}

py=$venv/bin/python
pip=("$py" -m pip install --quiet --disable-pip-version-check)
log "installing colcon and the tools' PyPI dependencies"
"${pip[@]}" -r "$root/requirements-ros2-tools.txt" -c "$root/constraints.txt" || fail "pip install failed"

log "installing launch, launch_ros, ros2cli and its verbs from $vendor"
# Not launch_testing, launch_pytest, launch_testing_ros: the tests run the real tools as
# processes with plain pytest, and those register pytest plugins that pytest 9 refuses.
folders=(launch launch_xml launch_yaml launch_ros ros2launch
         ros2cli ros2param ros2topic ros2node ros2pkg ros2run ros2service ros2interface rosidl_runtime_py)
# Built from a copy: setuptools writes build/ and *.egg-info into the folder it builds, and
# ../shared may be read-only (and must stay as it is).
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for f in "${folders[@]}" composition_interfaces; do
  [[ -d $vendor/$f ]] || fail "no $f under $vendor"
  cp -r "$vendor/$f" "$work/$f"
  rm -rf "$work/$f/build" "$work/$f"/*.egg-info
done
# Installed as distributions (not PYTHONPATH): ros2cli finds its verbs, launch its frontends,
# through entry points. --no-deps: their dependencies are the ROS wheels already here.
(cd "$work" && "${pip[@]}" --no-deps --no-build-isolation "${folders[@]/#/./}") >"$work/pip.log" 2>&1 \
  || { tail -30 "$work/pip.log" >&2; fail "installing the vendored tools failed"; }

ci_src=$work/composition_interfaces
build=$root/build/composition_interfaces
log "building composition_interfaces into the venv"
rm -rf "$build"
mkdir -p "$build"
(
  export PATH=$venv/bin:$PATH CMAKE_PREFIX_PATH=$venv AMENT_PREFIX_PATH=$venv
  cmake -S "$ci_src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE="$py" \
    -DCMAKE_INSTALL_PREFIX="$venv" -DBUILD_TESTING=OFF >"$build.log" 2>&1 \
  && make -C "$build" -j"$(nproc)" install >>"$build.log" 2>&1
) || { tail -30 "$build.log" >&2; fail "composition_interfaces build failed; see $build.log"; }

echo "$want" >"$stamp"
log "ready: ros2, colcon"
