"""Run untrusted Python (model-written code) in a sandbox: `run_python` and `run_many`.

Every program runs as a fresh `python -I -S main.py` (stdlib only, no site-packages, no user
environment) in its own session and process group, under resource limits, with a clean fixed
environment (PATH, HOME and TMPDIR = its scratch directory, LANG=C.UTF-8, PYTHONDONTWRITEBYTECODE,
PYTHONHASHSEED=0; nothing of the caller's), stdin from a file, stdout/stderr to files that are read
back truncated to `OUTPUT_LIMIT_BYTES`. A wall-clock timeout SIGKILLs the whole process group.

Isolation levels, best first; the best that works here is chosen once per process (probed by
running a tiny program) and reported in `SandboxResult.isolation`. `PLURIBUS_SANDBOX=bwrap|
namespaces|rlimits` forces one (an error if it does not work here).

| level | what it guarantees | what it does not |
| --- | --- | --- |
| `"bubblewrap"` | `bwrap` with new pid, net, ipc, uts (and user, when not root) namespaces; a new root holding only read-only `/usr`, `/lib*`, `/bin`, a few `/etc` files and the interpreter's prefix; `/tmp` (the working directory) and `/dev/shm` are small size-capped tmpfs, the only writable places; a private network namespace holding only its own loopback (no host service, loopback included, and nothing outside is reachable); the host's processes are invisible and cannot be signalled; every process of the program dies with it (pid-namespace teardown), setsid'd or not; `--die-with-parent`, `--new-session`, `--clearenv`. | a kernel exploit; CPU/memory contention with the host beyond the rlimits; tmpfs pages (at most `TMPFS_MB` + `SHM_MB`) are not counted in `RLIMIT_AS`. |
| `"rlimits+namespaces"` | the launcher unshares mount, net, pid, ipc and uts namespaces itself (plus a user namespace when not root): the whole host filesystem is re-mounted read-only, the working directory and `/dev/shm` are size-capped tmpfs; a private network namespace with no interface up; the program is pid 2 of its own pid namespace, so it cannot signal host processes and everything it spawns dies with it. | the host filesystem stays *readable* (only file permissions protect secrets: as root the program runs as an unprivileged uid, so root-only files stay unreadable); needs `mount_setattr` (Linux >= 5.12). |
| `"rlimits"` | rlimits, process group, clean environment, scratch directory; as root, a private unprivileged uid (so files are protected by permissions and every leftover process of that uid is killed after the run, setsid'd or not). | **no network isolation**; the program can write wherever its uid may (world-writable `/tmp`, `/dev/shm`, `/var/tmp`) and read whatever is world-readable; when not root it runs as the caller's uid and can signal the caller's processes and leave setsid'd processes behind. Use it only for code you would almost trust. |

All levels set, for the program: RLIMIT_CPU (timeout + 1 s), RLIMIT_AS (`memory_mb`), RLIMIT_FSIZE
(`MAX_FILE_BYTES`, which also bounds its stdout/stderr), RLIMIT_NPROC (`MAX_PROCESSES`), RLIMIT_CORE 0,
RLIMIT_NOFILE (`MAX_OPEN_FILES`), and PR_SET_NO_NEW_PRIVS (setuid binaries do not elevate).

RLIMIT_NPROC does not bind a process whose real uid is 0, so when the caller is root every run gets
its own unprivileged uid (`_UID_BASE` + pid-derived offset + slot; no passwd entry needed): NPROC
then counts only that run's processes, and two parallel runs never share a budget. Under bubblewrap
this is why root runs `bwrap` *without* a user namespace (a user namespace would map the sandbox
uid back to host root, which NPROC exempts) and lets the in-sandbox launcher drop to that uid with
the two capabilities bwrap lends it (CAP_SETUID, CAP_SETGID), which the drop then clears. When the
caller is not root, NPROC is set to the caller's current thread count plus `MAX_PROCESSES`.

Departures from the brief that commissioned this module, and why: the limits are set by a small
launcher (`_launcher`, run as `python -I -S -c ...`) instead of a `preexec_fn`, because `run_many`
calls `Popen` from threads and `preexec_fn` is not safe with threads (it can deadlock the child);
the launcher also performs the namespace set-up that a `preexec_fn` could not. The program's
interpreter is this one (`sys.executable` resolved, its prefix bound read-only) under bubblewrap;
in the fallback levels, as root, it is the first interpreter the unprivileged uid can execute (this
one if its path is world-traversable, else the system `python3`).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pluribus.errors import PluribusError

ISOLATION_LEVELS = ("bubblewrap", "rlimits+namespaces", "rlimits")
OUTPUT_LIMIT_BYTES = 64 * 1024
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_PROCESSES = 64
MAX_OPEN_FILES = 64
TMPFS_MB = 64
SHM_MB = 16

_FORCE_ENV = "PLURIBUS_SANDBOX"
_FORCE_NAMES = {
    "bwrap": "bubblewrap",
    "bubblewrap": "bubblewrap",
    "namespaces": "rlimits+namespaces",
    "rlimits+namespaces": "rlimits+namespaces",
    "rlimits": "rlimits",
}
_UID_BASE = 0x40000000  # far above any real or subordinate uid range in common use
_UID_SLOTS = 64
_PROBE_TIMEOUT_S = 20.0  # generous: the probe may run while the machine is busy


class SandboxUnavailable(PluribusError):
    """The isolation level forced with PLURIBUS_SANDBOX does not work on this machine."""


@dataclass(frozen=True)
class SandboxResult:
    """What one sandboxed program did."""

    ok: bool
    """Exited with status 0 before the timeout."""
    exit_code: int
    """The exit status: 128 + N when the program died of signal N (137: SIGKILL, as at the
    timeout), 125 when the sandbox could not start it (its stderr then says why)."""
    stdout: str
    """Its standard output, decoded (invalid UTF-8 replaced), at most `OUTPUT_LIMIT_BYTES`."""
    stderr: str
    """Its standard error, likewise bounded."""
    timed_out: bool
    """The wall-clock timeout fired and the process group was killed."""
    isolation: str
    """The level it ran under: one of `ISOLATION_LEVELS`."""
    wall_s: float
    """Seconds from launch to reaping, including the sandbox's own start-up."""


