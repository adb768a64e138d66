#!/usr/bin/env bash
# Download the published teacher checkpoints, verify them and unpack them where mdistiller looks for them.
#
#   bash download_ckpts.sh            # CIFAR-100 teacher zoo (cifar_teachers.tar) -> download_ckpts/cifar_teachers/
#   bash download_ckpts.sh imagenet   # torchvision's ImageNet weights of resnet18/34/50 -> torch hub cache
#   bash download_ckpts.sh all        # both
#   bash download_ckpts.sh --help     # this text
#
# Idempotent: what is already in place and verified is not fetched again. Offline, it ends with one line naming
# the file to fetch elsewhere and where to put it. Environment:
#   MDISTILLER_CKPT_BASE_URL     where cifar_teachers.tar lives (default: the mdistiller release "checkpoints";
#                                any curl URL works, file:///path/to/mirror included)
#   MDISTILLER_CKPT_DIR          destination (default: download_ckpts/ next to this script)
#   MDISTILLER_CKPT_SHA256       expected SHA-256 of cifar_teachers.tar (overrides the value pinned in this script)
#   MDISTILLER_TORCHVISION_BASE_URL  where torchvision's weight files live (default download.pytorch.org/models)
#   TORCH_HOME                   torch's cache root (weights go to $TORCH_HOME/hub/checkpoints, as torch.hub does)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BASE_URL="${MDISTILLER_CKPT_BASE_URL:-https://github.com/megvii-research/mdistiller/releases/download/checkpoints}"
DEST="${MDISTILLER_CKPT_DIR:-$HERE/download_ckpts}"
TV_BASE_URL="${MDISTILLER_TORCHVISION_BASE_URL:-https://download.pytorch.org/models}"
HUB_DIR="${TORCH_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/torch}/hub/checkpoints"
# SHA-256 of the published cifar_teachers.tar. Not pinned yet: it could not be fetched from the machines this
# project is developed on. Until it is, the archive's digest is printed so it can be pinned here.
PINNED_CIFAR_SHA256=""
EXPECTED_CIFAR_SHA256="${MDISTILLER_CKPT_SHA256:-$PINNED_CIFAR_SHA256}"
# ImageNet teachers: torchvision's IMAGENET1K_V1 files; the name carries the first 8 hex digits of the SHA-256.
TV_FILES="resnet34-b627a593.pth resnet50-0676ba61.pth resnet18-f37072fd.pth"

die() { echo "error: $*" >&2; exit 1; }

usage() {  # the comment block at the top of this file
    sed -n '2,/^set -euo pipefail/p' "${BASH_SOURCE[0]}" | sed -n 's/^# \{0,1\}//p'
}

fetch() {  # fetch URL FILE: download to FILE.part, then rename; curl handles http(s) and file:// alike
    local url="$1" out="$2"
    command -v curl >/dev/null 2>&1 || die "curl is needed to download $url (apt-get install curl)"
    rm -f "$out.part"
    # --speed-limit/--speed-time: a stalled transfer ends (and is retried) instead of hanging for ever.
    if ! curl -fL --retry 2 --connect-timeout 20 --speed-limit 1024 --speed-time 60 -sS -o "$out.part" "$url" \
            2>"$out.err"; then
        # each try writes its own "curl: (N) ..." line and retry warnings: the last error is the one to show
        local why; why="$(grep '^curl: ' "$out.err" | tail -n 1)"; [ -n "$why" ] || why="$(tail -n 1 "$out.err")"
        rm -f "$out.part" "$out.err"
        die "could not download $url (${why:-curl failed}); if this machine is offline, fetch that file on one with internet and put it at $out, then run this again"
    fi
    rm -f "$out.err"
    mv "$out.part" "$out"
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

cifar() {
    local dir="$DEST/cifar_teachers" marker="$DEST/cifar_teachers/.verified" archive="$DEST/cifar_teachers.tar"
    if [ -f "$marker" ] && ls "$dir"/*_vanilla/ckpt_epoch_240.pth >/dev/null 2>&1; then
        echo "[ckpts] CIFAR-100 teachers already in $dir"
        return 0
    fi
    mkdir -p "$DEST"
    if [ ! -f "$archive" ]; then
        echo "[ckpts] downloading $BASE_URL/cifar_teachers.tar"
        fetch "$BASE_URL/cifar_teachers.tar" "$archive"
    else
        echo "[ckpts] using the archive already at $archive"
    fi
    local digest; digest="$(sha256_of "$archive")"
    if [ -n "$EXPECTED_CIFAR_SHA256" ]; then
        if [ "$digest" != "$EXPECTED_CIFAR_SHA256" ]; then
            mv "$archive" "$archive.bad"
            die "checksum mismatch for cifar_teachers.tar: got $digest, expected $EXPECTED_CIFAR_SHA256 (kept as $archive.bad; download it again)"
        fi
        echo "[ckpts] SHA-256 verified: $digest"
    else
        echo "[ckpts] warning: no SHA-256 pinned for cifar_teachers.tar; its digest is $digest (pin it with MDISTILLER_CKPT_SHA256 or PINNED_CIFAR_SHA256)" >&2
    fi
    local listing; listing="$(tar -tf "$archive")" || die "$archive is not a tar archive; delete it and run again"
    if echo "$listing" | grep -Eq '(^/|(^|/)\.\.(/|$))'; then
        die "$archive holds paths outside its folder; refusing to unpack it"
    fi
    echo "$listing" | grep -Eq '^cifar_teachers/[^/]+_vanilla/ckpt_epoch_240\.pth$' \
        || die "$archive has no cifar_teachers/<model>_vanilla/ckpt_epoch_240.pth; is it the teacher archive?"
    local tmp="$DEST/.unpack.$$"
    rm -rf "$tmp"; mkdir -p "$tmp"
    tar -xf "$archive" -C "$tmp"
    rm -rf "$dir"
    mv "$tmp/cifar_teachers" "$dir"
    rm -rf "$tmp"
    echo "$digest" >"$marker"
    rm -f "$archive"
    echo "[ckpts] CIFAR-100 teachers in $dir:" $(cd "$dir" && ls -d *_vanilla | sed 's/_vanilla//')
}

imagenet() {
    mkdir -p "$HUB_DIR"
    local f
    for f in $TV_FILES; do
        local out="$HUB_DIR/$f" prefix="${f##*-}"; prefix="${prefix%.pth}"
        if [ -f "$out" ] && [ "$(sha256_of "$out" | cut -c1-${#prefix})" = "$prefix" ]; then
            echo "[ckpts] $f already in $HUB_DIR"
            continue
        fi
        echo "[ckpts] downloading $TV_BASE_URL/$f"
        fetch "$TV_BASE_URL/$f" "$out"
        if [ "$(sha256_of "$out" | cut -c1-${#prefix})" != "$prefix" ]; then
            mv "$out" "$out.bad"
            die "checksum mismatch for $f: its SHA-256 does not start with $prefix (kept as $out.bad)"
        fi
        echo "[ckpts] $f verified"
    done
}

case "${1:-cifar}" in
    -h|--help|help) usage ;;
    cifar) cifar ;;
    imagenet) imagenet ;;
    all) cifar; imagenet ;;
    *) die "unknown target '$1'; use cifar, imagenet or all (bash download_ckpts.sh --help)" ;;
esac
