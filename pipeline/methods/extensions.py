"""The methods' fused CPU kernels (``csrc/<name>.cpp``), compiled on first use.

Each kernel computes what a torch path beside it computes (that path runs on GPU, and on CPU
where no C++ compiler is available); torch caches the build in ``$TORCH_EXTENSIONS_DIR``
(~/.cache/torch_extensions), so only the first process on a machine pays the ~1 min compile.
``python -m pipeline.engine.prebuild`` (run by ``make``) builds them all at install time.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType

log = logging.getLogger("pipeline.methods")

SOURCES = Path(__file__).with_name("csrc")
# Flags beyond -O3 -fopenmp: fast-math lets GCC vectorise logf/expf through glibc's libmvec.
EXTRA_FLAGS = {"batch_shaping": (["-ffast-math"], ["-lmvec"])}


@functools.cache
def cpu_extension(name: str) -> ModuleType | None:
    """The compiled ``csrc/<name>.cpp``, or None where it cannot be built (warned once)."""
    # importing cpp_extension on a machine without CUDA warns about CUDA_HOME: irrelevant here
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    cflags, ldflags = EXTRA_FLAGS.get(name, ([], []))
    try:
        return cpp_extension.load(f"pipeline_{name}", [str(SOURCES / f"{name}.cpp")],
                                  extra_cflags=["-O3", "-fopenmp", *cflags],
                                  extra_ldflags=["-fopenmp", *ldflags])
    except Exception as error:  # a missing compiler or headers: the torch path still works
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        log.warning("fused CPU kernels %s unavailable (%s); using the torch path", name,
                    first_line)
        return None


def build_all() -> None:
    for source in sorted(SOURCES.glob("*.cpp")):
        cpu_extension(source.stem)
