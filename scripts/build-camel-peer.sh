#!/usr/bin/env bash
# Build the Apache Camel peer of bench/kafka_e2e.py (bench/peers/camel).
#
# Maven compiles the peer and copies it with its runtime dependencies into
# ~/.cache/eventrouter/camel-peer/<hash>/libs, with its local repository in
# ~/.cache/m2. <hash> is the SHA-256 of pom.xml and every file under src/, so
# a rerun with unchanged sources exits without running Maven, and a changed
# source gets a folder of its own. Maven's build folder is a temporary folder,
# so the repository tree stays clean. The script prints nothing on success
# and the whole Maven output on failure.
#
# Usage: build-camel-peer.sh [--print-libs-dir]
#   --print-libs-dir  print the jar folder's path on stdout after the check
# Run the peer with: java -cp '<libs dir>/*' eventrouter.bench.camel.CamelPeer \
#   --port PORT --bootstrap HOST:PORT --topic TOPIC [--parallel]
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
project_dir="${repo_root}/bench/peers/camel"

print_libs_dir=false
case "${1:-}" in
  "") ;;
  --print-libs-dir) print_libs_dir=true ;;
  *)
    echo "build-camel-peer.sh: unknown argument '$1'. Usage: build-camel-peer.sh [--print-libs-dir]" >&2
    exit 2
    ;;
esac

for tool in java mvn sha256sum flock; do
  if ! command -v "${tool}" >/dev/null 2>&1; then
    echo "build-camel-peer.sh: ${tool} not found on PATH. Install Java 17+, Maven 3.8+ and coreutils/util-linux, then rerun." >&2
    exit 1
  fi
done

if [ ! -f "${project_dir}/pom.xml" ] || [ ! -d "${project_dir}/src" ]; then
  echo "build-camel-peer.sh: ${project_dir} has no pom.xml or src/ folder." >&2
  exit 1
fi

# Hash the file list and contents with paths relative to the project, so the
# key does not depend on where the repository is checked out.
source_hash="$(
  cd "${project_dir}" &&
    find pom.xml src -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c 1-16
)"
cache_dir="${HOME}/.cache/eventrouter/camel-peer/${source_hash}"
libs_dir="${cache_dir}/libs"
mkdir -p "${cache_dir}"

# Serialize parallel runs on the same sources.
exec 9>"${cache_dir}/.lock"
flock 9

# libs/ appears only through the rename below, so when it exists it is complete.
if [ -d "${libs_dir}" ]; then
  if "${print_libs_dir}"; then
    echo "${libs_dir}"
  fi
  exit 0
fi

staging_dir="$(mktemp -d "${cache_dir}/staging.XXXXXX")"
log_file="$(mktemp)"
trap 'rm -rf "${staging_dir}" "${log_file}"' EXIT

if ! mvn --batch-mode --no-transfer-progress -Dstyle.color=never \
  --file "${project_dir}/pom.xml" \
  -Dmaven.repo.local="${HOME}/.cache/m2" \
  -Dcamel.peer.build.dir="${staging_dir}/build" \
  package \
  dependency:copy-dependencies \
  -DincludeScope=runtime \
  -DoutputDirectory="${staging_dir}/libs" >"${log_file}" 2>&1; then
  cat "${log_file}" >&2
  echo "build-camel-peer.sh: Maven failed to build ${project_dir}. The Maven output is above." >&2
  exit 1
fi

peer_jar="${staging_dir}/build/camel-peer.jar"
if [ ! -f "${peer_jar}" ] || ! ls "${staging_dir}"/libs/camel-main-*.jar >/dev/null 2>&1; then
  cat "${log_file}" >&2
  echo "build-camel-peer.sh: Maven succeeded but camel-peer.jar or camel-main-*.jar is missing from ${staging_dir}. The Maven output is above." >&2
  exit 1
fi

mv "${peer_jar}" "${staging_dir}/libs/"
mv "${staging_dir}/libs" "${libs_dir}"

if "${print_libs_dir}"; then
  echo "${libs_dir}"
fi
