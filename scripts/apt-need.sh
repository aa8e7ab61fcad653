# Sourced by scripts/setup*.sh: `apt_need TAG PKG...` installs the Debian packages of the
# list that are missing, without starting their services (policy-rc.d: there may be no
# init system, and the tests start their own daemons with private configurations).
apt_need() {
    local tag=$1; shift
    local need=() pkg
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
    done
    [ "${#need[@]}" -gt 0 ] || return 0
    echo "$tag: installing Debian packages: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    local policy=/usr/sbin/policy-rc.d created=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created=1
    fi
    local rc=0
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || rc=$?
    [ "$created" = 1 ] && rm -f "$policy"
    return "$rc"
}
