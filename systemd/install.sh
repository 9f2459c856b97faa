#!/usr/bin/env bash
# Install pacs-ai as a systemd service (`make install` runs this as root).
#
#   user      pacs-ai (systemd-sysusers, else useradd), no login shell
#   program   /opt/pacs-ai/venv (a virtual environment with pacs-ai and torch), model in /opt/pacs-ai/models
#   config    /etc/pacs-ai/pacs-ai.toml (from config/pacs-ai.toml: data_dir=/var/lib/pacs-ai, installed model)
#   state     /var/lib/pacs-ai (spool, results, outbox, SQLite database, audit log)
#   unit      /etc/systemd/system/pacs-ai.service, sysusers.d and tmpfiles.d snippets
#
# It never enables or starts the service: it prints the commands to do so. An existing
# /etc/pacs-ai/pacs-ai.toml is never overwritten (the new one is written next to it as pacs-ai.toml.new).
#
# Variables (environment):
#   DESTDIR=DIR     stage everything under DIR (packaging, tests): no user is created, nothing is chowned,
#                   systemctl is not called. Note: a virtual environment is not relocatable.
#   SKIP_VENV=1     do not create/update the virtual environment (e.g. to refresh config and unit only)
#   SKIP_USER=1     do not create the pacs-ai user
#   NO_SYSTEMCTL=1  do not run `systemctl daemon-reload` / systemd-tmpfiles
#   MODEL_DIR=DIR   the model folder to install (default: the first model.path of config/pacs-ai.toml)
#   PYTHON=python3  the interpreter for the virtual environment (3.11 or newer)
#   TORCH_SPEC=...  torch/torchvision requirement (default as in the Makefile)
#   PIP_ARGS=...    extra pip arguments, e.g. "--no-index --find-links /srv/wheels" on an offline host
#   PREFIX, CONFDIR, STATEDIR, UNITDIR, SYSUSERSDIR, TMPFILESDIR  override the locations above
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DESTDIR="${DESTDIR:-}"
PREFIX="${PREFIX:-/opt/pacs-ai}"
CONFDIR="${CONFDIR:-/etc/pacs-ai}"
STATEDIR="${STATEDIR:-/var/lib/pacs-ai}"
UNITDIR="${UNITDIR:-/etc/systemd/system}"
SYSUSERSDIR="${SYSUSERSDIR:-/etc/sysusers.d}"
TMPFILESDIR="${TMPFILESDIR:-/etc/tmpfiles.d}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC-torch==2.14.1 torchvision==0.29.1}"
PIP_ARGS="${PIP_ARGS:-}"
SERVICE_USER=pacs-ai

say() { printf 'install: %s\n' "$*"; }
warn() { printf 'install: warning: %s\n' "$*" >&2; }
die() { printf 'install: error: %s\n' "$*" >&2; exit 1; }

staged=0
[ -n "$DESTDIR" ] && staged=1
if [ "$staged" = 0 ] && [ "$(id -u)" != 0 ]; then
    die "run as root (sudo make install), or set DESTDIR=DIR to stage the files"
fi
DEST="${DESTDIR%/}"

# --- the service user ---------------------------------------------------------------------------------
install -d -m 0755 "$DEST$SYSUSERSDIR" "$DEST$TMPFILESDIR" "$DEST$UNITDIR"
install -m 0644 "$REPO/systemd/pacs-ai.sysusers.conf" "$DEST$SYSUSERSDIR/pacs-ai.conf"
install -m 0644 "$REPO/systemd/pacs-ai.tmpfiles.conf" "$DEST$TMPFILESDIR/pacs-ai.conf"
have_user=0
if [ "$staged" = 0 ] && [ "${SKIP_USER:-0}" != 1 ]; then
    if getent passwd "$SERVICE_USER" >/dev/null; then
        say "user $SERVICE_USER exists"
    elif command -v systemd-sysusers >/dev/null; then
        systemd-sysusers "$SYSUSERSDIR/pacs-ai.conf"
        say "created user $SERVICE_USER (systemd-sysusers)"
    else
        nologin="$(command -v nologin || echo /usr/sbin/nologin)"
        useradd --system --user-group --home-dir "$STATEDIR" --no-create-home --shell "$nologin" \
            --comment "pacs-ai DICOM AI gateway" "$SERVICE_USER"
        say "created user $SERVICE_USER (useradd)"
    fi
fi
if [ "$staged" = 0 ] && getent passwd "$SERVICE_USER" >/dev/null; then have_user=1; fi

# --- folders --------------------------------------------------------------------------------------------
install -d -m 0755 "$DEST$PREFIX" "$DEST$PREFIX/models" "$DEST$PREFIX/docs"
install -d -m 0750 "$DEST$CONFDIR" "$DEST$STATEDIR"
if [ "$have_user" = 1 ]; then
    chown root:"$SERVICE_USER" "$DEST$CONFDIR"
    chown "$SERVICE_USER:$SERVICE_USER" "$DEST$STATEDIR"
fi

# --- the program ----------------------------------------------------------------------------------------
VENV="$PREFIX/venv"
if [ "${SKIP_VENV:-0}" != 1 ]; then
    say "creating the virtual environment $DEST$VENV (torch is large: this takes a while)"
    "$PYTHON" -m venv "$DEST$VENV"
    if [ -n "$TORCH_SPEC" ]; then  # TORCH_SPEC="" leaves torch to the project's own requirements
        # shellcheck disable=SC2086  # PIP_ARGS and TORCH_SPEC are word lists on purpose
        "$DEST$VENV/bin/pip" install -q $PIP_ARGS $TORCH_SPEC
    fi
    # Build from a copy of what the package needs, so no build/ or *.egg-info owned by root is left in
    # the checkout.
    src="$(mktemp -d)"
    for item in pyproject.toml setup.cfg setup.py MANIFEST.in README.md LICENSE pacs_ai training; do
        [ -e "$REPO/$item" ] && cp -r "$REPO/$item" "$src/"
    done
    find "$src" -name __pycache__ -prune -exec rm -rf {} +
    # shellcheck disable=SC2086
    "$DEST$VENV/bin/pip" install -q $PIP_ARGS "$src"
    rm -rf "$src"
