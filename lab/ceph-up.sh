#!/usr/bin/env bash
# Brings up a single-node Ceph cluster for RBD tests, as root, from Debian 12's packages (Ceph
# 16.2), without systemd: lab/ceph-up.sh. Idempotent: when the cluster is already up and healthy
# it checks that and exits (well under a second); otherwise each stage redoes only what is missing,
# and a cluster whose daemons died (or a rebooted machine) comes back from its data.
#
#  - packages: lab/install-packages.sh --ceph (ceph-mon, ceph-osd, ceph-common, qemu-block-extra);
#  - one monitor "a" on 127.0.0.1 (v2 3300, v1 6789), one bluestore OSD on a sparse file,
#    pools of size 1; no mgr (RBD does not need one, and it costs ~300 MB);
#  - pool "vmsnap" initialised for RBD;
#  - user client.libvirt (profile rbd on pool vmsnap) for QEMU and the backend;
#  - if libvirtd answers on qemu:///system: a ceph-type libvirt secret holding client.libvirt's key
#    (nothing else in libvirt is touched). Run this again after libvirtd starts to define it.
#
# Everything lives in ${VMSNAP_CEPH_DIR:-${VMSNAP_LAB_DIR:-/var/lib/vmsnap-lab}/ceph}:
#   ceph.conf                    pass to every client: ceph -c, rbd -c, rbd:POOL/IMG:conf=...
#   ceph.client.admin.keyring    found through ceph.conf ([client] keyring = ...$name.keyring)
#   ceph.client.libvirt.keyring  likewise, for --id libvirt / :id=libvirt
#   client.libvirt.key           the bare key (what the libvirt secret holds)
#   libvirt-secret.uuid          the secret's UUID, when one was defined
#   ceph.env                     the above as KEY=VALUE lines (VMSNAP_CEPH_*) for tests
#   mon/ osd/ run/ log/          daemon data, pid files and admin sockets, logs
# Nothing is written to /etc/ceph. lab/ceph-down.sh stops the daemons and removes the folder.
# Prints one line per stage with its time.
set -euo pipefail

LAB_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LAB_DIR=${VMSNAP_LAB_DIR:-/var/lib/vmsnap-lab}
CEPH_DIR=${VMSNAP_CEPH_DIR:-$LAB_DIR/ceph}
CONF=$CEPH_DIR/ceph.conf
URI=qemu:///system
POOL=vmsnap
CLIENT=libvirt
SECRET_USAGE="vmsnap-lab client.$CLIENT"
MON_ID=a
OSD_ID=0
OSD_SIZE=$((4 * 1024 * 1024 * 1024)) # sparse; bluestore's default is 100 GiB