# --------------------------------------------------------------------------------------------
# The launcher: runs in a fresh interpreter (`python -I -S -c <source of this function>`), so it
# must not touch module globals; everything it needs comes in `cfg`.
# --------------------------------------------------------------------------------------------


def _launcher(cfg):
    """Set up isolation, drop privileges, set limits and exec the program; return an exit code.

    cfg: program (path of the source to run), workdir, interpreter, env, uid/gid (None: keep),
    namespaces (bool: unshare mount/net/pid/ipc/uts itself), tmpfs (list of [path, MiB, mode]),
    rlimits (list of [name, soft, hard]).
    """
    import ctypes
    import os
    import resource
    import sys

    tag = "pluribus-sandbox-launcher:"
    libc = ctypes.CDLL(None, use_errno=True)

    def check(ret, what):
        if ret != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def die(exc):
        sys.stderr.write(f"{tag} {exc}\n")
        sys.stderr.flush()
        os._exit(125)

    def run_program(source):
        # The point of no return: from here on the process becomes the untrusted program.
        try:
            libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid binaries do not elevate
            if cfg["uid"] is not None:
                os.setgroups([])
                os.setgid(cfg["gid"])
                os.setuid(cfg["uid"])  # clears every capability (no SECBIT_KEEP_CAPS)
            os.chdir(cfg["workdir"])
            with open("main.py", "wb") as f:
                f.write(source)
            for name, soft, hard in cfg["rlimits"]:
                resource.setrlimit(getattr(resource, name), (soft, hard))
            interpreter = cfg["interpreter"]
            os.execve(interpreter, [interpreter, "-I", "-S", "main.py"], cfg["env"])
        except BaseException as exc:  # noqa: BLE001 - anything here is a launcher failure
            die(exc)

    try:
        with open(cfg["program"], "rb") as f:
            source = f.read()
        if not cfg["namespaces"]:
            run_program(source)
        ms_nosuid, ms_nodev, ms_noexec, ms_rec, ms_private = 2, 4, 8, 16384, 1 << 18
        flags = 0x00020000 | 0x40000000 | 0x20000000 | 0x08000000 | 0x04000000  # mnt net pid ipc uts
        uid, gid = os.getuid(), os.getgid()
        if uid != 0:
            flags |= 0x10000000  # CLONE_NEWUSER, mapping our uid to itself (so NPROC still counts)
        check(libc.unshare(flags), "unshare")
        if uid != 0:
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        check(libc.mount(b"none", b"/", None, ms_rec | ms_private, None), "make / private")
        owner = cfg["uid"] if cfg["uid"] is not None else uid
        group = cfg["gid"] if cfg["gid"] is not None else gid
        writable = []
        for path, size_mb, mode in cfg["tmpfs"]:
            if not os.path.isdir(path):
                continue
            opts = f"size={size_mb}m,mode={mode:o},uid={owner},gid={group}".encode()
            check(libc.mount(b"tmpfs", path.encode(), b"tmpfs", ms_nosuid | ms_nodev, opts), f"tmpfs on {path}")
            writable.append(path)

        class MountAttr(ctypes.Structure):
            _fields_ = [(n, ctypes.c_uint64) for n in ("attr_set", "attr_clr", "propagation", "userns_fd")]

        def setattr_(path, recursive, attr_set, attr_clr):
            attr = MountAttr(attr_set, attr_clr, 0, 0)
            at_fdcwd, at_recursive, sys_mount_setattr = -100, 0x8000, 442
            long = ctypes.c_long
            ret = libc.syscall(long(sys_mount_setattr), long(at_fdcwd), ctypes.c_char_p(path),
                               long(at_recursive if recursive else 0), ctypes.byref(attr), long(ctypes.sizeof(attr)))
            check(ret, f"mount_setattr {path!r}")

        mount_attr_rdonly, mount_attr_nosuid = 1, 2
        setattr_(b"/", True, mount_attr_rdonly | mount_attr_nosuid, 0)
        for path in writable:
            setattr_(path.encode(), False, 0, mount_attr_rdonly)
        init = os.fork()
        if init == 0:  # pid 1 of the new pid namespace: when it exits, the kernel kills the rest
            try:
                libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG = SIGKILL
                # A fresh /proc shows only the namespace's processes; best effort (refused in some
                # containers for a user namespace), the pid namespace protects the host either way.
                libc.mount(b"proc", b"/proc", b"proc", ms_nosuid | ms_nodev | ms_noexec, None)
                child = os.fork()
                if child == 0:
                    run_program(source)
                _, status = os.waitpid(child, 0)
            except BaseException as exc:  # noqa: BLE001
                die(exc)
            code = os.waitstatus_to_exitcode(status)
            os._exit(128 - code if code < 0 else code)
        _, status = os.waitpid(init, 0)
        code = os.waitstatus_to_exitcode(status)
        return 128 - code if code < 0 else code
    except BaseException as exc:  # noqa: BLE001
        die(exc)


