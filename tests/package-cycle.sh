#!/usr/bin/env bash
# The .deb's install -> use -> reinstall -> remove -> purge cycle, on this
# machine but inside a private mount namespace: /etc, /usr and /var are
# overlays whose upper layers catch every change, /run is private. Nothing
# reaches the host. Run by tests/tests/package.rs as
#   unshare --mount --propagation private -- package-cycle.sh DEB WORKDIR GUEST
# Prints "ok: ..." per check; exits non-zero at the first failure.
set -euo pipefail
deb=$1 work=$2 guest=$3

fail() { echo "FAIL: $*" >&2; exit 1; }
ok() { echo "ok: $*"; }

for dir in etc usr var; do
    mkdir -p "$work/$dir-upper" "$work/$dir-work" "$work/$dir-lower"
    # The host's tree stays readable beside the overlay, to tell a directory
    # the overlay merely copied up from one the package left behind.
    mount --bind "/$dir" "$work/$dir-lower"
    mount -t overlay overlay -o "lowerdir=/$dir,upperdir=$work/$dir-upper,workdir=$work/$dir-work" "/$dir"
done
mount -t tmpfs tmpfs /run
mkdir -p /run/lock

# libvirtd as root without virtlogd or security labelling, as the e2e sandbox.
mkdir -p /etc/libvirt
printf 'user = "root"\ngroup = "root"\nsecurity_driver = "none"\nstdio_handler = "file"\n' >/etc/libvirt/qemu.conf
printf 'unix_sock_group = "root"\n' >/etc/libvirt/libvirtd.conf

# Every path in the upper layers that differs from the host (directories
# the host has are only copied up), but the bookkeeping of dpkg and of the
# test's own libvirtd.
changes() {
    (cd "$work" && find etc-upper usr-upper var-upper -mindepth 1 | sort) |
        while read -r path; do
            lower="$work/${path/-upper/-lower}"
            [ -d "$work/$path" ] && [ ! -L "$work/$path" ] && [ -d "$lower" ] && continue
            echo "$path"
        done |
        grep -Ev '^var-upper/(lib/dpkg|log|cache|lib/libvirt|lib/systemd|backups)(/|$)' |
        grep -Ev '^etc-upper/libvirt/(qemu|qemu\.conf|libvirtd\.conf|nwfilter|secrets|storage)(/|$)' |
        grep -Ev '^etc-upper/libvirt$' || true
}
before=$(changes)

# --- install ---------------------------------------------------------------
out=$(dpkg -i "$deb" 2>&1) || fail "dpkg -i: $out"
echo "$out" | sed 's/^/  dpkg: /'
echo "$out" | grep -q "installed the libvirt hook /etc/libvirt/hooks/qemu.d/50-pinner" || fail "no hook message"
echo "$out" | grep -q "systemd is not running" || fail "no systemd message"
for f in /usr/bin/pinner /usr/libexec/pinner/pinner-hook /usr/libexec/pinner/pinner-maint \
    /etc/pinner/pinner.toml /lib/systemd/system/pinner.service \
    /usr/share/man/man8/pinner.8.gz /usr/share/man/man8/pinner-hook.8.gz \
    /usr/share/bash-completion/completions/pinner; do
    [ -e "$f" ] || fail "$f missing"
done
ok "files installed"
# The change listing sees what the package put there (so an empty diff at
# the end means something).
installed=$(changes)
for f in usr-upper/bin/pinner usr-upper/libexec/pinner/pinner-hook etc-upper/pinner/pinner.toml \
    etc-upper/libvirt/hooks/qemu.d/50-pinner; do
    echo "$installed" | grep -qx "$f" || fail "change listing misses $f"
done
[ "$(readlink /etc/libvirt/hooks/qemu.d/50-pinner)" = /usr/libexec/pinner/pinner-hook ] || fail "hook link"
ok "hook linked into /etc/libvirt/hooks/qemu.d"
cmp -s /etc/pinner/pinner.toml "$(dirname "$0")/../packaging/pinner.toml" || fail "config differs from the shipped one"
# Not a conffile: configure installs it only when absent, so a configuration
# placed before the install (mode = "observe", say) is the one used.
! grep -qsx /etc/pinner/pinner.toml /var/lib/dpkg/info/pinner.conffiles || fail "config is a conffile"
ok "config installed by configure, not as a conffile"
if command -v systemd-analyze >/dev/null; then
    verify=$(systemd-analyze verify /lib/systemd/system/pinner.service 2>&1 | grep -v "man pinner" || true)
    [ -z "$verify" ] || fail "systemd-analyze verify: $verify"
    ok "unit verifies (systemd-analyze)"
