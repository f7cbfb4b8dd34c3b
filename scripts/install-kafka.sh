#!/usr/bin/env bash
# Fetch the Apache Kafka broker jars that the tests in tests/kafka run.
#
# Maven resolves org.apache.kafka:kafka_2.13 and its runtime dependencies from
# tests/kafka/pom.xml into ~/.cache/eventrouter/kafka/<version>/libs, with its
# local repository in ~/.cache/m2. Safe to rerun: when libs/ was completed from
# the same pom.xml and version, the script exits without running Maven. It
# prints nothing on success and the whole Maven output on failure.
#
# Usage: install-kafka.sh [--print-libs-dir]
#   --print-libs-dir  print the jar folder's path on stdout after the check
# EVENTROUTER_KAFKA_VERSION overrides the kafka.version property of the pom.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pom="${repo_root}/tests/kafka/pom.xml"

print_libs_dir=false
case "${1:-}" in
  "") ;;
  --print-libs-dir) print_libs_dir=true ;;
  *)
    echo "install-kafka.sh: unknown argument '$1'. Usage: install-kafka.sh [--print-libs-dir]" >&2
    exit 2
    ;;
esac

for tool in java mvn sha256sum flock; do
  if ! command -v "${tool}" >/dev/null 2>&1; then
    echo "install-kafka.sh: ${tool} not found on PATH. Install Java 17+, Maven 3.8+ and coreutils/util-linux, then rerun." >&2
    exit 1
  fi
done

default_version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "${pom}" | head -n 1)"
version="${EVENTROUTER_KAFKA_VERSION:-${default_version}}"
if [ -z "${version}" ]; then
  echo "install-kafka.sh: no <kafka.version> found in ${pom} and EVENTROUTER_KAFKA_VERSION is not set." >&2
  exit 1
fi

cache_dir="${HOME}/.cache/eventrouter/kafka/${version}"
libs_dir="${cache_dir}/libs"
# The stamp stores the pom's hash and the version that libs/ was built from.
stamp_file="${cache_dir}/libs.sha256"
mkdir -p "${cache_dir}"

# Serialize parallel runs (e.g. two pytest processes) on the same version.
exec 9>"${cache_dir}/.lock"
flock 9

expected_stamp="$(sha256sum "${pom}" | cut -d ' ' -f 1) ${version}"
if [ -d "${libs_dir}" ] && [ -f "${stamp_file}" ] && [ "$(cat "${stamp_file}")" = "${expected_stamp}" ]; then
  if "${print_libs_dir}"; then
    echo "${libs_dir}"
  fi
  exit 0
fi

staging_dir="$(mktemp -d "${cache_dir}/libs.staging.XXXXXX")"
log_file="$(mktemp)"
trap 'rm -rf "${staging_dir}" "${log_file}"' EXIT

# The dependency plugin writes only to the staging folder and ~/.cache/m2,
# so the repository tree stays clean.
if ! mvn --batch-mode --no-transfer-progress -Dstyle.color=never \
  --file "${pom}" \
  -Dmaven.repo.local="${HOME}/.cache/m2" \
  -Dkafka.version="${version}" \
  dependency:copy-dependencies \
  -DincludeScope=runtime \
  -DoutputDirectory="${staging_dir}" >"${log_file}" 2>&1; then
  cat "${log_file}" >&2
  echo "install-kafka.sh: Maven failed to resolve org.apache.kafka:kafka_2.13:${version} from ${pom}. The Maven output is above." >&2
  exit 1
fi

if [ ! -f "${staging_dir}/kafka_2.13-${version}.jar" ]; then
  cat "${log_file}" >&2
  echo "install-kafka.sh: Maven succeeded but kafka_2.13-${version}.jar is missing from ${staging_dir}. The Maven output is above." >&2
  exit 1
fi

rm -rf "${libs_dir}"
mv "${staging_dir}" "${libs_dir}"
echo "${expected_stamp}" >"${stamp_file}"

if "${print_libs_dir}"; then
  echo "${libs_dir}"
fi