_launcher_source_lock = threading.Lock()
_launcher_source_cache: list[str] = []


def _launcher_source() -> str:
    with _launcher_source_lock:
        if not _launcher_source_cache:
            body = textwrap.dedent(inspect.getsource(_launcher))
            _launcher_source_cache.append(body + "\nimport json, sys\nsys.exit(_launcher(json.loads(sys.argv[1])))\n")
        return _launcher_source_cache[0]


# --------------------------------------------------------------------------------------------
# Choosing the level and the interpreter.
# --------------------------------------------------------------------------------------------


def _is_root() -> bool:
    return os.geteuid() == 0


def _own_interpreter() -> str:
    return os.path.realpath(sys.executable)


def _world_usable(path: str) -> bool:
    """Whether a uid with no special rights can reach and execute `path` (mode bits only)."""
    try:
        parts = os.path.realpath(path).split(os.sep)
        for i in range(2, len(parts)):
            if not os.stat(os.sep.join(parts[:i]) or os.sep).st_mode & stat.S_IXOTH:
                return False
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return bool(mode & stat.S_IXOTH and mode & stat.S_IROTH)


def _fallback_interpreter() -> str | None:
    """The interpreter an unprivileged uid can run: ours if reachable, else a system python3."""
    own = _own_interpreter()
    stdlib = os.path.join(os.path.realpath(sys.base_prefix), "lib")
    if _world_usable(own) and _world_usable(stdlib):
        return own
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3", path="/usr/bin:/bin")):
        if candidate and _world_usable(candidate):
            return os.path.realpath(candidate)
    return None


_slot_lock = threading.Lock()
_free_slots = list(range(_UID_SLOTS))
_slot_available = threading.Semaphore(_UID_SLOTS)


def _acquire_uid() -> tuple[int, int]:
    """A uid private to one run of this process (and the slot to give back)."""
    _slot_available.acquire()
    with _slot_lock:
        slot = _free_slots.pop()
    return _UID_BASE + ((os.getpid() % (1 << 22)) << 6) + slot, slot


def _release_uid(slot: int) -> None:
    with _slot_lock:
        _free_slots.append(slot)
    _slot_available.release()


