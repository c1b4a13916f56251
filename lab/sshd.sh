#!/usr/bin/env bash
# An sshd of the lab's own on 127.0.0.1:2222 for `vmsnapctl -H` tests: host key, root's login key
# and authorized_keys under $LAB_DIR/ssh/, never ~/.ssh or /etc/ssh. Idempotent: a second run only
# checks that it answers. Started by lab/up.sh (and stopped by lab/down.sh); needs openssh-server
# (lab/install-packages.sh).
#
# Clients use $LAB_DIR/ssh/ssh, a wrapper that runs ssh with the lab's key and known_hosts:
#   VMSNAP_SSH=$LAB_DIR/ssh/ssh vmsnapctl -H root@127.0.0.1:2222 vm list
set -euo pipefail

LAB_DIR=${VMSNAP_LAB_DIR:-/var/lib/vmsnap-lab}
DIR=$LAB_DIR/ssh
PORT=2222
die() { echo "lab sshd: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"
[ -x /usr/sbin/sshd ] || die "/usr/sbin/sshd is missing: run lab/install-packages.sh"

mkdir -p "$DIR" /run/sshd
chmod 700 "$DIR"
[ -s "$DIR/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C vmsnap-lab-host -f "$DIR/host_ed25519"
[ -s "$DIR/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C vmsnap-lab-client -f "$DIR/id_ed25519"
cp "$DIR/id_ed25519.pub" "$DIR/authorized_keys"
echo "[127.0.0.1]:$PORT $(cat "$DIR/host_ed25519.pub")" >"$DIR/known_hosts"
cat >"$DIR/sshd_config" <<CONF
# vmsnap lab sshd, written by lab/sshd.sh
ListenAddress 127.0.0.1
Port $PORT
HostKey $DIR/host_ed25519
PidFile $DIR/sshd.pid
AuthorizedKeysFile $DIR/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
X11Forwarding no
AllowTcpForwarding no
PrintMotd no
CONF
cat >"$DIR/ssh" <<WRAP
#!/bin/sh
# ssh with the vmsnap lab's key and known_hosts (written by lab/sshd.sh).
exec ssh -F none -i "$DIR/id_ed25519" -o UserKnownHostsFile="$DIR/known_hosts" \\
  -o StrictHostKeyChecking=yes -o BatchMode=yes -o IdentitiesOnly=yes "\$@"
WRAP
chmod 755 "$DIR/ssh"

alive() {
  local pid
  [ -s "$DIR/sshd.pid" ] || return 1
  pid=$(head -n1 "$DIR/sshd.pid")
  [[ $pid =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = sshd ] &&
    ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null
}
answers() {
  timeout 10 "$DIR/ssh" -p "$PORT" root@127.0.0.1 true >/dev/null 2>&1
}
if alive; then
  # Re-read the config (it may have changed) without dropping connections.
  kill -HUP "$(head -n1 "$DIR/sshd.pid")"
else
  /usr/sbin/sshd -t -f "$DIR/sshd_config" || die "sshd refuses its config $DIR/sshd_config"
  /usr/sbin/sshd -f "$DIR/sshd_config" || die "sshd did not start"
fi
deadline=$((SECONDS + 15))
until answers; do
  [ $SECONDS -lt $deadline ] || die "sshd on 127.0.0.1:$PORT does not let root in with the lab key"
  sleep 0.2
done
