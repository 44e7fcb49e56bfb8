"""Rewrite .whl/bitsandbytes-*.whl without the CUDA/ROCm libraries the GPU image cannot load (it has CUDA 13.0), so
the wheels the device call carries fit its 64 MiB limit next to torchao and gemlite. Run after
shared/tools/device-wheels.sh: ``python .ci/slim_bnb_wheel.py``. Keeps libbitsandbytes_cuda13*.so and the CPU one."""

import re
import sys
import zipfile
from pathlib import Path

KEEP = re.compile(r"libbitsandbytes_(cuda13\d|cpu)\.so$")

for wheel in Path(".whl").glob("bitsandbytes-*.whl"):
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        dropped = {i.filename for i in src.infolist() if i.filename.endswith(".so") and not KEEP.search(i.filename)}
        for info in src.infolist():
            if info.filename in dropped:
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if line.split(b",")[0].decode() not in dropped)
            dst.writestr(info, data)
    slim.replace(wheel)
    print(f"{wheel}: dropped {len(dropped)} libraries, now {wheel.stat().st_size / 2**20:.1f} MiB", file=sys.stderr)
