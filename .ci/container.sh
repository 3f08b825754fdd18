#!/usr/bin/env bash
# The container image on a CI machine (podman; ../shared/STACK.md, "Containers"):
#   .ci/container.sh setup   podman, runc, debootstrap and podman-compose from Debian (as root)
#   .ci/container.sh base    docker.io/library/debian:bookworm-slim made with debootstrap (no
#                            image registry is reachable here), unless podman already has it
#   .ci/container.sh build   podman build of the Dockerfile as facemoe-edge:latest (layers reused)
#   .ci/container.sh         all three (steps may be combined: .ci/container.sh base build)
# podman reads .ci/containers.conf (runc, cgroupfs, no default ulimits) unless CONTAINERS_CONF
# names another. The build reads the YuNet detector from $FACEMOE_SHARED/models (../shared) and,
# when this machine's pip is configured with local wheel folders or indexes (/etc/pip.conf), lets
# pip in the build use them too (the CPU torch wheel that install.sh would take from the PyTorch
# index is one of them).
set -euo pipefail
cd "$(dirname "$0")/.."
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/.ci/containers.conf}"
image="${FACEMOE_IMAGE:-localhost/facemoe-edge:latest}"
base="docker.io/library/debian:bookworm-slim"
shared="${FACEMOE_SHARED:-$PWD/../shared}"

say() { printf '[container] %s\n' "$*" >&2; }

setup() {
    local missing=()
    command -v podman >/dev/null || missing+=(podman)
    command -v runc >/dev/null || missing+=(runc)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v podman-compose >/dev/null || missing+=(podman-compose)
    # name resolution between compose services on podman 4.3's CNI networks
    [ -x /usr/lib/cni/dnsname ] || missing+=(golang-github-containernetworking-plugin-dnsname)
    ((${#missing[@]})) || return 0
    [ "$(id -u)" = 0 ] || { say "not root: cannot install ${missing[*]}"; return 1; }
    inst() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"; }
    { inst "${missing[@]}" || { apt-get update -qq && inst "${missing[@]}"; }; } >/dev/null
}

make_base() {
    podman image exists "$base" && return 0
    local root
    root="$(mktemp -d /var/tmp/facemoe-rootfs.XXXXXX)"
    say "making $base with debootstrap"
    debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >/dev/null
    # what Debian's own slim image does: no documentation, manuals or translations from later
    # package installs, no downloaded .deb files kept; and its security and update suites
    cat > "$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
    cat > "$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    cat > "$root/etc/apt/sources.list" <<'EOF'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
        "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*
    find "$root/usr/share/doc" -type f ! -name copyright -delete
    tar -C "$root" -c . | podman import -q - "$base" >/dev/null
    rm -rf "$root"
}

build() {
    # docker format: the OCI format has no HEALTHCHECK
    local args=(--pull=never --network host --format docker --build-context "shared=$shared/models"
                -t "$image")
    # pip in the build uses this machine's pip sources and CA bundle (a local CPU torch wheel,
    # local indexes, a TLS-intercepting egress proxy's CA), given as a pip.conf in /etc: the
    # [global] values of pip's config files, then its PIP_* variables (pip's order)
    local conf key value d
    declare -A pipcfg=()
    for f in /etc/xdg/pip/pip.conf /etc/pip.conf "$HOME/.pip/pip.conf" "$HOME/.config/pip/pip.conf"; do
        [ -f "$f" ] || continue
        while IFS='=' read -r key value; do
            key="${key//[[:space:]]/}"
            value="$(printf '%s' "$value" | sed 's/^[[:space:]]*//; s/[[:space:]]*$//')"
            case "$key" in find-links|extra-index-url|index-url|cert) pipcfg[$key]="$value" ;; esac
        done < "$f"
    done
    [ -n "${PIP_FIND_LINKS:-}" ] && pipcfg[find-links]="$PIP_FIND_LINKS"
    [ -n "${PIP_EXTRA_INDEX_URL:-}" ] && pipcfg[extra-index-url]="$PIP_EXTRA_INDEX_URL"
    [ -n "${PIP_INDEX_URL:-}" ] && pipcfg[index-url]="$PIP_INDEX_URL"
    [ -n "${PIP_CERT:-}" ] && pipcfg[cert]="$PIP_CERT"
    conf="$(mktemp /tmp/facemoe-pip.XXXXXX)"
    printf '[global]\n' > "$conf"
    for key in "${!pipcfg[@]}"; do
        value="${pipcfg[$key]}"
        if [ "$key" = cert ]; then
            [ -f "$value" ] || continue
            args+=(-v "$value:/etc/ssl/facemoe-build-ca.crt:ro")
            value=/etc/ssl/facemoe-build-ca.crt
        fi
        printf '%s = %s\n' "$key" "$value" >> "$conf"
        [ "$key" = cert ] && continue
        for d in $value; do  # the folder two levels below /: an index's files lie beside simple/
            d="$(printf '%s' "${d#file://}" | grep -oE '^/[^/]+/[^/]+' || true)"
            [ -n "$d" ] && [ -e "$d" ] && args+=(-v "$d:$d:ro")
        done
    done
    args+=(-v "$conf:/etc/pip.conf:ro")
    local log="${TMPDIR:-/tmp}/facemoe-container-build.log" t0=$SECONDS rc=0
    say "podman build -t $image (log: $log)"
    podman build "${args[@]}" . > "$log" 2>&1 || rc=$?
    rm -f "$conf"
    ((rc == 0)) || { tail -n 40 "$log" >&2; say "podman build failed (exit $rc)"; return $rc; }
    say "built $image in $((SECONDS - t0)) s ($(podman image inspect -f '{{.Size}}' "$image") bytes)"
}

(($#)) || set -- setup base build
# one at a time on a machine: a second call (the test's, while CI's background build runs)
# waits for the first, then finds every layer built
exec 9> "${TMPDIR:-/tmp}/facemoe-container.lock"
flock 9
for step; do
    case "$step" in
        setup) setup ;;
        base) make_base ;;
        build) build ;;
        *) say "usage: $0 [setup] [base] [build]"; exit 2 ;;
    esac
done
