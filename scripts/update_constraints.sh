#!/usr/bin/env bash
# Re-resolve the pinned versions: a fresh venv gets the newest releases that pyproject.toml
# allows, the test suite must pass on them, then constraints.txt records them.
#   bash scripts/update_constraints.sh && .venv/bin/python -m pytest   # then commit constraints.txt
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q -e '.[test]'
{
  echo "# Versions the test suite passed with; every install in README.md and .ci/run uses them (pip -c)."
  echo "# Regenerate: bash scripts/update_constraints.sh. torch has no local tag, so a CUDA build of the"
  echo "# same version satisfies it on GPU machines."
  "$venv/bin/pip" freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/' | grep -v '^fp-ray'
} > constraints.txt
rm -rf "$(dirname "$venv")"
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pins"
