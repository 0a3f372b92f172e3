"""Makes Horovod 0.28.1's servers bind to one network interface instead of all of them.

Every Horovod service (the Spark driver and task services, the Gloo rendezvous and its key-value store)
gets its socket from `find_port` in horovod/runner/util/network.py, which binds ('', port), all
interfaces, whatever `nics` says. With DMF_BIND_INTERFACE set (pipeline/spark.py sets it, `lo` in Spark
local mode), this patch binds them to that interface's IPv4 address instead. Unset, Horovod is unchanged.
Run by deploy/install.sh after Horovod is installed; running it again changes nothing.

    python deploy/patch_horovod.py   (with the venv's python)
"""
import pathlib
import sys

import horovod.runner.util.network as network

ORIGINAL = "            addr = ('', port)\n"
PATCHED = "            addr = (_bind_address(), port)\n"
HELPER = '''

def _bind_address():
    """The IPv4 address of the interface DMF_BIND_INTERFACE names ('' binds all: Horovod's own default).
    Added by dmf-pipeline's deploy/patch_horovod.py."""
    import os

    interface = os.environ.get('DMF_BIND_INTERFACE')
    if not interface:
        return ''
    for addr in net_if_addrs().get(interface, []):
        if addr.family == AF_INET:
            return addr.address
    raise RuntimeError('DMF_BIND_INTERFACE=%s names no interface with an IPv4 address' % interface)
'''

path = pathlib.Path(network.__file__)
text = path.read_text()
if PATCHED in text:
    print(f"{path}: already binds to DMF_BIND_INTERFACE")
    sys.exit(0)
if text.count(ORIGINAL) != 1:
    sys.exit(f"{path}: find_port does not look like Horovod 0.28.1's; not patched")
path.write_text(text.replace(ORIGINAL, PATCHED) + ("" if HELPER in text else HELPER))
print(f"{path}: find_port now binds to DMF_BIND_INTERFACE's address when it is set")
