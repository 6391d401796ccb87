"""The memory this process can still be given: the machine's free memory, capped by its cgroups' limits.

Read by the memory check and the dry run (`hf_mudsc.plan`) and by the solve's weight-correlation cache
(`hf_mudsc.solve.loop`), which sizes itself by it; it sits on the bottom floor so both can ask.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

# A container's memory limit and use as seen from inside it: /proc/meminfo shows the host's. The roots are module
# constants so tests can point the reader at a fake tree.
PROC_ROOT = "/proc"
CGROUP_ROOT = "/sys/fs/cgroup"
# (hierarchy as /proc/self/cgroup names it, its folder under CGROUP_ROOT, limit file, usage file): cgroup v2 (the
# line `0::/path`), then v1's memory controller (`4:memory:/path`, possibly mounted with other controllers).
CGROUP_MEMORY_FILES = (("", "", "memory.max", "memory.current"),
                       ("memory", "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"))
NO_CGROUP_LIMIT = 2**60
"""Limits at or above this mean none (v1 shows ~2**63 for "no limit", v2 says "max")."""


def own_cgroups(proc_root: str | os.PathLike = PROC_ROOT) -> dict[str, str]:
    """This process's cgroup path per hierarchy, from /proc/self/cgroup: `""` -> the v2 path, `"memory"` -> the v1
    memory controller's; empty when the file cannot be read (not Linux)."""
    try:
        with open(os.path.join(proc_root, "self", "cgroup"), encoding="utf-8") as listing:
            lines = listing.read().splitlines()
    except OSError:
        return {}
    paths: dict[str, str] = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            paths[""] = path
        elif "memory" in controllers.split(","):
            paths["memory"] = path
    return paths


def cgroup_memory_room(proc_root: str | os.PathLike = PROC_ROOT,
                       cgroup_root: str | os.PathLike = CGROUP_ROOT) -> int | None:
    """Bytes the cgroups this process is in still allow (limit less use), the tightest of its own cgroup and every
    cgroup above it — a process in a nested cgroup (v1 `memory:/process_api/<id>`, a v2 slice) is limited there, not
    at the root; None when no limit is set or none can be read. A path /proc/self/cgroup lists that is not in this
    mount namespace (the host's path of a container's cgroup) is skipped: the root's files are the container's."""
    own = own_cgroups(proc_root)
    rooms = []
    for hierarchy, mount, limit_name, usage_name in CGROUP_MEMORY_FILES:
        parts = [part for part in PurePosixPath(own.get(hierarchy, "/")).parts[1:] if part not in ("", ".", "..")]
        top = Path(cgroup_root, mount)
        for depth in range(len(parts), -1, -1):  # the process's own cgroup first, the root last
            folder = top.joinpath(*parts[:depth])
            try:
                limit = (folder / limit_name).read_text(encoding="ascii").strip()
                usage = int((folder / usage_name).read_text(encoding="ascii"))
            except (OSError, ValueError):
                continue
            if limit.isdigit() and int(limit) < NO_CGROUP_LIMIT:
                rooms.append(max(int(limit) - usage, 0))
    return min(rooms) if rooms else None


def local_processes() -> int:
    """Processes a launcher started on this machine (`LOCAL_WORLD_SIZE`, which torchrun and `accelerate launch`
    set); 1 outside a launch or when the value is not a positive count. They share the memory `available_memory`
    reports: each one loads the parents and holds the summed statistics (`plan.check_memory` counts them)."""
    try:
        count = int(os.environ.get("LOCAL_WORLD_SIZE", "") or 1)
    except ValueError:
        return 1
    return count if count > 0 else 1


def available_memory() -> int | None:
    """Bytes of memory this process can be given now: `MemAvailable` + `SwapFree` of /proc/meminfo (Linux), else
    the machine's physical memory (`sysconf`), capped by what its cgroups allow (`cgroup_memory_room`); None when
    nothing is known (the memory check is then skipped)."""
    machine = None
    try:
        with open(os.path.join(PROC_ROOT, "meminfo"), encoding="ascii") as meminfo:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in meminfo if line.split()[1:2]}
        machine = fields["MemAvailable"] + fields.get("SwapFree", 0)
    except (OSError, KeyError, ValueError, IndexError):
        try:
            machine = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            pass
    room = cgroup_memory_room(PROC_ROOT, CGROUP_ROOT)
    if room is None:
        return machine
    return room if machine is None else min(machine, room)
