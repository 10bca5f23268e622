#!/usr/bin/env bash
# Installs the system programs the tool and its tests use, only when one is missing:
# gpg (gnupg), sshd + sftp (openssh-server, openssh-client), puttygen (putty-tools).
# `system-deps.sh gpg` installs only what the tool itself needs to run (the demo); no argument,
# everything the tests use as well.
set -euo pipefail
declare -A need=([gpg]=gnupg [gpg-agent]=gpg-agent)
if [ "${1:-all}" != gpg ]; then
  need+=([/usr/sbin/sshd]=openssh-server [sftp]=openssh-client [ssh-keygen]=openssh-client
         [puttygen]=putty-tools)
fi
missing=()
for program in "${!need[@]}"; do
  command -v "$program" >/dev/null 2>&1 || missing+=("${need[$program]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
packages=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
if [ "$(id -u)" -ne 0 ]; then
  echo "Missing system packages: $packages" >&2
  echo "Install them with: sudo apt-get install -y $packages" >&2
  exit 1
fi
echo "Installing system packages: $packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $packages >/dev/null