def _statuses_of_uid(uid: int):
    """(pid, /proc/PID/status fields) of every process whose real uid is `uid`."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if fields.get("Uid", "").split()[:1] == [str(uid)]:
            yield int(entry), fields


def _caller_threads() -> int:
    """Threads (what RLIMIT_NPROC counts) that our uid runs now."""
    return sum(int(fields.get("Threads", "1")) for _, fields in _statuses_of_uid(os.getuid()))


def _processes_of_uid(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is `uid`."""
    return [pid for pid, fields in _statuses_of_uid(uid) if not fields.get("State", "").strip().startswith("Z")]


_probe_lock = threading.Lock()
_probe_results: dict[str, str | None] = {}


def _probe(level: str) -> str | None:
    """None when `level` works here, else why not. Runs one tiny program; cached per process."""
    with _probe_lock:
        if level not in _probe_results:
            _probe_results[level] = _probe_uncached(level)
        return _probe_results[level]


def _probe_uncached(level: str) -> str | None:
    if level == "bubblewrap" and shutil.which("bwrap") is None:
        return "bwrap is not on PATH (apt-get install bubblewrap)"
    if level == "rlimits+namespaces" and not sys.platform.startswith("linux"):
        return "namespaces need Linux"
    try:
        result = _run(level, "print('sandbox-ok')", timeout_s=_PROBE_TIMEOUT_S, memory_mb=512, stdin="")
    except OSError as exc:
        return f"could not start: {exc}"
    if result.ok and result.stdout.strip() == "sandbox-ok":
        return None
    detail = (result.stderr.strip().splitlines() or [f"exit code {result.exit_code}"])[-1]
    return f"probe program failed: {detail}"


def available_isolation() -> list[str]:
    """The isolation levels that work on this machine, best first (probes each once)."""
    return [level for level in ISOLATION_LEVELS if _probe(level) is None]


def unavailable_reason(level: str) -> str | None:
    """Why `level` does not work here, or None when it does."""
    if level not in ISOLATION_LEVELS:
        raise ValueError(f"unknown isolation level {level!r}; expected one of {ISOLATION_LEVELS}")
    return _probe(level)


def isolation_level() -> str:
    """The level `run_python` uses now: forced by PLURIBUS_SANDBOX, else the best that works."""
    forced = os.environ.get(_FORCE_ENV, "").strip().lower()
    if forced and forced != "auto":
        if forced not in _FORCE_NAMES:
            raise SandboxUnavailable(f"{_FORCE_ENV}={forced!r}: expected bwrap, namespaces, rlimits or auto")
        level = _FORCE_NAMES[forced]
        reason = _probe(level)
        if reason is not None:
            raise SandboxUnavailable(f"{_FORCE_ENV}={forced}: the {level} sandbox does not work here: {reason}")
        return level
    for level in ISOLATION_LEVELS:
        if _probe(level) is None:
            return level
    raise SandboxUnavailable(f"no sandbox works here: {_probe('rlimits')}")


# --------------------------------------------------------------------------------------------
# Running.
# --------------------------------------------------------------------------------------------


def _rlimits(timeout_s: float, memory_mb: int, nproc: int) -> list[list]:
    cpu = math.ceil(timeout_s) + 1
    return [
        ["RLIMIT_CPU", cpu, cpu + 1],
        ["RLIMIT_AS", memory_mb * 1024 * 1024, memory_mb * 1024 * 1024],
        ["RLIMIT_FSIZE", MAX_FILE_BYTES, MAX_FILE_BYTES],
        ["RLIMIT_NPROC", nproc, nproc],
        ["RLIMIT_CORE", 0, 0],
        ["RLIMIT_NOFILE", MAX_OPEN_FILES, MAX_OPEN_FILES],
    ]


def _program_env(workdir: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
    }


