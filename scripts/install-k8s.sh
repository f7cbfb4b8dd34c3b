#!/usr/bin/env bash
# Build the Kubernetes binaries that the tests in tests/k8s run: kube-apiserver,
# etcd and helm.
#
# Each binary comes from the Go module proxy and is built with the machine's Go
# from a small module in tests/k8s/tools/<name>/, whose go.mod and go.sum pin
# every version. The binaries go to ~/.cache/eventrouter/k8s/<kubernetes
# version>/bin. GOMODCACHE and GOCACHE are in ~/.cache/eventrouter/go, so a
# rebuild after a version change downloads and compiles only what changed.
#
# Safe to rerun: a binary whose stamp matches the hash of its go.mod, go.sum,
# build flags and Go version is not rebuilt. The script prints nothing on
# success and the go command's whole output on failure.
#
# To change a version, run `go get <module>@<version> && go mod tidy` in the
# tool's folder. For kube-apiserver, also set every k8s.io/* replace line in
# its go.mod to the matching v0.<minor>.<patch> release, because
# k8s.io/kubernetes requires its staging modules as v0.0.0.
#
# Usage: install-k8s.sh [--print-bin-dir]
#   --print-bin-dir  print the binary folder's path on stdout after the check
# EVENTROUTER_K8S_BUILD_JOBS sets how many packages go build compiles at once
# (default 2). With 2, the largest process of the build peaked at 2.2 GiB of
# memory on a 2-core machine.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools_dir="${repo_root}/tests/k8s/tools"

print_bin_dir=false
case "${1:-}" in
  "") ;;
  --print-bin-dir) print_bin_dir=true ;;
  *)
    echo "install-k8s.sh: unknown argument '$1'. Usage: install-k8s.sh [--print-bin-dir]" >&2
    exit 2
    ;;
esac

for tool in go sha256sum flock awk; do
  if ! command -v "${tool}" >/dev/null 2>&1; then
    echo "install-k8s.sh: ${tool} not found on PATH. Install Go 1.26+, coreutils, util-linux and awk, then rerun." >&2
    exit 1
  fi
done

# Print the version that go.mod in folder $1 requires of module $2.
required_version() {
  awk -v module="$2" '
    $1 == "require" && $2 == module { print $3; exit }
    $1 == module && $2 ~ /^v/ { print $2; exit }
  ' "$1/go.mod"
}

kubernetes_version="$(required_version "${tools_dir}/kube-apiserver" k8s.io/kubernetes)"
etcd_version="$(required_version "${tools_dir}/etcd" go.etcd.io/etcd/server/v3)"
helm_version="$(required_version "${tools_dir}/helm" helm.sh/helm/v4)"
for pair in "kube-apiserver:k8s.io/kubernetes:${kubernetes_version}" \
  "etcd:go.etcd.io/etcd/server/v3:${etcd_version}" \
  "helm:helm.sh/helm/v4:${helm_version}"; do
  IFS=: read -r name module version <<<"${pair}"
  if [ -z "${version}" ]; then
    echo "install-k8s.sh: ${tools_dir}/${name}/go.mod does not require ${module}. Add it with 'go get ${module}@<version>' in that folder." >&2
    exit 1
  fi
done

cache_root="${HOME}/.cache/eventrouter"
bin_dir="${cache_root}/k8s/${kubernetes_version}/bin"
mkdir -p "${bin_dir}"

export GOMODCACHE="${cache_root}/go/mod"
export GOCACHE="${cache_root}/go/build"
# The go.mod files name Go 1.26.0. GOTOOLCHAIN=local makes a too-old Go fail
# with a clear message instead of downloading another toolchain.
export GOTOOLCHAIN=local
export CGO_ENABLED=0
export GOFLAGS="-mod=readonly -buildvcs=false -trimpath -p=${EVENTROUTER_K8S_BUILD_JOBS:-2}"

# Serialize parallel runs (e.g. two pytest processes) on the same folder.
exec 9>"${bin_dir}/.lock"
flock 9

go_version="$(go env GOVERSION)"

# The build in progress writes these, and an interrupted run deletes them.
staging=""
log_file=""
trap 'rm -f "${staging}" "${log_file}"' EXIT

# Build package $3 of the module in tests/k8s/tools/$1 into bin/$2 with the
# linker flags $4, unless bin/$2.sha256 shows that it was built from the same
# inputs.
build_binary() {
  local module_dir="${tools_dir}/$1" binary="$2" package="$3" ldflags="$4"
  local target="${bin_dir}/${binary}"
  local stamp_file="${target}.sha256"
  local expected_stamp
  expected_stamp="$(cat "${module_dir}/go.mod" "${module_dir}/go.sum" \
    <(echo "${ldflags} ${GOFLAGS} ${CGO_ENABLED} ${go_version}") | sha256sum | cut -d ' ' -f 1)"
  if [ -x "${target}" ] && [ -f "${stamp_file}" ] && [ "$(cat "${stamp_file}")" = "${expected_stamp}" ]; then
    return 0
  fi

  staging="$(mktemp "${target}.staging.XXXXXX")"
  log_file="$(mktemp)"
  if ! (cd "${module_dir}" && go build -ldflags "${ldflags}" -o "${staging}" "${package}") \
    >"${log_file}" 2>&1; then
    cat "${log_file}" >&2
    echo "install-k8s.sh: go build of ${package} in ${module_dir} failed. The go command's output is above." >&2
    exit 1
  fi
  mv "${staging}" "${target}"
  echo "${expected_stamp}" >"${stamp_file}"
  rm -f "${log_file}"
  staging=""
  log_file=""
}

# Version stamps as Kubernetes' hack/lib/version.sh and Helm's Makefile set them,
# so `kube-apiserver --version`, /version and `helm version` name the release.
kubernetes_minor="$(echo "${kubernetes_version}" | cut -d . -f 2)"
kubernetes_ldflags="-s -w"
for package in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kubernetes_ldflags+=" -X ${package}.gitVersion=${kubernetes_version}"
  kubernetes_ldflags+=" -X ${package}.gitMajor=1 -X ${package}.gitMinor=${kubernetes_minor}"
  kubernetes_ldflags+=" -X ${package}.gitTreeState=clean"
done
helm_ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=${helm_version}"

build_binary etcd etcd go.etcd.io/etcd/server/v3 "-s -w"
build_binary helm helm helm.sh/helm/v4/cmd/helm "${helm_ldflags}"
build_binary kube-apiserver kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "${kubernetes_ldflags}"

if "${print_bin_dir}"; then
  echo "${bin_dir}"
fi