die() { echo "ceph up: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"

# Timing: one line per stage, with the stage's time and the time since the start.
t0=${EPOCHREALTIME/./}
t_stage=$t0
secs() { printf '%d.%02d' $(($1 / 1000000)) $(($1 % 1000000 / 10000)); }
stage() { # stage NAME DETAIL
  local now=${EPOCHREALTIME/./}
  printf 'ceph up: %-10s %6s s  (total %6s s)  %s\n' "$1" "$(secs $((now - t_stage)))" \
    "$(secs $((now - t0)))" "$2"
  t_stage=$now
}

# Runs a command, showing its output only if it fails.
quiet() {
  local out
  if ! out=$("$@" 2>&1); then
    echo "ceph up: '$*' failed:" >&2
    [ -n "$out" ] && echo "$out" >&2
    return 1
  fi
}

# pid_alive PIDFILE COMM: the pid in PIDFILE is a live (not zombie) process named COMM. PID 1 here
# does not reap, so kill -0 would also succeed on a dead daemon.
pid_alive() {
  local pid state
  [ -s "$1" ] || return 1
  pid=$(head -n1 "$1" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
  state=$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

# The clients, bounded: a cluster without quorum makes them wait forever.
ceph_() { timeout 30 ceph -c "$CONF" --connect-timeout 15 "$@"; }
rbd_() { timeout 30 rbd -c "$CONF" "$@"; }

MON_PID=$CEPH_DIR/run/mon.$MON_ID.pid
OSD_PID=$CEPH_DIR/run/osd.$OSD_ID.pid
MON_DATA=$CEPH_DIR/mon/ceph-$MON_ID
OSD_DATA=$CEPH_DIR/osd/ceph-$OSD_ID
KEY_FILE=$CEPH_DIR/client.$CLIENT.key
SECRET_FILE=$CEPH_DIR/libvirt-secret.uuid

libvirtd_answers() { timeout 10 virsh -c "$URI" version >/dev/null 2>&1; }

# secret_ok: the libvirt secret named in $SECRET_FILE exists and holds client.libvirt's key.
secret_ok() {
  local uuid value
  [ -s "$SECRET_FILE" ] && [ -s "$KEY_FILE" ] || return 1
  uuid=$(cat "$SECRET_FILE")
  value=$(timeout 10 virsh -c "$URI" secret-get-value "$uuid" 2>/dev/null) || return 1
  [ "$value" = "$(cat "$KEY_FILE")" ]
}

num_up_osds() {
  ceph_ osd stat -f json 2>/dev/null | sed -n 's/.*"num_up_osds": *\([0-9]*\).*/\1/p'
}

# healthy: daemons alive, the OSD up, the pool readable as client.libvirt (a real round trip to
# the OSD), QEMU's rbd driver at QEMU's version, and the secret in place if libvirtd runs.
healthy() {
  local f
  for f in ceph rbd ceph-mon ceph-osd qemu-img; do command -v "$f" >/dev/null || return 1; done
  for f in "$CONF" "$CEPH_DIR/ceph.client.admin.keyring" "$CEPH_DIR/ceph.client.$CLIENT.keyring" \
    "$KEY_FILE" "$CEPH_DIR/ceph.env"; do
    [ -s "$f" ] || return 1
  done
  [ "$(dpkg-query -W -f='${Version}' qemu-block-extra 2>/dev/null)" = \
    "$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null)" ] || return 1
  pid_alive "$MON_PID" ceph-mon && pid_alive "$OSD_PID" ceph-osd || return 1
  [ "$(num_up_osds)" = 1 ] || return 1
  rbd_ --id "$CLIENT" ls "$POOL" >/dev/null 2>&1 || return 1
  if libvirtd_answers; then secret_ok || return 1; fi
}

mkdir -p "$LAB_DIR"
# Two runs at once would both bootstrap; the second waits for the first. The daemons are started
# with 9>&-: they would otherwise inherit the lock and hold it for as long as they live.
exec 9>"$LAB_DIR/.ceph.lock"
flock -w 300 9 || die "another lab/ceph-up.sh or ceph-down.sh holds $LAB_DIR/.ceph.lock"

# --- quick path ----------------------------------------------------------------------------
if healthy; then
  health=$(ceph_ health 2>/dev/null || echo "health unknown")
  stage check "already up: $health, 1 OSD up, pool $POOL ($CEPH_DIR)"
  exit 0
fi
stage check "not up yet"

# --- packages --------------------------------------------------------------------------------
quiet "$LAB_SRC/install-packages.sh" --ceph
stage packages "$(dpkg-query -W -f='ceph ${Version}' ceph-mon), qemu-block-extra $(dpkg-query -W -f='${Version}' qemu-block-extra)"

# --- configuration and keys ----------------------------------------------------------------
# A monitor store that was not completely made (no marker) is unusable: start from nothing, OSD
# included, since an OSD belongs to the cluster (fsid) its monitor made.
if [ ! -e "$MON_DATA/vmsnap-mkfs-done" ]; then
  for d in "$OSD_PID:ceph-osd" "$MON_PID:ceph-mon"; do
    if pid_alive "${d%%:*}" "${d#*:}"; then
      kill -TERM "$(head -n1 "${d%%:*}")" 2>/dev/null || true
      for ((i = 0; i < 100; i++)); do pid_alive "${d%%:*}" "${d#*:}" || break; sleep 0.1; done
      pid_alive "${d%%:*}" "${d#*:}" && die "${d#*:} ($(head -n1 "${d%%:*}")) does not stop"
    fi
  done
  rm -rf -- "$CEPH_DIR"
fi
mkdir -p "$CEPH_DIR"/{mon,osd,run,log}
[ -s "$CEPH_DIR/fsid" ] || uuidgen >"$CEPH_DIR/fsid"
fsid=$(cat "$CEPH_DIR/fsid")

# Written each time (same content): the source of truth is this script.
cat >"$CONF.tmp" <<EOF
# Written by vmsnap's lab/ceph-up.sh: single node, everything on 127.0.0.1, pools of size 1.
[global]
fsid = $fsid
mon initial members = $MON_ID
mon host = v2:127.0.0.1:3300,v1:127.0.0.1:6789
public network = 127.0.0.0/8
cluster network = 127.0.0.0/8
ms bind ipv6 = false
run dir = $CEPH_DIR/run
pid file = $CEPH_DIR/run/\$name.pid
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
# One OSD, no replicas, no mgr: these would only be warnings.
mon warn on pool no redundancy = false
# Else HEALTH_WARN for minutes after the start.
auth allow insecure global id reclaim = false
# The mon stops below mon data avail crit (5% free by default) and warns below 30%.
mon data avail warn = 2
mon data avail crit = 1
# Every map change (OSD boot, pool create, ...) otherwise waits up to 1 s to be batched; a
# one-node lab has nothing to batch, and bring-up makes about ten of them.
paxos propose interval = 0.1

[mon]
mon data = $CEPH_DIR/mon/\$cluster-\$id
log file = $CEPH_DIR/log/\$cluster-\$name.log
mon cluster log file = $CEPH_DIR/log/\$cluster.log
# Not the debug lines: without a mgr the monitor logs a new mgrmap every 5 s.
mon cluster log file level = info

[osd]
osd data = $CEPH_DIR/osd/\$cluster-\$id
log file = $CEPH_DIR/log/\$cluster-\$name.log
osd objectstore = bluestore
# Bluestore on a sparse file (memstore would lose everything when the OSD restarts).
bluestore block path = $CEPH_DIR/osd/\$cluster-\$id/block.img
bluestore block create = true
bluestore block size = $OSD_SIZE
osd memory target = 536870912
# Checks the store it has just made (about 0.5 s): nothing to find on a new sparse file.
bluestore fsck on mkfs = false
# One op queue shard, not 5: fewer threads, and each shard's start opens and closes the block file
# (about 0.3 s each here).
osd op num shards = 1

# Only under [client]: in [global] the OSD would look for its key there and fail to authenticate.
[client]
keyring = $CEPH_DIR/ceph.\$name.keyring
EOF
mv -f "$CONF.tmp" "$CONF"
export CEPH_CONF=$CONF

if [ ! -s "$CEPH_DIR/ceph.client.admin.keyring" ] || [ ! -s "$CEPH_DIR/ceph.mon.keyring" ]; then
  rm -f "$CEPH_DIR/ceph.client.admin.keyring" "$CEPH_DIR/ceph.mon.keyring"
  quiet ceph-authtool --create-keyring "$CEPH_DIR/ceph.mon.keyring.tmp" --gen-key -n mon. \
    --cap mon 'allow *'
  quiet ceph-authtool --create-keyring "$CEPH_DIR/ceph.client.admin.keyring.tmp" --gen-key \
    -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *'
  quiet ceph-authtool "$CEPH_DIR/ceph.mon.keyring.tmp" \
    --import-keyring "$CEPH_DIR/ceph.client.admin.keyring.tmp"
  mv -f "$CEPH_DIR/ceph.client.admin.keyring.tmp" "$CEPH_DIR/ceph.client.admin.keyring"
  mv -f "$CEPH_DIR/ceph.mon.keyring.tmp" "$CEPH_DIR/ceph.mon.keyring"
fi
stage config "$CONF (fsid $fsid)"

# --- monitor -------------------------------------------------------------------------------
if [ ! -e "$MON_DATA/vmsnap-mkfs-done" ]; then
  rm -rf -- "$MON_DATA"
  quiet monmaptool --create --clobber --fsid "$fsid" \
    --addv "$MON_ID" '[v2:127.0.0.1:3300,v1:127.0.0.1:6789]' "$CEPH_DIR/monmap"
  quiet ceph-mon --mkfs -i "$MON_ID" --monmap "$CEPH_DIR/monmap" \
    --keyring "$CEPH_DIR/ceph.mon.keyring"
  touch "$MON_DATA/vmsnap-mkfs-done"
  mon_made="made and "
fi
if pid_alive "$MON_PID" ceph-mon; then
  mon_what="already running"
else
  for port in 3300 6789; do
    if [ -n "$(ss -Hltn "sport = :$port")" ]; then
      die "port $port on this machine is taken by another program ($(ss -Hltnp "sport = :$port" |
        sed -n 's/.*users:((\("[^"]*"\).*/\1/p' | head -n1)); is another Ceph running?"
    fi
  done
  rm -f "$MON_PID"
  # Without -f the daemon forks and the parent exits only once the child is ready (or failed).
  ceph-mon -i "$MON_ID" 9>&- </dev/null >>"$CEPH_DIR/log/mon.$MON_ID.out" 2>&1 ||
    die "ceph-mon failed to start; see $CEPH_DIR/log/ceph-mon.$MON_ID.log"
  mon_what="${mon_made:-}started"
fi
deadline=$((SECONDS + 60))
until ceph_ mon stat >/dev/null 2>&1; do
  [ $SECONDS -lt $deadline ] || die "the monitor does not answer after 60 s; see $CEPH_DIR/log/ceph-mon.$MON_ID.log"
  pid_alive "$MON_PID" ceph-mon || die "ceph-mon exited; see $CEPH_DIR/log/ceph-mon.$MON_ID.log"
  sleep 0.2
done
stage mon "$mon_what (mon.$MON_ID on 127.0.0.1:3300/6789, pid $(head -n1 "$MON_PID"))"

# --- OSD -----------------------------------------------------------------------------------
if [ ! -e "$OSD_DATA/vmsnap-mkfs-done" ]; then
  # A half-made OSD (interrupted run): forget it in the cluster map too, then make it again.
  if pid_alive "$OSD_PID" ceph-osd; then kill -KILL "$(head -n1 "$OSD_PID")" 2>/dev/null || true; fi
  rm -rf -- "$OSD_DATA"
  if ceph_ osd ls 2>/dev/null | grep -qx "$OSD_ID"; then
    quiet ceph_ osd purge "$OSD_ID" --yes-i-really-mean-it
  fi
  osd_uuid=$(uuidgen)
  osd_key=$(ceph-authtool --gen-print-key)
  # The key goes through stdin, not argv.
  id=$(printf '{"cephx_secret": "%s"}' "$osd_key" | ceph_ osd new "$osd_uuid" -i -) ||
    die "'ceph osd new' failed"
  [ "$id" = "$OSD_ID" ] || die "'ceph osd new' gave osd.$id, expected osd.$OSD_ID"
  mkdir -p "$OSD_DATA"
  quiet ceph-authtool --create-keyring "$OSD_DATA/keyring" --name "osd.$OSD_ID" --add-key "$osd_key"
  quiet ceph-osd -i "$OSD_ID" --mkfs --osd-uuid "$osd_uuid"
  touch "$OSD_DATA/vmsnap-mkfs-done"
  osd_made="made and "
fi
if pid_alive "$OSD_PID" ceph-osd; then
  osd_what="already running"
else
  rm -f "$OSD_PID"
  ceph-osd -i "$OSD_ID" 9>&- </dev/null >>"$CEPH_DIR/log/osd.$OSD_ID.out" 2>&1 ||
    die "ceph-osd failed to start; see $CEPH_DIR/log/ceph-osd.$OSD_ID.log"
  osd_what="${osd_made:-}started"
fi
deadline=$((SECONDS + 60))
until [ "$(num_up_osds)" = 1 ]; do
  [ $SECONDS -lt $deadline ] || die "osd.$OSD_ID is not up after 60 s; see $CEPH_DIR/log/ceph-osd.$OSD_ID.log"
  pid_alive "$OSD_PID" ceph-osd || die "ceph-osd exited; see $CEPH_DIR/log/ceph-osd.$OSD_ID.log"
  sleep 0.2
done
stage osd "$osd_what (osd.$OSD_ID, bluestore on a sparse $((OSD_SIZE >> 30)) GiB file, pid $(head -n1 "$OSD_PID"))"

# --- pool ----------------------------------------------------------------------------------
if ! ceph_ osd pool ls | grep -qx "$POOL"; then
  quiet ceph_ osd pool create "$POOL" 8 8 replicated
  pool_what=created
else
  pool_what=exists
fi
# Clone v2 (clones of unprotected snapshots, clones outliving their snapshot): mimic or later.
if [ "$(ceph_ osd get-require-min-compat-client)" != mimic ]; then
  quiet ceph_ osd set-require-min-compat-client mimic
fi
# Without a mgr the monitor reports MGR_DOWN (HEALTH_WARN) from 2 minutes after the first start;
# RBD does not need one, so the warning is muted for good (kept in the monitor's store).
quiet ceph_ health mute MGR_DOWN --sticky
# Writes the pool's RBD metadata: the first I/O, so it also waits until the PGs are active.
quiet timeout 60 rbd -c "$CONF" pool init "$POOL"
stage pool "$pool_what ($POOL: size $(ceph_ osd pool get "$POOL" size -f json |
  sed -n 's/.*"size": *\([0-9]*\).*/\1/p'), rbd initialised)"

