"""Two changes to Horovod 0.28.1, applied by deploy/install.sh after Horovod is installed (and so to the
environment deploy/pack.sh packs); running it again changes nothing.

1. Its servers bind to one network interface instead of all of them. Every Horovod service (the Spark
   driver and task services, the Gloo rendezvous and its key-value store) gets its socket from `find_port`
   in horovod/runner/util/network.py, which binds ('', port), all interfaces, whatever `nics` says. With
   DMF_BIND_INTERFACE set (pipeline/spark.py sets it, `lo` in Spark local mode), it binds that interface's
   IPv4 address instead. Unset, Horovod is unchanged.
2. Rank output reaches the driver as it is printed. horovod.spark.run(stdout=...) streams each rank's output
   through horovod/runner/common/util/network.py, which copies it with shutil.copyfileobj into a buffered
   socket on the executor and reads it back in 64 KiB blocks on the driver: a training run's epoch lines
   arrived when it ended. The patched copy flushes every chunk and reads line by line.

    python deploy/patch_horovod.py   (with the venv's python)
"""
import importlib
import pathlib
import sys

BIND_HELPER = '''

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
SEND = """        shutil.copyfileobj(stream, w)
        wfile.flush()
"""
SEND_FLUSHED = """        # dmf-pipeline's deploy/patch_horovod.py: each chunk flushed, so that the driver sees it now
        for chunk in iter(lambda: stream.read(1 << 16), None):
            if not chunk:
                break
            w.write(chunk)
            wfile.flush()
        wfile.flush()
"""
RECEIVE = """                        shutil.copyfileobj(r, stream)
"""
RECEIVE_LINES = """                        # dmf-pipeline's deploy/patch_horovod.py: line by line, not in 64 KiB blocks
                        # (a while loop: `iter` is this method's retry counter)
                        line = rfile.readline()
                        while line:
                            stream.write(line.decode('utf-8', 'replace'))
                            getattr(stream, 'flush', lambda: None)()
                            line = rfile.readline()
"""
# module, [(original, patched)], text appended once, what the patch does
BIND = ("            addr = ('', port)\n", "            addr = (_bind_address(), port)\n")
PATCHES = [
    ("horovod.runner.util.network", [BIND], BIND_HELPER,
     "find_port binds to DMF_BIND_INTERFACE's address when it is set"),
    ("horovod.runner.common.util.network", [(SEND, SEND_FLUSHED), (RECEIVE, RECEIVE_LINES)], "",
     "streamed command output is flushed and read line by line"),
]


def patch(module: str, replacements: list, appended: str, what: str) -> None:
    path = pathlib.Path(importlib.import_module(module).__file__)
    text = path.read_text()
    if all(new in text for _, new in replacements):
        print(f"{path}: already patched ({what})")
        return
    for old, new in replacements:
        if new in text:
            continue
        if text.count(old) != 1:
            sys.exit(f"{path} does not look like Horovod 0.28.1's ({old.strip()!r}); not patched")
        text = text.replace(old, new)
    path.write_text(text + ("" if appended in text else appended))
    print(f"{path}: {what}")


for args in PATCHES:
    patch(*args)