else
    say "SKIP_VENV=1: not touching $DEST$VENV"
fi
install -m 0644 "$REPO/docs/operations.md" "$DEST$PREFIX/docs/operations.md" 2>/dev/null || true
install -d -m 0755 "$DEST$PREFIX/systemd/drop-ins"
install -m 0644 "$REPO"/systemd/drop-ins/*.conf "$DEST$PREFIX/systemd/drop-ins/"

# --- the model ------------------------------------------------------------------------------------------
if [ -z "${MODEL_DIR:-}" ]; then
    MODEL_DIR="$("$PYTHON" - "$REPO/config/pacs-ai.toml" <<'PY'
import sys, tomllib
from pathlib import Path
src = Path(sys.argv[1])
paths = tomllib.loads(src.read_text()).get("model", {}).get("path", ["../models/reference"])
paths = [paths] if isinstance(paths, str) else paths
print((src.parent / paths[0]).resolve())
PY
)"
fi
MODEL_NAME="$(basename "$MODEL_DIR")"
MODEL_TARGET="$PREFIX/models/$MODEL_NAME"
if [ -f "$MODEL_DIR/model.json" ]; then
    rm -rf "$DEST$MODEL_TARGET.tmp"
    cp -r "$MODEL_DIR" "$DEST$MODEL_TARGET.tmp"
    chmod -R u=rwX,go=rX "$DEST$MODEL_TARGET.tmp"
    rm -rf "$DEST$MODEL_TARGET"
    mv "$DEST$MODEL_TARGET.tmp" "$DEST$MODEL_TARGET"
    say "model $MODEL_DIR -> $DEST$MODEL_TARGET"
else
    warn "no model at $MODEL_DIR (model.json missing): copy a model folder to $MODEL_TARGET before starting"
fi

# --- the configuration ----------------------------------------------------------------------------------
tmpconf="$(mktemp)"
trap 'rm -f "$tmpconf"' EXIT
"$PYTHON" - "$REPO/config/pacs-ai.toml" "$tmpconf" "$STATEDIR" "$MODEL_TARGET" <<'PY'
import json, re, sys, tomllib
src, dst, data_dir, model = sys.argv[1:5]
section, out, done = None, [], set()
for line in open(src, encoding="utf-8").read().splitlines(keepends=True):
    header = re.match(r"\s*\[\s*([A-Za-z0-9_.]+)\s*\]\s*(#.*)?$", line)
    if header:
        section = header.group(1)
    elif section == "storage" and re.match(r"\s*data_dir\s*=", line):
        line, _ = f"data_dir = {json.dumps(data_dir)}   # set by systemd/install.sh\n", done.add("data_dir")
    elif section == "model" and re.match(r"\s*path\s*=", line):
        line, _ = f"path = [{json.dumps(model)}]   # set by systemd/install.sh\n", done.add("path")
    out.append(line)
text = "".join(out)
assert done == {"data_dir", "path"}, f"config/pacs-ai.toml lacks {({'data_dir', 'path'} - done)}"
table = tomllib.loads(text)
assert table["storage"]["data_dir"] == data_dir, "could not set storage.data_dir"
assert table["model"]["path"] == [model], "could not set model.path"
open(dst, "w", encoding="utf-8").write("# pacs-ai configuration, installed by systemd/install.sh.\n" + text)
PY
CONF="$DEST$CONFDIR/pacs-ai.toml"
if [ -f "$CONF" ] && ! cmp -s "$tmpconf" "$CONF"; then
    install -m 0640 "$tmpconf" "$CONF.new"
    [ "$have_user" = 1 ] && chgrp "$SERVICE_USER" "$CONF.new"
    warn "$CONF exists and was kept; the new default is $CONF.new"
else
    install -m 0640 "$tmpconf" "$CONF"
    [ "$have_user" = 1 ] && chgrp "$SERVICE_USER" "$CONF"
    say "configuration $CONF"
fi

# --- the unit -------------------------------------------------------------------------------------------
install -m 0644 "$REPO/systemd/pacs-ai.service" "$DEST$UNITDIR/pacs-ai.service"
say "unit $DEST$UNITDIR/pacs-ai.service"

if [ -x "$DEST$VENV/bin/pacs-ai" ] && [ "$staged" = 0 ]; then
    "$DEST$VENV/bin/pacs-ai" config check "$CONF" >/dev/null || die "the installed configuration does not validate"
fi

if [ "$staged" = 0 ] && [ "${NO_SYSTEMCTL:-0}" != 1 ] && [ -d /run/systemd/system ]; then
    systemd-tmpfiles --create "$TMPFILESDIR/pacs-ai.conf" || warn "systemd-tmpfiles failed"
    systemctl daemon-reload
fi

cat <<EOF

pacs-ai is installed; nothing was started. Next:
  edit $CONFDIR/pacs-ai.toml (listener, destinations, TLS), then check it:
    sudo -u $SERVICE_USER $VENV/bin/pacs-ai config check $CONFDIR/pacs-ai.toml
  systemctl enable --now pacs-ai
  sudo -u $SERVICE_USER $VENV/bin/pacs-ai status --config $CONFDIR/pacs-ai.toml
  journalctl -u pacs-ai -f
GPU host, port 104, worker-only host: drop-ins in $PREFIX/systemd/drop-ins (see $PREFIX/docs/operations.md).
EOF