# --- client.libvirt --------------------------------------------------------------------------
# profile rbd: what QEMU and rbd need on one pool (read, write, snapshots, clones, blocklisting a
# dead client's lock), nothing else.
quiet ceph_ auth get-or-create "client.$CLIENT" mon 'profile rbd' osd "profile rbd pool=$POOL" \
  -o "$CEPH_DIR/ceph.client.$CLIENT.keyring"
ceph_ auth get-key "client.$CLIENT" >"$KEY_FILE.tmp" || die "cannot read client.$CLIENT's key"
chmod 600 "$KEY_FILE.tmp" "$CEPH_DIR/ceph.client.$CLIENT.keyring"
mv -f "$KEY_FILE.tmp" "$KEY_FILE"
rbd_ --id "$CLIENT" ls "$POOL" >/dev/null 2>&1 || die "client.$CLIENT cannot list pool $POOL"
stage client "client.$CLIENT: $CEPH_DIR/ceph.client.$CLIENT.keyring"

# --- libvirt secret ------------------------------------------------------------------------
secret_uuid=
if ! libvirtd_answers; then
  stage secret "skipped: libvirtd does not answer on $URI (run this again once it does)"
elif secret_ok; then
  secret_uuid=$(cat "$SECRET_FILE")
  stage secret "already defined ($secret_uuid)"
