#!/usr/bin/env bash
# Builds the Arch package from this checkout with makepkg (Debian's `makepkg` package here; Arch's
# repositories are not reachable, hence --nodeps) and checks what a user of `makepkg -si` would get:
#   1. makepkg runs as an unprivileged build user, like on Arch (makepkg refuses root), including check();
#   2. the package holds the expected files with the expected modes, owners and metadata (.PKGINFO);
#   3. `systemd-analyze verify` accepts the units as installed, with no warning at all;
#   4. `systemd-analyze security --offline=true` rates nextn.service at an exposure of 2.0 or lower;
#   5. the packaged `nextn` (PYTHONPATH into the package tree) validates the packaged nextn.toml and
#      generates from a tiny model, once plainly and once under the service's MemoryDenyWriteExecute= +
#      NoNewPrivileges= filter.
# Usage: bash tools/package-check.sh [--keep] [extra makepkg args, e.g. --nocheck]
# Needs (Debian): makepkg, pacman (makepkg will not start without it), fakeroot, bsdtar, systemd-analyze,
# git -- apt: makepkg pacman-package-manager fakeroot libarchive-tools systemd git -- and the python
# modules build and installer (pip). Exits 0 only if every check passed, 3 if a prerequisite is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

KEEP=0
if [[ ${1:-} == --keep ]]; then KEEP=1; shift; fi
MAX_EXPOSURE=2.0

say() { printf '== %s\n' "$*"; }
die() { printf 'package-check: FAIL: %s\n' "$*" >&2; exit 1; }

# --- prerequisites: say exactly what is missing -------------------------------------------------------
PY=$(command -v "${PYTHON:-python3}") || die "no python3 on PATH"
missing=()
for tool in makepkg pacman fakeroot bsdtar systemd-analyze git; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
for mod in build installer; do
  "$PY" -c "import $mod" 2>/dev/null || missing+=("python module $mod")
