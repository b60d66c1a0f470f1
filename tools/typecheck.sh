#!/usr/bin/env bash
# Type-check the installed namespace with mypy (`make lint`). In the repository the packages
# are the folders ftune/, models/, service/ and workers/; installed, they are ftune,
# ftune.models, ftune.service and ftune.workers. mypy cannot map folders to package names, so
# this lays out that namespace as links under .venv/typecheck and maps the paths it reports
# back to the repository's.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
tree=.venv/typecheck
rm -rf "$tree"
mkdir -p "$tree/ftune"
for entry in ftune/*; do
  case $(basename "$entry") in __pycache__) continue ;; esac
  ln -s "$root/$entry" "$tree/ftune/"
done
for part in models service workers; do
  ln -s "$root/$part" "$tree/ftune/$part"
done
cd "$tree"
set +e
"$root/.venv/bin/python" -m mypy --config-file "$root/pyproject.toml" \
  --python-executable "$root/.venv/bin/python" --cache-dir "$root/.venv/mypy-cache" \
  -p ftune "$@" > mypy.out 2>&1
status=$?
set -e
sed -E 's#^ftune/(models|service|workers)/#\1/#' mypy.out
exit $status
