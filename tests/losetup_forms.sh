#!/usr/bin/env bash
# The losetup forms shell-driven image builders use, one block each:
#   == NAME
#   <stdout>
#   rc=<exit status>
# Run in a directory holding a.img, "b c.img", c.img, d.img, gpt.img and ro.img
# (mode 0444: root attaches it read-write, as losetup does), with
# the losetup under test first in PATH (tests/test_losetup.py runs it with
# util-linux's and with loopdev's drop-in, on the host and in a container).
# Listings keep only the lines of devices of these images (and headings):
# other users' devices come and go meanwhile. Everything attached here is
# detached here.
set -u
W=$PWD

form() { # NAME COMMAND...
  local name=$1
  shift
  echo "== $name"
  "$@"
  echo "rc=$?"
}
ours() { # COMMAND...: its stdout, only the lines about our images
  local out rc
  out=$("$@")
  rc=$?
  printf '%s\n' "$out" | grep -F -e "$W/" -e 'NAME ' || true
  return $rc
}
attach_chosen() { # NAME FILE: attach FILE to the device -f names (another
  # allocator may take it first, then it is busy and -f names the next one; a
  # device still being released answers ENXIO). Other failures (no node for it
  # in a static /dev) are the answer: retrying only waited 20 x 0.1 s.
  local dev rc err
  echo "== $1"
  for _ in $(seq 20); do
    dev=$(losetup -f)
    err=$(losetup "$dev" "$2" 2>&1 >/dev/null)
    rc=$?
    [ $rc -ne 0 ] || break
    case "$err" in
      *"resource busy"* | *"temporarily unavailable"* | *"No such device or address"*) ;;
      *) break ;;
    esac
    sleep 0.1
  done
  echo "rc=$rc"
}
attach() { # VAR NAME ARGS...: attach, keep the device path in VAR
  local var=$1 name=$2 out rc
  shift 2
  out=$(losetup "$@")
  rc=$?
  printf -v "$var" '%s' "$out"
  echo "== $name"
  [ -z "$out" ] || echo "$out"
  echo "rc=$rc"
}

form find-free losetup -f
attach A attach-show -f --show a.img
attach B attach-options -f --show -r -o 1M --sizelimit 2M "b c.img"
attach P attach-partscan -f --show -P gpt.img
echo "== x-partitions (not compared: the kernel here has no partition parsers)"
ls "$P"p* 2>/dev/null
echo "rc=0"
attach C attach-dio-sector -f --show --direct-io=on -b 4096 c.img
form attach-quiet losetup -f --direct-io=off d.img
D=$(losetup -j d.img | cut -d: -f1)
form nooverlap-reuse losetup -f --show -L -r -o 1M --sizelimit 2M "b c.img"
form nooverlap-conflict losetup -f --show -L -o 512K "b c.img"
form associated losetup -j a.img
form associated-offset losetup -j "b c.img" -o 1048576
form associated-other-offset losetup -j "b c.img" -o 0
form associated-missing losetup -j missing.img
form all ours losetup -a
form show-one losetup "$B"
form list-associated losetup -l -j "b c.img"
form list-device losetup -l "$C"
form list-all ours losetup -l
form list-default ours losetup
form list-noheadings losetup -l -n -j "b c.img"
form list-raw losetup -l --raw -j "b c.img"
form list-raw-all ours losetup --raw -l
form list-columns losetup -l -O NAME,RO,BACK-FILE,PARTSCAN -j gpt.img
form list-output-all losetup --output-all -l -j "b c.img"
form list-json losetup -J -l "$C"
form list-json-all-columns losetup -J --output-all -l -j "b c.img"
form list-json-none losetup -J -l -j missing.img
form set-capacity losetup -c "$A"
form error-busy losetup "$A" a.img
form error-missing-file losetup -f --show missing.img
form error-column losetup -l -O NAME,BOGUS
form error-option losetup --bogus
form error-exclusive losetup -D -a
form error-offset-context losetup -o 1M -a
form error-setup-only losetup -r -l
form error-unexpected losetup -f a.img c.img
form error-size losetup -f --show -o 12x a.img
echo "== help"
losetup -h >/dev/null
echo "rc=$?"
echo "== version"
losetup -V >/dev/null
echo "rc=$?"
form detach losetup -d "$A" "$B" "$P"
# Devices that do not exist (a device we released may be another user's now).
form error-detach-missing losetup -d /dev/loop999999
form error-show-missing losetup /dev/loop999999
form error-capacity-missing losetup -c /dev/loop999999
# LOOPDEV FILE: a device chosen by the caller.
attach_chosen attach-chosen a.img
F=$(losetup -j a.img | cut -d: -f1)
form attach-chosen-check ours losetup -j a.img
form detach-rest losetup -d "$C" "$D" $F
# A mode-0444 file as root: opened read-write, attached read-write (RO 0), by -f
# and on a chosen device.
attach R attach-mode-0444 -f --show ro.img
form list-mode-0444 losetup -l -n -O RO,BACK-FILE -j ro.img
form detach-mode-0444 losetup -d "$R"
attach_chosen attach-chosen-mode-0444 ro.img
form list-chosen-mode-0444 losetup -l -n -O RO,BACK-FILE -j ro.img
G=$(losetup -j ro.img | cut -d: -f1)
form detach-chosen-mode-0444 losetup -d $G
