#!/usr/bin/env bash
# Install inspectd on a line PC or Jetson (Ubuntu 22.04+/JetPack 5+): system user, directories,
# a virtual environment with the package, the systemd template unit, and (optionally) enable lines.
#
#   sudo deploy/install.sh                         # install / upgrade, enable nothing
#   sudo deploy/install.sh --line press1           # ... and enable inspectd@press1 (needs /etc/inspectd/press1.yaml)
#   sudo deploy/install.sh --jetson --line press1  # venv sees JetPack's TensorRT / pycuda (see deploy/README.md)
#   deploy/install.sh --dry-run --line press1      # print every command instead of running it
#
# Re-running it upgrades the package in place and leaves configs, bundles and the archive alone.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC=$(dirname "$SCRIPT_DIR")         # the checkout this script belongs to
PREFIX=/opt/inspectd
PYTHON=python3
EXTRAS=""
JETSON=0
DRY_RUN=0
LINES=()

USER_NAME=inspectd
CONF_DIR=/etc/inspectd
STATE_DIR=/var/lib/inspectd
UNIT_DIR=/etc/systemd/system
BIN_LINK=/usr/local/bin/inspectd

die() { echo "install.sh: error: $*" >&2; exit 2; }
note() { echo "install.sh: $*"; }

usage() {
    cat <<EOF
usage: install.sh [--src DIR] [--prefix DIR] [--python PYTHON] [--extras LIST] [--jetson]
                  [--line ID]... [--dry-run]
  --src DIR       inspectd source checkout to install (default: $SRC)
  --prefix DIR    where the venv and the deploy files go (default: $PREFIX)
  --python PY     interpreter for the venv, 3.10+ (default: python3)
  --extras LIST   more pip extras, e.g. "report" ("bridges" always: the PLC bridge units are installed;
                  training needs "train")
  --jetson        venv with --system-site-packages, so JetPack's python3-libnvinfer (TensorRT) and pycuda are used
  --line ID       enable (and start) inspectd@ID; /etc/inspectd/ID.yaml must exist and pass check-config
  --dry-run       print the commands instead of running them
EOF
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --src) [[ $# -ge 2 ]] || die "--src needs a value"; SRC=$2; shift 2 ;;
        --prefix) [[ $# -ge 2 ]] || die "--prefix needs a value"; PREFIX=$2; shift 2 ;;
        --python) [[ $# -ge 2 ]] || die "--python needs a value"; PYTHON=$2; shift 2 ;;
        --extras) [[ $# -ge 2 ]] || die "--extras needs a value"; EXTRAS=$2; shift 2 ;;
        --jetson) JETSON=1; shift ;;
        --line)
            [[ $# -ge 2 ]] || die "--line needs a value"
            # The id becomes part of a unit name and a file name: keep it to safe characters.
            [[ $2 =~ ^[A-Za-z0-9_.-]+$ ]] || die "--line $2: use letters, digits, '_', '.', '-' only"
            LINES+=("$2"); shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

# Every change to the system goes through run(), so --dry-run shows exactly what would happen.
run() {
    if [[ $DRY_RUN -eq 1 ]]; then
        printf '+'; printf ' %q' "$@"; printf '\n'
    else
        "$@"
    fi
}

# ---- checks (before touching anything) -----------------------------------------------------------
[[ -f "$SRC/setup.cfg" && -d "$SRC/inspectd" ]] || die "$SRC is not an inspectd checkout (no setup.cfg / inspectd/)"
[[ -f "$SRC/deploy/systemd/inspectd@.service" ]] || die "$SRC/deploy/systemd/inspectd@.service is missing"
if [[ $DRY_RUN -eq 0 && $EUID -ne 0 ]]; then
    die "run as root (sudo), or use --dry-run to see the commands"
fi
command -v systemctl >/dev/null 2>&1 || die "systemctl not found: this installer is for systemd machines"
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (apt install python3 python3-venv)"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || die "$PYTHON is older than 3.10"
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
    || die "$PYTHON has no venv/ensurepip module (apt install python3-venv)"

# ---- user and groups ---------------------------------------------------------------------------
# video: GPU nodes (Jetson, many distros); plugdev: USB3 Vision cameras via the vendor's udev rules.
for group in video plugdev; do
    getent group "$group" >/dev/null || run groupadd --system "$group"
done
if ! getent group "$USER_NAME" >/dev/null; then
    run groupadd --system "$USER_NAME"
fi
if ! id -u "$USER_NAME" >/dev/null 2>&1; then
    run useradd --system --gid "$USER_NAME" --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "inspectd inspection daemon" "$USER_NAME"
fi
run usermod --append --groups video,plugdev "$USER_NAME"

# ---- directories -------------------------------------------------------------------------------
# Configs are root-owned and group-readable: the daemon reads them but cannot rewrite them.
run install -d -o root -g "$USER_NAME" -m 0750 "$CONF_DIR"
# State: bundles (+ TensorRT engine caches), calibration files, NG archive. The unit's
# ProtectSystem=strict leaves only this tree writable.
run install -d -o "$USER_NAME" -g "$USER_NAME" -m 0750 "$STATE_DIR"
for sub in bundles calib archive; do
    run install -d -o "$USER_NAME" -g "$USER_NAME" -m 0750 "$STATE_DIR/$sub"
done

# ---- the package, in its own venv --------------------------------------------------------------
venv_args=()
[[ $JETSON -eq 1 ]] && venv_args+=(--system-site-packages)
run "$PYTHON" -m venv "${venv_args[@]}" "$PREFIX/venv"
run "$PREFIX/venv/bin/python" -m pip install --upgrade pip
# "bridges": the PLC bridge units are installed below, and without their libraries they would
# restart-loop for good.
spec="${SRC}[bridges${EXTRAS:+,$EXTRAS}]"
run "$PREFIX/venv/bin/python" -m pip install --upgrade "$spec"
run ln -sfn "$PREFIX/venv/bin/inspectd" "$BIN_LINK"

# The deploy files (README, Prometheus rules, Grafana dashboard, examples) next to the venv.
run install -d -m 0755 "$PREFIX/deploy"
run cp -r "$SRC/deploy/." "$PREFIX/deploy/"
# Examples next to the real configs, never over an existing file.
for example in lines.example.yaml lines.replay.yaml systemd/line.env.example; do
    target="$CONF_DIR/$(basename "$example")"
    if [[ -f "$SRC/deploy/$example" && ! -e "$target" ]]; then
        run install -o root -g "$USER_NAME" -m 0640 "$SRC/deploy/$example" "$target"
    fi
done

# ---- systemd -----------------------------------------------------------------------------------
run install -m 0644 "$SRC/deploy/systemd/inspectd@.service" "$UNIT_DIR/inspectd@.service"
# PLC bridges (bridges section of a line's config): installed, enabled by hand per line, e.g.
#   systemctl enable --now inspectd-bridge-mqtt@line3
for unit in inspectd-bridge-mqtt@.service inspectd-bridge-opcua@.service; do
    if [[ -f "$SRC/deploy/systemd/$unit" ]]; then
        run install -m 0644 "$SRC/deploy/systemd/$unit" "$UNIT_DIR/$unit"
    fi
done
run systemctl daemon-reload
# An upgrade: what runs the old code restarts on the new (enable --now below starts only what is stopped).
run systemctl try-restart 'inspectd@*.service' 'inspectd-bridge-mqtt@*.service' 'inspectd-bridge-opcua@*.service'

enabled=()
for line in "${LINES[@]}"; do
    config="$CONF_DIR/$line.yaml"
    if [[ $DRY_RUN -eq 0 && ! -f "$config" ]]; then
        note "not enabling inspectd@$line: $config does not exist (copy $CONF_DIR/lines.example.yaml)"
        continue
    fi
    # Validate as the service user: it also proves the daemon may read every referenced file.
    run runuser -u "$USER_NAME" -- "$BIN_LINK" check-config "$config"
    run systemctl enable --now "inspectd@$line.service"
    enabled+=("$line")
done

note "installed inspectd in $PREFIX (command: $BIN_LINK)"
if [[ ${#enabled[@]} -eq 0 ]]; then
    note "next: write $CONF_DIR/<line>.yaml, then: systemctl enable --now inspectd@<line>"
else
    note "enabled: ${enabled[*]}  (status: systemctl status 'inspectd@*')"
fi