else
  # Only one secret may carry a usage name: drop an older one of ours (by its name) first.
  for old in $(timeout 10 virsh -c "$URI" secret-list | awk -v u="ceph $SECRET_USAGE" \
    'NR > 2 && NF { uuid = $1; $1 = ""; sub(/^ +/, ""); if ($0 == u) print uuid }'); do
    quiet timeout 10 virsh -c "$URI" secret-undefine "$old"
  done
  # The same UUID as before when there was one, so a domain XML written earlier still works.
  secret_uuid=$(cat "$SECRET_FILE" 2>/dev/null || true)
  [[ $secret_uuid =~ ^[0-9a-f-]{36}$ ]] || secret_uuid=$(uuidgen)
  cat >"$CEPH_DIR/libvirt-secret.xml" <<EOF
<secret ephemeral='no' private='no'>
  <uuid>$secret_uuid</uuid>
  <usage type='ceph'><name>$SECRET_USAGE</name></usage>
</secret>
EOF
  quiet timeout 10 virsh -c "$URI" secret-define "$CEPH_DIR/libvirt-secret.xml"
  # --file takes the base64 text of the value: exactly what Ceph's key is.
  quiet timeout 10 virsh -c "$URI" secret-set-value "$secret_uuid" --file "$KEY_FILE"
  echo "$secret_uuid" >"$SECRET_FILE"
  secret_ok || die "the libvirt secret $secret_uuid does not hold client.$CLIENT's key"
  stage secret "defined $secret_uuid (usage ceph '$SECRET_USAGE')"
fi

# --- for tests ---------------------------------------------------------------------------------
cat >"$CEPH_DIR/ceph.env.tmp" <<EOF
VMSNAP_CEPH_CONF=$CONF
VMSNAP_CEPH_POOL=$POOL
VMSNAP_CEPH_USER=$CLIENT
VMSNAP_CEPH_KEYRING=$CEPH_DIR/ceph.client.$CLIENT.keyring
VMSNAP_CEPH_KEY_FILE=$KEY_FILE
VMSNAP_CEPH_ADMIN_KEYRING=$CEPH_DIR/ceph.client.admin.keyring
VMSNAP_CEPH_MON_HOST=127.0.0.1
VMSNAP_CEPH_MON_PORT=6789
VMSNAP_CEPH_SECRET_UUID=$secret_uuid
EOF
mv -f "$CEPH_DIR/ceph.env.tmp" "$CEPH_DIR/ceph.env"
stage ready "$(ceph_ health 2>/dev/null || echo "health unknown"); env for tests: $CEPH_DIR/ceph.env"
