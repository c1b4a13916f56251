# Guest side of bench/snapshot.sh (busybox ash, run detached in the lab guest; not on the host).
# Appends a monotonic timestamp in nanoseconds to /mnt/data/ticks, one line per write, without
# pause. A write to a frozen filesystem blocks until the thaw, so the longest write is the
# freeze window as the guest sees it: every write that took more than 2 ms is logged as
# "<before> <after>" to /run/stalls, on the initramfs (rootfs cannot be frozen).
# Only shell builtins in the loop (read, echo, [, $(( ))): no fork per tick.
# Clock: "now at N nsecs" of /proc/timer_list (ktime_get, ns); /proc/uptime (10 ms) without it.
echo $$ >/run/ticker.pid
renice -n 19 -p $$ >/dev/null 2>&1
: >/run/stalls
exec 3>>/mnt/data/ticks 4>>/run/stalls
if [ -r /proc/timer_list ]; then
  echo "timer_list (ns)" >/run/ticker.clock
  now() { { read -r _; read -r _; read -r _ _ n _; } </proc/timer_list; }
else
  echo "uptime (10 ms)" >/run/ticker.clock
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
done
