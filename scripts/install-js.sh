#!/usr/bin/env bash
# Install the Node.js dependencies of tests/js from its package-lock.json.
# Safe to rerun because npm ci replaces tests/js/node_modules each time. With
# --prefer-offline, packages already in ~/.cache/npm are not downloaded again.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
js_dir="${repo_root}/tests/js"

for tool in node npm; do
  if ! command -v "${tool}" >/dev/null 2>&1; then
    echo "install-js.sh: ${tool} not found on PATH. Install Node.js 20 with npm and rerun." >&2
    exit 1
  fi
done

# --ignore-scripts skips the postinstall script of @scarf/scarf, a dependency
# of nakama-js whose script sends install analytics. No package here needs a
# build step.
log_file="$(mktemp)"
trap 'rm -f "${log_file}"' EXIT
if ! (cd "${js_dir}" && npm ci --cache "${HOME}/.cache/npm" --prefer-offline --no-audit --no-fund \
  --ignore-scripts) >"${log_file}" 2>&1; then
  cat "${log_file}" >&2
  echo "install-js.sh: npm ci failed in ${js_dir}. The npm output is above." >&2
  exit 1
fi
