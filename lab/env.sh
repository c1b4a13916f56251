# Lab environment, to be sourced: . lab/env.sh
# Exports VMSNAP_LAB_DIR, VMSNAP_LAB_VMS, LIBVIRT_DEFAULT_URI=qemu:///system and, once lab/up.sh
# has started the private bus, VMSNAP_BUS_ADDRESS (from $VMSNAP_LAB_DIR/bus-address).
# Sourced into the caller's shell, so it deliberately does not change shell options (no set -e).
export VMSNAP_LAB_DIR="${VMSNAP_LAB_DIR:-/var/lib/vmsnap-lab}"
export VMSNAP_LAB_VMS="vmsnap-lab-agent vmsnap-lab-noagent vmsnap-lab-mixed"
export LIBVIRT_DEFAULT_URI=qemu:///system
if [ -s "$VMSNAP_LAB_DIR/bus-address" ]; then
  VMSNAP_BUS_ADDRESS="$(cat "$VMSNAP_LAB_DIR/bus-address")"
  export VMSNAP_BUS_ADDRESS
fi
