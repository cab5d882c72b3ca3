"""Whether the built extension loads the process's shared libstdc++.

An extension whose compiler linked a static copy of libstdc++ beside the one torch loads
crashes where an error message formats a number: ostream's number formatting meets the other
copy's locale (seen with a lent GPU image's ``CXX=/opt/gcc/bin/g++``, 2026-11-28: a
``TORCH_CHECK`` naming "exp_avg_sqs[0]" took the process down; built by ``/usr/bin/g++`` the
same sources raise their errors; on the 2-core CPU VM an extension linked with
``-static-libstdc++`` did not crash but cut its message at the number: "lbw: exp_avg_sqs[").
``setup.py`` asks after building (it loads this file by path:
nothing here imports the package or torch), and ``lbw-kernels info`` asks of the extension it
loaded, since pip shows a successful build's output only with ``-v``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from typing import Optional


def static_libstdcxx_warning(library: str, cxx: Optional[str] = None) -> Optional[str]:
    """A warning naming ``library`` (a Linux shared object) and its compiler ``cxx`` (where
    known) when it loads no shared libstdc++ (no such NEEDED entry); None when it does, or
    where readelf cannot tell."""
    readelf = shutil.which("readelf")
    if readelf is None or not sys.platform.startswith("linux"):
        return None
    try:
        out = subprocess.run([readelf, "-d", library], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    if "(NEEDED)" not in out or "libstdc++" in out:
        return None
    compiler = "its compiler" if cxx is None else f"its compiler, {cxx},"
    return (f"lbw-kernels: WARNING: {library} does not load the shared libstdc++ ({compiler} linked a "
            "static copy beside the one torch loads): an error the extension raises may crash the process. "
            "Rebuild with the system compiler: CXX=/usr/bin/g++ pip install --no-build-isolation -e .")
