#!/usr/bin/env bash
# Rewrites constraints.txt from a fresh, unconstrained install of the project with every extra
# but cuda12 (the newest versions the package index offers today), for this machine's Python.
# Run the test suite afterwards before committing the new pins.
#   bash tools/refresh_constraints.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e ".[test,analysis]"
{
  sed -n '1,/^# Try newer/p' constraints.txt
  "$venv/bin/python" -m pip freeze --exclude-editable | grep -iv '^dhmd'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
rm -rf "$(dirname "$venv")"
echo "constraints.txt: $(grep -c '==' constraints.txt) pins"