fi
man -w pinner-isolate >/dev/null 2>&1 || [ -e /usr/share/man/man8/pinner-isolate.8.gz ] || fail "no pinner-isolate man page"
ok "man pages present"

# --- use: the sandboxed libvirtd runs the installed hook -------------------
libvirtd >"$work/libvirtd.log" 2>&1 &
libvirtd_pid=$!
PINNER_LOG=stderr /usr/bin/pinner daemon >"$work/daemon.log" 2>&1 &
daemon_pid=$!
cleanup() {
    virsh -c qemu:///system destroy "$guest" >/dev/null 2>&1 || true
    virsh -c qemu:///system undefine "$guest" >/dev/null 2>&1 || true
    kill "$daemon_pid" "$libvirtd_pid" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 100); do
    virsh -c qemu:///system version >/dev/null 2>&1 && [ -S /run/pinner/pinner.sock ] && break
    sleep 0.2
done
cat >"$work/guest.xml" <<XML
<domain type='qemu'>
  <name>$guest</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>
XML
virsh -c qemu:///system define "$work/guest.xml" >/dev/null
virsh -c qemu:///system start "$guest" >/dev/null
synced=no
for _ in $(seq 100); do
    status=$(/usr/bin/pinner status --json 2>/dev/null || true)
    if echo "$status" | grep -q '"in_sync": true' &&
        echo "$status" | grep -Eq '"events_received": [1-9]'; then
        synced=yes
        break
    fi
    sleep 0.1
done
[ "$synced" = yes ] || fail "guest not pinned after a hook event: $status $(cat "$work/daemon.log")"
ok "installed hook delivered events; guest pinned ($(virsh -c qemu:///system vcpupin "$guest" | awk '/^ *0/ {print "vCPU 0 -> CPU " $2}'))"
# With no `[metrics] file`, the daemon writes node_exporter's textfile
# directory when it exists (it is the overlay's copy here).
metrics=/var/lib/prometheus/node-exporter/pinner.prom
if [ -d "$(dirname "$metrics")" ]; then
    for _ in $(seq 100); do grep -qs '^pinner_' "$metrics" && break; sleep 0.2; done
    grep -qs '^pinner_' "$metrics" || fail "no metrics in $metrics: $(cat "$work/daemon.log")"
    ok "metrics written to node_exporter's textfile directory by default"
fi
cleanup
trap - EXIT

# --- reinstall (an upgrade to the same version) is idempotent --------------
out=$(dpkg -i "$deb" 2>&1) || fail "reinstall: $out"
echo "$out" | grep -q "installed the libvirt hook" && fail "reinstall installed the hook again"
[ "$(readlink /etc/libvirt/hooks/qemu.d/50-pinner)" = /usr/libexec/pinner/pinner-hook ] || fail "hook link after reinstall"
/usr/libexec/pinner/pinner-maint configure >/dev/null
/usr/libexec/pinner/pinner-maint configure >/dev/null
[ "$(ls /etc/libvirt/hooks/qemu.d)" = 50-pinner ] || fail "configure twice left $(ls /etc/libvirt/hooks/qemu.d)"
ok "reinstall and repeated configure change nothing"

# An operator's own hook is never replaced.
rm /etc/libvirt/hooks/qemu.d/50-pinner
printf '#!/bin/sh\nexit 0\n' >/etc/libvirt/hooks/qemu.d/50-pinner
out=$(/usr/libexec/pinner/pinner-maint configure)
echo "$out" | grep -q "exists and is not pinner's; left as it is" || fail "no warning about the operator's hook: $out"
grep -q "exit 0" /etc/libvirt/hooks/qemu.d/50-pinner || fail "operator's hook replaced"
rm /etc/libvirt/hooks/qemu.d/50-pinner
/usr/libexec/pinner/pinner-maint configure >/dev/null
ok "an operator's hook in pinner's place is left alone, with a message"

