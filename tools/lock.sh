#!/usr/bin/env bash
# Refresh the locks of exact versions with hashes (`make lock`). They are made on, and for,
# Linux x86_64 with CPython 3.11, where PyPI's torch wheel is the CUDA build.
#   requirements.lock         what the service needs, ftune[server] (the Dockerfile installs it)
#   requirements-dev.lock     that plus the test tools (make up, make test)
#   requirements-nodeps.lock  two packages installed without their dependencies: their
#                             metadata pins torch 1.6 and tensorflow; we need only the files
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
platform="# Platform: Linux x86_64, CPython 3.11, torch with CUDA (PyPI's x86_64 wheels)."
export CUSTOM_COMPILE_COMMAND="make lock"
compile() {
  .venv/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
    --no-emit-index-url --no-emit-find-links "$@"
}
stamp() { sed -i "1a $platform" "$1"; }

"$py" -m pip install --quiet pip-tools==7.6.2
compile --upgrade --extra server --extra test --output-file requirements-dev.lock pyproject.toml
stamp requirements-dev.lock
compile --constraint requirements-dev.lock --extra server --output-file requirements.lock \
  pyproject.toml
stamp requirements.lock

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$py" -m pip download --quiet --no-deps --dest "$work" "$@"
{
  echo "# Installed with --no-deps (see tools/lock.sh); refreshed by \`make lock\`."
  echo "$platform"
  for spec in "$@"; do
    name=${spec%%==*}
    file=$(ls "$work" | grep -i "^${name//-/_}-")
    echo "$spec \\"
    echo "    $("$py" -m pip hash "$work/$file" | tail -n 1)"
  done
} > requirements-nodeps.lock
