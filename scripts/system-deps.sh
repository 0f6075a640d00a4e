#!/usr/bin/env bash
# Installs the Debian packages the project needs, only when one is missing.
#   Java (METEOR, the PTB tokenizer), Chromium (browser tests), Prometheus and promtool (the stack's
#   Prometheus, the rollout analysis, rule checks),
#   podman, buildah, runc, catatonit, debootstrap (images and containers), haproxy (spreads
#   requests over model servers), PostgreSQL (shared stores in the robustness and scale-out tests).
# kubectl (the Kustomize render test) is not a Debian 12 package: it is used where the machine
# has it, and the render test says how to get it where it does not.
set -euo pipefail
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
need=()
command -v java >/dev/null || need+=(default-jre-headless)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
command -v prometheus >/dev/null || need+=(prometheus)
command -v podman >/dev/null || need+=(podman)
command -v buildah >/dev/null || need+=(buildah)
command -v runc >/dev/null || need+=(runc)
command -v catatonit >/dev/null || need+=(catatonit)
command -v debootstrap >/dev/null || need+=(debootstrap)
[ -x /usr/sbin/haproxy ] || need+=(haproxy)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing Debian packages: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian starts a cluster on install; the tests start their own servers on free ports.
if command -v systemctl >/dev/null && systemctl is-active --quiet postgresql 2>/dev/null; then
    $SUDO systemctl stop postgresql || true
fi
command -v kubectl >/dev/null || echo "note: kubectl is missing (not a Debian 12 package): the Kustomize render test needs it"