# With systemd (a fake systemctl that records its calls and says every
# unit but virtqemud is active, a monolithic host): the service is enabled
# and restarted, and the running libvirt daemon is reloaded only when it had
# no qemu hook before.
fake="$work/fake-systemd"
mkdir -p "$fake/bin" "$fake/run" "$fake/hooks"
printf '#!/bin/sh\necho "$*" >>%s/calls\ncase "$*" in *virtqemud*) exit 3 ;; esac\nexit 0\n' "$fake" >"$fake/bin/systemctl"
chmod 755 "$fake/bin/systemctl"
maint() { PATH="$fake/bin:$PATH" PINNER_SYSTEMD_DIR="$fake/run" PINNER_HOOKS_DIR="$fake/hooks" /usr/libexec/pinner/pinner-maint "$@"; }
out=$(maint configure)
echo "$out" | grep -q "reloaded libvirtd so it runs the new hook" || fail "no reload message: $out"
expected="is-active --quiet virtqemud.service
is-active --quiet libvirtd.service
reload libvirtd.service
daemon-reload
enable pinner.service
restart pinner.service"
[ "$(cat "$fake/calls")" = "$expected" ] || fail "systemctl calls on first configure: $(cat "$fake/calls")"
: >"$fake/calls"
maint configure >/dev/null
[ "$(cat "$fake/calls")" = "daemon-reload
enable pinner.service
restart pinner.service" ] || fail "second configure reloaded libvirt again: $(cat "$fake/calls")"
: >"$fake/calls"
maint remove >/dev/null
[ "$(head -1 "$fake/calls")" = "disable --now pinner.service" ] || fail "remove: $(cat "$fake/calls")"
[ ! -e "$fake/hooks" ] || fail "remove left the hooks directory it made"
ok "with systemd: enabled, restarted, libvirtd reloaded only for a new hook, stopped on remove"

# libvirt before 6.5 runs only hooks/qemu: pinner's hook goes there when the
# place is free, and an operator's hook there is kept, with what to add.
printf '#!/bin/sh\necho "libvirtd (libvirt) 6.0.0"\n' >"$fake/bin/libvirtd"
chmod 755 "$fake/bin/libvirtd"
rm -f "$fake/run/"* && rmdir "$fake/run"
maint configure >/dev/null
[ "$(readlink "$fake/hooks/qemu")" = /usr/libexec/pinner/pinner-hook ] || fail "old libvirt: hooks/qemu not linked"
[ ! -e "$fake/hooks/qemu.d" ] || fail "old libvirt: qemu.d made"
maint remove >/dev/null
mkdir -p "$fake/hooks" && printf '#!/bin/sh\n' >"$fake/hooks/qemu"
out=$(maint configure)
echo "$out" | grep -q 'add this line to it .*/usr/libexec/pinner/pinner-hook "\$@"' || fail "old libvirt: no advice: $out"
[ ! -L "$fake/hooks/qemu" ] || fail "old libvirt: operator's hook replaced"
ok "libvirt < 6.5: hooks/qemu used when free, an operator's kept with advice"

# --- remove, then purge ----------------------------------------------------
# Removal undoes host isolation: a dummy of the test's (the only process
# the config lets pinner move) is confined first, and must be back after.
setsid sleep 600 </dev/null >/dev/null 2>&1 &
dummy=$!
trap 'kill "$dummy" 2>/dev/null || true' EXIT
sleep 0.2
first_cpu=$(cut -d, -f1 /sys/devices/system/cpu/online | cut -d- -f1)
sed -i "s/^#reserved_cpus = \"\"/reserved_cpus = \"$first_cpu\"/" /etc/pinner/pinner.toml
sed -i "s/^group = \"pinner-housekeeping\"/group = \"pinner-pkg-$dummy\"/" /etc/pinner/pinner.toml
out=$(PINNER_TEST_ONLY_PROCESS_GROUP=$dummy /usr/bin/pinner isolate apply 2>&1) || fail "pinner isolate apply: $out"
grep -q ":cpuset:/pinner-pkg-$dummy\$" "/proc/$dummy/cgroup" || fail "dummy not confined: $(cat "/proc/$dummy/cgroup")"
out=$(dpkg -r pinner 2>&1) || fail "dpkg -r: $out"
echo "$out" | sed 's/^/  dpkg: /'
grep -q ":cpuset:/\$" "/proc/$dummy/cgroup" || fail "dummy still confined after remove"
[ ! -e "/sys/fs/cgroup/cpuset/pinner-pkg-$dummy" ] || fail "isolation group left after remove"
kill "$dummy"
ok "remove undid host isolation"
[ ! -e /etc/libvirt/hooks/qemu.d/50-pinner ] || fail "hook left after remove"
[ ! -e /usr/bin/pinner ] || fail "binary left after remove"
[ ! -e /var/lib/prometheus/node-exporter/pinner.prom ] || fail "metrics file left after remove"
[ -e /etc/pinner/pinner.toml ] || fail "remove must keep the config"
ok "remove: hook and binaries gone, config kept"
out=$(dpkg --purge pinner 2>&1) || fail "dpkg --purge: $out"
[ ! -e /etc/pinner ] || fail "/etc/pinner left after purge"
after=$(changes)
echo "changed paths before install:"; echo "$before" | sed 's/^/  /'
echo "changed paths after purge:"; echo "$after" | sed 's/^/  /'
[ "$before" = "$after" ] || fail "purge left: $(diff <(echo "$before") <(echo "$after") | grep '^>' || true)"
ok "purge leaves nothing behind"
