#!/usr/bin/env bash
# Build the pinned control-plane binaries for the local test cluster into
# $CLUSTER_BIN (default .cluster/bin), one folder per component and version.
# A binary that already exists is not rebuilt, so a second run returns at once.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin_root=${CLUSTER_BIN:-$root/.cluster/bin}

kubernetes_version=v1.36.3
etcd_version=v3.6.16
kwok_version=v0.8.0

export CGO_ENABLED=0 GOFLAGS=-buildvcs=false

# build NAME VERSION MODULE_DIR PACKAGE [LDFLAGS]
build() {
  local name=$1 version=$2 module_dir=$3 package=$4 ldflags=${5:-}
  local out="$bin_root/$version/$name"
  if [[ -x $out ]]; then
    return 0
  fi
  mkdir -p "$bin_root/$version"
  echo "building $name $version" >&2
  local started=$SECONDS
  (cd "$module_dir" && go build -trimpath -ldflags "-s -w $ldflags" -o "$out.tmp" "$package")
  mv "$out.tmp" "$out"
  echo "built $name $version in $((SECONDS - started)) s" >&2
}

minor=${kubernetes_version#v1.}
minor=${minor%%.*}
stamp=""
for package in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  stamp+=" -X $package.gitVersion=$kubernetes_version"
  stamp+=" -X $package.gitMajor=1 -X $package.gitMinor=$minor"
  stamp+=" -X $package.gitTreeState=clean"
  stamp+=" -X $package.buildDate=1970-01-01T00:00:00Z"
done

build etcd "$etcd_version" "$here/etcd" go.etcd.io/etcd/server/v3
build kwok "$kwok_version" "$here/kwok" sigs.k8s.io/kwok/cmd/kwok
for command in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  build "$command" "$kubernetes_version" "$here/kubernetes" "k8s.io/kubernetes/cmd/$command" "$stamp"
done

# Stable names for scripts: .cluster/bin/<command> links to the pinned build.
for pair in "etcd $etcd_version" "kwok $kwok_version" \
  "kube-apiserver $kubernetes_version" "kube-controller-manager $kubernetes_version" \
  "kube-scheduler $kubernetes_version" "kubectl $kubernetes_version"; do
  set -- $pair
  ln -sfn "$2/$1" "$bin_root/$1"
done
