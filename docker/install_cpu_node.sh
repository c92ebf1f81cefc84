#!/usr/bin/env bash
# Install an lmtune CPU node: MPICH (mpirun), an SSH server on a chosen port (so mpirun can reach
# this node, also inside a container on a host that already runs sshd on 22), CPU-only PyTorch and
# lmtune itself. docker/Dockerfile runs this script; .ci/run runs it on the CI machine too, so the
# steps are tested where no Docker engine exists.
#
# Idempotent: running it again changes nothing that is already in place. It never starts or
# restarts a service: the container's CMD starts sshd (see docker/Dockerfile).
#
# Usage: bash docker/install_cpu_node.sh [--sshd-port PORT] [--no-sshd] [--no-apt] [--no-pip]
#                                         [--extras LIST] [--project DIR]
#   --sshd-port PORT  port sshd listens on and ssh uses to reach the other nodes (default: $SSHD_PORT or 22)
#   --no-sshd         skip the SSH server and client configuration (single-node or torchrun-only hosts)
#   --no-apt          skip Debian packages (they are already there)
#   --no-pip          skip PyTorch and lmtune
#   --extras LIST     lmtune extras to install, comma-separated (e.g. dev)
#   --project DIR     the lmtune source tree (default: this script's parent directory)
# Environment:
#   SSH_DIR           where the SSH configuration goes (default /etc/ssh; a scratch directory in tests)
#   TORCH_INDEX_URL   where the CPU build of PyTorch comes from when torch is not installed yet
#                     (default https://download.pytorch.org/whl/cpu)
set -euo pipefail
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

SSHD_PORT="${SSHD_PORT:-22}"
SSH_DIR="${SSH_DIR:-/etc/ssh}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
PROJECT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WITH_SSHD=1 WITH_APT=1 WITH_PIP=1 EXTRAS=""
PACKAGES=(mpich openssh-client)

die() { echo "install_cpu_node.sh: error: $*" >&2; exit 2; }
say() { echo "install_cpu_node.sh: $*"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --sshd-port) [[ $# -ge 2 ]] || die "--sshd-port needs a port number"; SSHD_PORT="$2"; shift 2 ;;
    --no-sshd) WITH_SSHD=0; shift ;;
    --no-apt) WITH_APT=0; shift ;;
    --no-pip) WITH_PIP=0; shift ;;
    --extras) [[ $# -ge 2 ]] || die "--extras needs a list, e.g. dev"; EXTRAS="$2"; shift 2 ;;
    --project) [[ $# -ge 2 ]] || die "--project needs a directory"; PROJECT="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ "$SSHD_PORT" =~ ^[0-9]+$ ]] && (( SSHD_PORT >= 1 && SSHD_PORT <= 65535 )) \
  || die "--sshd-port must be a TCP port 1-65535 (got '$SSHD_PORT')"
[[ -f "$PROJECT/pyproject.toml" ]] || die "--project $PROJECT holds no pyproject.toml"
(( WITH_SSHD )) && PACKAGES+=(openssh-server)

install_packages() {
  local missing=()
  for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  if (( ${#missing[@]} == 0 )); then say "Debian packages already installed: ${PACKAGES[*]}"; return; fi
  [[ $(id -u) -eq 0 ]] || die "installing ${missing[*]} needs root (or run with --no-apt)"
  # Keep the packages' install scripts from starting daemons (sshd on port 22) on this machine.
  local policy=/usr/sbin/policy-rc.d own_policy=0
  if [[ ! -e $policy ]]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; own_policy=1; fi
  say "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
    || { (( own_policy )) && rm -f "$policy"; die "apt-get install ${missing[*]} failed"; }
  (( own_policy )) && rm -f "$policy"
  return 0
}

write_if_changed() {  # write stdin to $1 unless it already holds exactly that
  local target="$1" content
  content="$(cat)"
  if [[ -f "$target" && "$(cat "$target")" == "$content" ]]; then return; fi
  mkdir -p "$(dirname "$target")"
  printf '%s\n' "$content" > "$target"
  say "wrote $target"
}

configure_ssh() {
  mkdir -p "$SSH_DIR/sshd_config.d" "$SSH_DIR/ssh_config.d" /run/sshd
  local key="$SSH_DIR/ssh_host_ed25519_key"
  [[ -f "$key" ]] || ssh-keygen -q -t ed25519 -N "" -f "$key"
  # Debian's sshd_config includes sshd_config.d/*.conf first; a scratch SSH_DIR gets a minimal one.
  [[ -f "$SSH_DIR/sshd_config" ]] || echo "Include $SSH_DIR/sshd_config.d/*.conf" > "$SSH_DIR/sshd_config"
  write_if_changed "$SSH_DIR/sshd_config.d/lmtune.conf" <<CONF
# lmtune CPU node (docker/install_cpu_node.sh): mpirun reaches this node over ssh on this port.
Port $SSHD_PORT
HostKey $key
PermitRootLogin prohibit-password
PasswordAuthentication no
CONF
  # mpirun (Hydra) starts the remote ranks with plain `ssh NODE`: tell ssh the nodes' port.
  write_if_changed "$SSH_DIR/ssh_config.d/lmtune.conf" <<CONF
# lmtune CPU node (docker/install_cpu_node.sh): the other nodes' sshd listens on $SSHD_PORT.
Host *
    Port $SSHD_PORT
    StrictHostKeyChecking accept-new
CONF
  command -v sshd >/dev/null || die "sshd is not installed (drop --no-apt, or install openssh-server)"
  sshd -t -f "$SSH_DIR/sshd_config" || die "sshd rejects the configuration in $SSH_DIR"
  say "sshd configuration valid: port $SSHD_PORT (not started here; the container's CMD starts it)"
}

install_python() {
  local python="${PYTHON:-python3}"
  if "$python" -c "import torch" 2>/dev/null; then
    say "torch $("$python" -c 'import torch; print(torch.__version__)') already installed"
  else
    say "installing CPU-only torch from $TORCH_INDEX_URL"
    "$python" -m pip install --no-cache-dir torch --index-url "$TORCH_INDEX_URL"
  fi
  local target="$PROJECT"
  [[ -n "$EXTRAS" ]] && target="$PROJECT[$EXTRAS]"
  # Editable: the image keeps its source in place, and a developer machine keeps its checkout live.
  "$python" -m pip install --no-cache-dir -q -e "$target"
  "$python" -c "import lmtune, torch; print('install_cpu_node.sh: lmtune', lmtune.__version__, 'with torch', torch.__version__)"
}

(( WITH_APT )) && install_packages
command -v mpirun >/dev/null || die "mpirun is not on PATH (drop --no-apt, or apt-get install mpich)"
say "mpirun: $(mpirun --version 2>&1 | grep -m1 -E 'Version:|Open MPI' | tr -s ' ')"
(( WITH_SSHD )) && configure_ssh
(( WITH_PIP )) && install_python
say "done"
