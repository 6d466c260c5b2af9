#!/bin/bash
# Build the local base image localhost/pacsbridge-base (Debian minbase + python3 + python3-venv)
# with debootstrap, for machines where podman cannot pull images (no registry). The pacsbridge
# image and the Redis / PostgreSQL images of compose.podman.yml are built on it.
#
# Idempotent: does nothing when the image exists (FORCE=1 rebuilds it).
# Settings: BASE_IMAGE_NAME (localhost/pacsbridge-base), BASE_SUITE (the host's codename, else
# bookworm), BASE_MIRROR (the host's Debian mirror, else http://deb.debian.org/debian).
# Needs root, podman and debootstrap (apt-get install podman debootstrap).
set -euo pipefail

image="${BASE_IMAGE_NAME:-localhost/pacsbridge-base}"
if [ "${FORCE:-0}" != 1 ] && podman image exists "$image"; then
    echo "base image $image exists: nothing to do"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "base-image.sh: needs root (debootstrap, chroot)" >&2
    exit 1
fi
for tool in podman debootstrap; do
    command -v "$tool" >/dev/null || { echo "base-image.sh: $tool is missing (apt-get install $tool)" >&2; exit 1; }
done

suite="${BASE_SUITE:-}"
if [ -z "$suite" ] && [ -r /etc/os-release ]; then
    suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
fi
suite="${suite:-bookworm}"

mirror="${BASE_MIRROR:-}"
if [ -z "$mirror" ]; then
    # the first Debian (not security) mirror the host's apt uses
    mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}')
fi
if [ -z "$mirror" ]; then
    mirror=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' \
             /etc/apt/sources.list 2>/dev/null || true)
fi
mirror="${mirror:-http://deb.debian.org/debian}"

rootfs=$(mktemp -d /var/tmp/pacsbridge-base.XXXXXX)
trap 'rm -rf --one-file-system "$rootfs"' EXIT

echo "debootstrap $suite from $mirror into $rootfs"
start=$(date +%s)
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$suite" "$rootfs" "$mirror" > "$rootfs.log" 2>&1 || {
    tail -n 30 "$rootfs.log" >&2
    echo "base-image.sh: debootstrap failed (full log: $rootfs.log)" >&2
    exit 1
}
rm -f "$rootfs.log"

# apt in the image uses the host's sources (mirror, updates and security suites)
if ls /etc/apt/sources.list.d/*.sources >/dev/null 2>&1; then
    cp /etc/apt/sources.list.d/*.sources "$rootfs/etc/apt/sources.list.d/"
    rm -f "$rootfs/etc/apt/sources.list"
fi

# HTTPS here may go through a local CA: give it to the image too, or pip fails with
# CERTIFICATE_VERIFY_FAILED (Debian's pip in a venv uses the system bundle)
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
fi
chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/log/*.log \
       "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*

tar -C "$rootfs" --numeric-owner -c . | podman import --quiet \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "built $image ($suite) in $(( $(date +%s) - start )) s: $(podman image inspect --format '{{.Size}}' "$image" | awk '{printf "%d MB", $1 / 1e6}')"
