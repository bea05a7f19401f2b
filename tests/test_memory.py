"""Up-front memory checks honour the limits a user can set: here the process's address-space limit (``ulimit -v``),
set for real in a subprocess."""

import os
import subprocess
import sys
import textwrap

import pytest

resource = pytest.importorskip("resource")

SCRIPT = textwrap.dedent("""
    import resource, sys
    from jasmk.core import memory
    vm = memory.status_bytes("VmSize")
    resource.setrlimit(resource.RLIMIT_AS, (vm + 2 * 2**30, resource.RLIM_INFINITY))
    avail, source = memory.host_budget()
    print(avail <= 2 * 2**30, "RLIMIT_AS" in source)
    memory.require(2**30, "one GiB", hint="a test")  # within the limit: fine
    try:
        memory.require(3 * 2**30, "three GiB", hint="a test")
    except ValueError as exc:
        print("refused", "ulimit -v" in str(exc))
""")


def test_the_address_space_limit_is_part_of_the_budget(tmp_path):
    if not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc: the limits cannot be read here")
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["True", "True", "refused", "True"], run.stdout