done
if ((${#missing[@]})); then
  printf 'package-check: MISSING PREREQUISITES: %s\n' "${missing[*]}" >&2
  echo "package-check: install them with: apt-get install makepkg pacman-package-manager fakeroot" \
       "libarchive-tools systemd git;" \
       "python3 -m pip install build installer" >&2
  exit 3
fi
[[ -f config/nextn.toml ]] || die "config/nextn.toml is missing: the package installs it as /etc/nextn/nextn.toml"

WORK=$(mktemp -d /tmp/nextn-pkgcheck.XXXXXX)
cleanup() { if ((KEEP)); then echo "package-check: work tree kept in $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT
chmod 755 "$WORK"

# --- 1. the checkout as a fresh clone would have it: tracked and new files, none that git ignores ------
say "copying the checkout to $WORK/src"
mkdir -p "$WORK/src" "$WORK/home" "$WORK/bin"
git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done |
  tar -C "$REPO" --null -T - -c | tar -C "$WORK/src" -x

# Arch's PKGBUILD calls `python`; on Debian the interpreter may be python3 only (or a pyenv shim that
# needs the caller's HOME): link both names to the real interpreter.
PYREAL=$("$PY" -c 'import os, sys; print(os.path.realpath(sys.executable))')
ln -s "$PYREAL" "$WORK/bin/python"
ln -s "$PYREAL" "$WORK/bin/python3"

# makepkg asks pacman which packages are installed for .BUILDINFO; give it an empty database of its own
# rather than the host's (a Debian machine has none, and an unprivileged user cannot create one).
mkdir -p "$WORK/pacman-db/local"
printf '#!/bin/sh\nexec pacman --dbpath "%s" "$@"\n' "$WORK/pacman-db" >"$WORK/bin/pacman-local"
chmod 755 "$WORK/bin/pacman-local"

BUILD_ENV=(env -i "PACMAN=pacman-local" "HOME=$WORK/home" "PATH=$WORK/bin:/usr/local/bin:/usr/bin:/bin" "LANG=C.UTF-8"
           "XDG_CACHE_HOME=$WORK/home/.cache" "PKGEXT=.pkg.tar.gz" "BUILDDIR=$WORK/build"
           "PKGDEST=$WORK/out" "SRCDEST=$WORK/srcdest" "LOGDEST=$WORK/logs")
mkdir -p "$WORK/build" "$WORK/out" "$WORK/srcdest" "$WORK/logs"

# Python trees that an unprivileged user cannot reach (pyenv under a 0700 /root, say) are made reachable in
# a private mount namespace: each is bind-mounted aside, a tmpfs hides the closed directory above it, and
# the tree is mounted back at its own path. Nothing changes outside that namespace.
reach_script() {
  local dirs blocked=() d a perm p parts
  dirs=$("$PY" -c 'import os, sys; print("\n".join(sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)})))')
  local i=0 script="set -e"
  while IFS= read -r d; do
    a=/
    local top=""
    IFS=/ read -r -a parts <<<"${d#/}"
    for p in "${parts[@]}"; do
      a=${a%/}/$p
      perm=$(stat -c %A "$a")
      # the "others" search bit: the build user is neither owner nor group of such a tree
      if [[ $a != "$d" && ${perm:9:1} != [xt] ]]; then
        top=$a; break
      fi
    done
    [[ -z $top ]] && continue
    script+="; mkdir -p $WORK/hold/$i; mount --bind '$d' $WORK/hold/$i"
    blocked+=("$top|$d|$i")
    i=$((i + 1))
  done <<<"$dirs"
  local seen=" " entry top d2 n
  for entry in "${blocked[@]}"; do
    IFS='|' read -r top d2 n <<<"$entry"
    [[ $seen == *" $top "* ]] || script+="; mount -t tmpfs -o mode=0755,size=1m tmpfs '$top'"
    seen+="$top "
  done
  for entry in "${blocked[@]}"; do
    IFS='|' read -r top d2 n <<<"$entry"
    script+="; mkdir -p '$d2'; mount --bind $WORK/hold/$n '$d2'"
  done
  ((${#blocked[@]})) && printf '%s' "$script"
  return 0
}

if [[ $(id -u) == 0 ]]; then
  BUILDER=nobody
  chown -R "$BUILDER:" "$WORK"
  ns_setup=$(reach_script)
  run_as_builder() {
    if [[ -n $ns_setup ]]; then
      unshare --mount --propagation private -- bash -c "$ns_setup; exec runuser -u $BUILDER -- \"\$@\"" _ "$@"
    else
      runuser -u "$BUILDER" -- "$@"
    fi
  }
else
  BUILDER=$(id -un)
  run_as_builder() { "$@"; }
fi

say "makepkg --nodeps as $BUILDER (prepare, build, check, package)"
run_as_builder "${BUILD_ENV[@]}" bash -c 'cd "$1" && shift && makepkg --nodeps --noconfirm --cleanbuild "$@"' \
  _ "$WORK/src" "$@" || die "makepkg failed"

shopt -s nullglob
pkgfiles=("$WORK"/out/nextn-*.pkg.tar.gz)
((${#pkgfiles[@]} == 1)) || die "expected one package file in $WORK/out, found ${#pkgfiles[@]}"
PKGFILE=${pkgfiles[0]}
say "package: $(basename "$PKGFILE") ($(du -h "$PKGFILE" | cut -f1))"

# --- 2. contents, modes, owners, metadata ------------------------------------------------------------
say "contents"
bsdtar -tvf "$PKGFILE" | grep -v '/__pycache__/' | sed 's/^/   /'
"$PY" - "$PKGFILE" <<'EOF' || die "package contents"
import re, stat, sys, tarfile

members = {m.name.removeprefix("./").rstrip("/"): m for m in tarfile.open(sys.argv[1]).getmembers()}
errors = []

def expect(path, mode, kind="file"):
    m = members.get(path)
    if m is None:
        errors.append(f"missing: {path}")
        return
    isdir = m.isdir()
    if (kind == "dir") != isdir or (kind == "file" and not m.isfile()):
        errors.append(f"{path}: expected a {kind}")
    if stat.S_IMODE(m.mode) != mode:
        errors.append(f"{path}: mode {stat.S_IMODE(m.mode):04o}, expected {mode:04o}")

site = [p for p in members if re.fullmatch(r"usr/lib/python3\.\d+/site-packages/nextn", p)]
if len(site) != 1:
    errors.append(f"expected one usr/lib/python3.*/site-packages/nextn, found {site}")
    site = ["usr/lib/python3/site-packages/nextn"]
pkg = site[0]

expect("usr/bin/nextn", 0o755)
expect(f"{pkg}/__init__.py", 0o644)
expect(f"{pkg}/cli.py", 0o644)
expect(f"{pkg}/cl/runtime.py", 0o644)
exts = [p for p in members if re.fullmatch(rf"{re.escape(pkg)}/_launch\.cpython-[^/]+\.so", p)]
if not exts:
    errors.append(f"missing: the compiled {pkg}/_launch.cpython-*.so")
for p in exts:
    expect(p, 0o755)
kernels = [p for p in members if p.startswith(f"{pkg}/kernels/") and p.endswith(".cl")]
if len(kernels) < 5:
    errors.append(f"expected the OpenCL kernels in {pkg}/kernels/, found {len(kernels)}")
if not any(re.fullmatch(rf"{re.escape(pkg)}-[^/]+\.dist-info/METADATA", p) for p in members):
    errors.append("missing: nextn-*.dist-info/METADATA")

expect("usr/lib/systemd/system/nextn.service", 0o644)
expect("usr/lib/systemd/system/nextn.socket", 0o644)
expect("usr/lib/sysusers.d/nextn.conf", 0o644)
expect("usr/lib/tmpfiles.d/nextn.conf", 0o644)
expect("etc/nextn/nextn.toml", 0o644)
expect("etc/nextn/conf.d", 0o755, "dir")
expect("etc/nextn/conf.d/50-model.toml", 0o644)
expect("usr/share/licenses/nextn/LICENSE", 0o644)
expect("usr/share/doc/nextn/install-arch.md", 0o644)

for name, m in members.items():
    if name.startswith("."):
        continue  # .PKGINFO, .BUILDINFO, .MTREE
    if not (name.startswith("usr/") or name.startswith("etc/") or name in ("usr", "etc")):
        errors.append(f"unexpected path outside /usr and /etc: {name}")
    if m.uid != 0 or m.gid != 0:
        errors.append(f"{name}: owner {m.uid}:{m.gid}, expected root:root")
    if m.mode & 0o002:
        errors.append(f"{name}: world-writable")
    if "/tests/" in name or name.endswith("/tests"):
        errors.append(f"test files packaged: {name}")

info = tarfile.open(sys.argv[1]).extractfile(".PKGINFO").read().decode()
fields = {}
for line in info.splitlines():
    if " = " in line:
        k, v = line.split(" = ", 1)
        fields.setdefault(k, []).append(v)
want = {
    "pkgname": ["nextn"], "arch": ["x86_64"], "license": ["MIT"], "backup": ["etc/nextn/conf.d/50-model.toml"],
}
for k, v in want.items():
    if fields.get(k) != v:
        errors.append(f".PKGINFO {k} = {fields.get(k)}, expected {v}")
for dep in ("python", "python-numpy", "python-gguf", "python-pyopencl", "python-tokenizers", "python-jinja",
            "python-tqdm", "python-aiohttp", "python-systemd", "opencl-icd-loader"):
    if dep not in fields.get("depend", []):
        errors.append(f".PKGINFO lacks depend = {dep}")
for opt in ("rocm-opencl-runtime", "opencl-mesa", "opencl-nvidia", "intel-compute-runtime", "pocl"):
    if not any(o.startswith(opt + ": ") and len(o) > len(opt) + 8 for o in fields.get("optdepend", [])):
        errors.append(f".PKGINFO lacks optdepend = {opt}: <reason>")

if errors:
    print("\n".join("   " + e for e in errors), file=sys.stderr)
    sys.exit(1)
print(f"   ok: {len(members)} entries, {len(kernels)} kernels, backup and dependencies as expected")
EOF

# --- 3. systemd-analyze verify on the installed units ------------------------------------------------
# verify needs the host's own units (sysinit.target, sockets.target ...) in the root it checks against,
# and ExecStart= must be executable inside that root.
ROOT=$WORK/root
mkdir -p "$ROOT/usr/lib/systemd/system"
for d in /usr/lib/systemd/system /lib/systemd/system; do
  [[ -d $d ]] && cp -a "$d/." "$ROOT/usr/lib/systemd/system/"
done
bsdtar -xpf "$PKGFILE" -C "$ROOT" --exclude '.PKGINFO' --exclude '.BUILDINFO' --exclude '.MTREE'
# ExecReload= calls kill(1), which Arch's util-linux puts in /usr/bin.
install -Dm755 "$(type -P kill)" "$ROOT/usr/bin/kill"
say "systemd-analyze verify nextn.service nextn.socket"
if ! out=$(systemd-analyze verify --root="$ROOT" nextn.service nextn.socket 2>&1) || [[ -n $out ]]; then
  printf '%s\n' "$out" >&2
  die "systemd-analyze verify reported problems (every warning counts)"
fi
echo "   ok: no warnings"

# --- 4. exposure score --------------------------------------------------------------------------------
say "systemd-analyze security --offline=true nextn.service"
sec=$(systemd-analyze security --offline=true --threshold=$(( ${MAX_EXPOSURE%.*} * 10 + ${MAX_EXPOSURE#*.} )) \
        "$ROOT/usr/lib/systemd/system/nextn.service" 2>&1) && sec_rc=0 || sec_rc=$?
printf '%s\n' "$sec" | grep -E '^✗' | sed 's/^/   /'
exposure=$(printf '%s\n' "$sec" | sed -n 's/.*Overall exposure level for nextn.service: \([0-9.]*\).*/\1/p')
[[ -n $exposure ]] || { printf '%s\n' "$sec" >&2; die "no exposure level in the output"; }
echo "   exposure: $exposure (limit $MAX_EXPOSURE)"
awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e <= m) }' \
  || die "nextn.service exposure $exposure is above $MAX_EXPOSURE: hardening was lost"
((sec_rc == 0)) || die "systemd-analyze security --threshold failed (rc $sec_rc)"

# --- 5. the packaged nextn runs ---------------------------------------------------------------------
PKGDIR=$WORK/build/nextn/pkg/nextn
SITE=$(printf '%s\n' "$PKGDIR"/usr/lib/python3.*/site-packages)
export PYTHONPATH=$SITE XDG_CACHE_HOME=$WORK/run-cache
unset CACHE_DIRECTORY
RUN=$WORK/run
mkdir -p "$RUN"
say "the packaged nextn: $("$PY" -c 'import nextn; print(nextn.__file__)')"
"$PY" -c 'import nextn, sys; sys.exit(not nextn.__file__.startswith(sys.argv[1]))' "$SITE/" \
  || die "nextn was not imported from the package tree"
"$PKGDIR/usr/bin/nextn" make-tiny "$RUN/tiny.gguf" --arch qwen3 --type Q8_0 --seed 7 >/dev/null \
  || die "nextn make-tiny failed"

say "nextn config check /etc/nextn/nextn.toml (as packaged)"
"$PKGDIR/usr/bin/nextn" config check "$PKGDIR/etc/nextn/nextn.toml" || die "the packaged nextn.toml does not validate"
"$PKGDIR/usr/bin/nextn" config check "$PKGDIR/etc/nextn/conf.d/50-model.toml" \
  || die "the packaged conf.d/50-model.toml does not validate"

say "nextn generate (plain)"
"$PKGDIR/usr/bin/nextn" generate -m "$RUN/tiny.gguf" -p "Hello" -n 8 --ignore-eos >"$RUN/out1" 2>"$RUN/err1" \
  || { cat "$RUN/err1" >&2; die "nextn generate failed"; }
grep -q "decode: 8 tokens" "$RUN/err1" || { cat "$RUN/err1" >&2; die "nextn generate did not make 8 tokens"; }
sed 's/^/   /' "$RUN/err1"

# nextn.service sets MemoryDenyWriteExecute=yes and NoNewPrivileges=yes. systemd enforces the first with a
# seccomp filter; this installs the same filter (as systemd 252 builds it) through libseccomp and runs
# generation again with a cold kernel cache, so PoCL must compile and load every kernel under it.
say "nextn generate under the unit's MemoryDenyWriteExecute= seccomp filter (cold kernel cache)"
export XDG_CACHE_HOME=$WORK/run-cache-mdwe
"$PY" - "$PKGDIR/usr/bin/nextn" generate -m "$RUN/tiny.gguf" -p "Hello" -n 8 --ignore-eos \
  >"$RUN/out2" 2>"$RUN/err2" <<'EOF' || { cat "$RUN/err2" >&2; die "nextn generate failed under MemoryDenyWriteExecute"; }
import ctypes, ctypes.util, errno, mmap, os, runpy, sys

libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NO_NEW_PRIVS = 38
if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
    sys.exit(f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}")

name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
sc = ctypes.CDLL(name, use_errno=True)
class Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]
SCMP_ACT_ALLOW, SCMP_CMP_MASKED_EQ, SCMP_CMP_NE = 0x7FFF0000, 7, 1
SCMP_ACT_EPERM = 0x00050000 | errno.EPERM
sc.seccomp_init.restype = ctypes.c_void_p
sc.seccomp_init.argtypes = [ctypes.c_uint32]
sc.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
sc.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(Cmp)]
sc.seccomp_load.argtypes = [ctypes.c_void_p]
ctx = sc.seccomp_init(SCMP_ACT_ALLOW)
WX = mmap.PROT_WRITE | mmap.PROT_EXEC
SHM_EXEC = 0o100000
rules = [  # systemd src/shared/seccomp-util.c: seccomp_memory_deny_write_execute()
    ("mmap", 2, WX, WX), ("mprotect", 2, mmap.PROT_EXEC, mmap.PROT_EXEC),
    ("pkey_mprotect", 2, mmap.PROT_EXEC, mmap.PROT_EXEC), ("shmat", 2, SHM_EXEC, SHM_EXEC),
]
for call, arg, mask, value in rules:
    nr = sc.seccomp_syscall_resolve_name(call.encode())
    cmp = (Cmp * 1)(Cmp(arg, SCMP_CMP_MASKED_EQ, mask, value))
    if sc.seccomp_rule_add_array(ctx, SCMP_ACT_EPERM, nr, 1, cmp) != 0:
        sys.exit(f"seccomp_rule_add({call}) failed")
if sc.seccomp_load(ctx) != 0:
    sys.exit("seccomp_load failed")
# The filter is live: W+X memory must now be refused, or this check proves nothing.
probe = libc.mmap
probe.restype = ctypes.c_void_p
probe.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
if probe(None, 4096, mmap.PROT_READ | WX, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0) not in (None, 2**64 - 1):
    sys.exit("the W+X filter did not take effect")
print("   filter loaded: a W+X mmap is refused", file=sys.stderr)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
EOF
grep -q "decode: 8 tokens" "$RUN/err2" || { cat "$RUN/err2" >&2; die "generation under the filter did not make 8 tokens"; }
cmp -s "$RUN/out1" "$RUN/out2" || die "greedy output differs under the filter"
sed 's/^/   /' "$RUN/err2"

say "all package checks passed (exposure $exposure)"