def _bwrap_command(launcher_cfg: dict, host_program: str, info_fd: int) -> list[str]:
    """`bwrap ... -- python -I -S -c LAUNCHER CFG` with a new root holding only what Python needs."""
    root = _is_root()
    cmd = ["bwrap", "--die-with-parent", "--new-session", "--clearenv", "--info-fd", str(info_fd)]
    if root:
        # No user namespace: it would map the sandbox uid to host root, which RLIMIT_NPROC exempts.
        cmd += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        cmd += ["--unshare-all"]
    cmd += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
    for etc in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime"):
        cmd += ["--ro-bind-try", etc, etc]
    prefixes = {os.path.realpath(sys.base_prefix), os.path.dirname(os.path.dirname(_own_interpreter()))}
    made: set[str] = set()
    for prefix in sorted(prefixes):
        if prefix in ("/", "/usr") or prefix.startswith("/usr/") or any(prefix.startswith(p + "/") for p in prefixes):
            continue
        parts = prefix.split("/")
        for i in range(2, len(parts)):
            ancestor = "/".join(parts[:i])
            if ancestor not in made:  # 0755: the unprivileged uid must traverse it (/root is 0700)
                cmd += ["--perms", "0755", "--dir", ancestor]
                made.add(ancestor)
        cmd += ["--ro-bind", prefix, prefix]
    cmd += ["--perms", "0755", "--dir", "/sandbox", "--ro-bind", host_program, "/sandbox/main.py"]
    cmd += ["--proc", "/proc", "--dev", "/dev"]
    cmd += ["--perms", "1777", "--size", str(TMPFS_MB << 20), "--tmpfs", "/tmp"]
    cmd += ["--perms", "1777", "--size", str(SHM_MB << 20), "--tmpfs", "/dev/shm"]
    cmd += ["--chdir", "/tmp", "--", _own_interpreter(), "-I", "-S", "-c", _launcher_source(), json.dumps(launcher_cfg)]
    return cmd


def _read_bounded(f) -> str:
    f.seek(0)
    return f.read(OUTPUT_LIMIT_BYTES).decode("utf-8", errors="replace")


def _kill_bwrap_init(info_read: int, proc: subprocess.Popen) -> None:
    """SIGKILL the sandbox's pid 1 (named by bwrap's --info-fd), then let bwrap reap it and exit.

    Killing bwrap first would work too (--die-with-parent), but then the namespace is torn down
    asynchronously, after we have reaped bwrap, and its init is left to the host's init to reap.
    """
    os.set_blocking(info_read, False)
    try:
        info = json.loads(os.read(info_read, 65536) or b"{}")
    except (OSError, ValueError):
        return
    child_pid = info.get("child-pid")
    if not isinstance(child_pid, int):
        return
    try:
        pidfd = os.pidfd_open(child_pid)
    except OSError:
        return
    try:  # the pidfd pins the process; check it is still bwrap's child, not a reused pid
        with open(f"/proc/{child_pid}/stat", "rb") as f:
            parent = int(f.read().rsplit(b")", 1)[1].split()[1])
        if parent == proc.pid:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except (OSError, IndexError, ValueError):
        pass
    finally:
        os.close(pidfd)
    try:
        proc.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        pass


def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != b"Z" and int(fields[3]) == sid:
            found.append(int(entry))
    return found


def _wait_session_gone(sid: int, limit_s: float = 10.0) -> None:
    """Return once nothing of session `sid` is alive (SIGKILL is delivered asynchronously).

    Under both namespace levels the session holds the pid namespace's init, and the kernel kills
    and reaps the whole namespace before that init exits, so an empty session means an empty
    sandbox, whatever the program did with setsid.
    """
    deadline = time.monotonic() + limit_s
    delay = 0.0005
    while time.monotonic() < deadline:
        members = _session_members(sid)
        if not members:
            return
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _kill_uid(uid: int, gid: int, interpreter: str, limit_s: float = 10.0) -> None:
    """SIGKILL every process of the run's private uid (those that left the process group)."""
    deadline = time.monotonic() + limit_s
    polls = 0
    while time.monotonic() < deadline and _processes_of_uid(uid):
        if polls % 8 == 0:
            # kill(-1) from a process of that uid reaches exactly that uid's processes (not itself).
            subprocess.run(
                [interpreter, "-I", "-S", "-c", "import os, signal\ntry: os.kill(-1, signal.SIGKILL)\nexcept OSError: pass"],
                user=uid, group=gid, extra_groups=[], env={}, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True, cwd="/", timeout=10,
            )
        else:
            time.sleep(0.005)
        polls += 1


