#!/usr/bin/env bash
# Type-check the installed namespace with mypy (`make lint`). In the repository the packages
# are the folders ftune/, models/, service/ and workers/; installed, they are ftune,
# ftune.models, ftune.service and ftune.workers. mypy cannot map folders to package names, so
# this lays out that namespace as links under .venv/typecheck and maps the paths it reports
# back to the repository's. Extra arguments go to mypy.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
tree=$root/.venv/typecheck
mkdir -p "$tree/ftune"
find "$tree/ftune" -maxdepth 1 -type l ! -exec test -e {} \; -delete  # links to removed files
for entry in ftune/*; do
  [ "$(basename "$entry")" = __pycache__ ] || ln -sfn "$root/$entry" "$tree/ftune/"
done
for part in models service workers; do
  ln -sfn "$root/$part" "$tree/ftune/$part"
done
out=$(mktemp)
trap 'rm -f "$out"' EXIT
cd "$tree"
status=0
"$root/.venv/bin/python" -m mypy --config-file "$root/pyproject.toml" \
  --python-executable "$root/.venv/bin/python" --cache-dir "$root/.venv/mypy-cache" \
  --sqlite-cache -p ftune "$@" > "$out" 2>&1 || status=$?
sed -E 's#^ftune/(models|service|workers)/#\1/#' "$out"
exit $status
