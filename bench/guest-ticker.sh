# Guest side of bench/snapshot.sh (busybox ash, run detached in the lab guest; not on the host).
#
# About every millisecond, appends a monotonic timestamp in nanoseconds to /mnt/data/ticks (the
# filesystem that gets frozen). A write to a frozen filesystem blocks until the thaw, so the
# longest write is the freeze window as the guest sees it: every write that took more than 2 ms
# is logged as "<before> <after>" to /run/stalls, on the initramfs (rootfs is never frozen).
#
# Only shell builtins in the loop (read, echo, [, $(( ))): no fork per tick. Between ticks it
# waits 1 ms in `read -t 0.001` on a FIFO nobody writes to, so the vCPU (a host core under TCG)
# stays mostly idle and the loop does not compete with qemu-ga; a tick takes about 1.2 ms.
# Clock: "now at N nsecs" of /proc/timer_list (ktime_get, ns); /proc/uptime (10 ms) without it.
echo $$ >/run/ticker.pid
: >/run/stalls
rm -f /run/ticker.fifo
mkfifo /run/ticker.fifo
exec 3>>/mnt/data/ticks 4>>/run/stalls 5<>/run/ticker.fifo
if [ -r /proc/timer_list ]; then
  echo "/proc/timer_list (1 ns)" >/run/ticker.clock
  now() { { read -r _; read -r _; read -r _ _ n _; } </proc/timer_list; }
else
  echo "/proc/uptime (10 ms)" >/run/ticker.clock
  now() {
    read -r n _ </proc/uptime
    n=${n%.*}${n#*.}0000000
  }
fi
while :; do
  now; t=$n
  echo "$t" >&3
  now
  [ $((n - t)) -gt 2000000 ] && echo "$t $n" >&4
  read -r -t 0.001 _ <&5
done