def _run(level: str, source: str, *, timeout_s: float, memory_mb: int, stdin: str) -> SandboxResult:
    root = _is_root()
    interpreter = _own_interpreter() if level == "bubblewrap" or not root else _fallback_interpreter()
    drop_uid = root and interpreter is not None
    if interpreter is None:  # root, and no interpreter the unprivileged uid can execute
        interpreter = _own_interpreter()
    uid = gid = slot = None
    if drop_uid:
        uid, slot = _acquire_uid()
        gid = uid
    nproc = MAX_PROCESSES if root else _caller_threads() + MAX_PROCESSES
    host_dir = tempfile.mkdtemp(prefix="pluribus-sandbox-")
    info_read = info_write = None
    try:
        os.chmod(host_dir, 0o711)  # traversable by the program's uid, not listable
        host_program = os.path.join(host_dir, "program.py")
        with open(host_program, "w", encoding="utf-8") as f:
            f.write(source)
        os.chmod(host_program, 0o644)
        workdir = os.path.join(host_dir, "work")
        os.mkdir(workdir, 0o700)
        if uid is not None:
            os.chown(workdir, uid, gid)
        cfg = {
            "uid": uid,
            "gid": gid,
            "rlimits": _rlimits(timeout_s, memory_mb, nproc),
            "tmpfs": [],
        }
        if level == "bubblewrap":
            cfg.update(program="/sandbox/main.py", workdir="/tmp", interpreter=interpreter,
                       env=_program_env("/tmp"), namespaces=False)
            info_read, info_write = os.pipe()
            cmd = _bwrap_command(cfg, host_program, info_write)
        else:
            namespaces = level == "rlimits+namespaces"
            cfg.update(program=host_program, workdir=workdir, interpreter=interpreter, env=_program_env(workdir),
                       namespaces=namespaces)
            if namespaces:
                cfg["tmpfs"] = [[workdir, TMPFS_MB, 0o700], ["/dev/shm", SHM_MB, 0o1777]]
            cmd = [_own_interpreter(), "-I", "-S", "-c", _launcher_source(), json.dumps(cfg)]
        with (
            tempfile.TemporaryFile(dir=host_dir) as stdin_file,
            tempfile.TemporaryFile(dir=host_dir) as stdout_file,
            tempfile.TemporaryFile(dir=host_dir) as stderr_file,
        ):
            stdin_file.write(stdin.encode("utf-8"))
            stdin_file.seek(0)
            start = time.monotonic()
            # Files, not pipes: a process that escaped the group cannot keep us waiting on a pipe.
            proc = subprocess.Popen(
                cmd, stdin=stdin_file, stdout=stdout_file, stderr=stderr_file, start_new_session=True,
                close_fds=True, env={"PATH": "/usr/local/bin:/usr/bin:/bin"}, cwd=host_dir,
                pass_fds=() if info_write is None else (info_write,),
            )
            if info_write is not None:
                os.close(info_write)
                info_write = None
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                if info_read is not None:
                    _kill_bwrap_init(info_read, proc)
            finally:
                try:  # always: whatever is left in the group dies with the run
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
                _wait_session_gone(proc.pid)
                if uid is not None and level == "rlimits":
                    _kill_uid(uid, gid, interpreter)
            wall_s = time.monotonic() - start
            stdout, stderr = _read_bounded(stdout_file), _read_bounded(stderr_file)
    finally:
        for fd in (info_read, info_write):
            if fd is not None:
                os.close(fd)
        shutil.rmtree(host_dir, ignore_errors=True)
        if slot is not None:
            _release_uid(slot)
    exit_code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
    return SandboxResult(
        ok=exit_code == 0 and not timed_out,
        exit_code=exit_code,
        stdout=stdout,
        stderr=stderr,
        timed_out=timed_out,
        isolation=level,
        wall_s=wall_s,
    )


def run_python(source: str, *, timeout_s: float = 5.0, memory_mb: int = 512, stdin: str = "") -> SandboxResult:
    """Run `source` as `python -I -S main.py` in the best available sandbox; never raises for
    anything the program does (only `SandboxUnavailable` when a forced level does not work).

    timeout_s: wall-clock limit, start-up included; the whole process group is SIGKILLed at it.
    memory_mb: RLIMIT_AS of the program (the interpreter itself takes ~20 MiB of it).
    stdin: text fed to the program's standard input.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb must be at least 64 (the interpreter needs ~20 MiB), got {memory_mb}")
    return _run(isolation_level(), source, timeout_s=timeout_s, memory_mb=memory_mb, stdin=stdin)


def run_many(sources: Iterable[str], *, max_workers: int | None = None, **kw) -> list[SandboxResult]:
    """`run_python` on many programs in parallel (threads, each driving one subprocess).

    Results come back in the order of `sources`. `kw` goes to every `run_python` call.
    max_workers: default the CPU count; each worker runs one program at a time.
    """
    sources = list(sources)
    if not sources:
        return []
    isolation_level()  # probe once, before the threads race for it
    workers = max_workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=min(workers, len(sources)), thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda source: run_python(source, **kw), sources))
