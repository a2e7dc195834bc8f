"""What makes two pipeline runs give the same figures, in one place: called before
TensorFlow is imported, and recorded in the report.

Seeds alone were not enough. Keras is seeded (``train._seed``: Python, NumPy and TensorFlow
generators, op determinism), and on one machine two runs were byte-identical; but the same
command gave threshold 0.70 (2.2% escalated, the docs) on one machine and 0.00 (0%) on
another. The cause is TensorFlow's oneDNN kernels: TensorFlow switches them on or off by
itself, from its build and the CPU it finds (this AMD EPYC with AVX-512 VNNI/BF16: on), and
they add in another order than Eigen's. The trained weights differ in their last bits, a
sample or two of the 270-sample calibration split flips, and the threshold rule (the most
accurate threshold within the budget, ties to the one escalating least) jumps to 0.00 when
the edge alone ties the best hybrid point. Measured here with the README's command:
``TF_ENABLE_ONEDNN_OPTS=0`` gives threshold 0.70 (1.7% of the held-out split escalated,
temperature 2.4968), the default (oneDNN on) 0.00 (0%, temperature 2.4882). Intra-op
thread counts of 1, 2 and 4 gave byte-identical weights with
either kernel family (models this small are not split across threads), and the TFLite
converter's int8 calibration reads the calibration split in order.

So the kernel family is a setting (``OptimizeSettings.onednn``, off by default: the portable
Eigen path), forced on TensorFlow through ``TF_ENABLE_ONEDNN_OPTS`` before it loads, and
thread counts are pinned too. What is left between machines is the CPU's instruction set
(Eigen's AVX2 and AVX-512 paths round differently); ``bench_pipeline_seeds.py`` measures the
spread that leaves over seeds, which is the noise a retrain's gain must beat.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

from shared.errors import ContractError

ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"


def pin_numerics(onednn: bool, threads: int = 1) -> None:
    """Fixes the kernel family and thread pools of the TensorFlow this process will load.
    Must run before TensorFlow is imported; raises ``ContractError`` if it was already
    imported with another kernel choice (its numerics could no longer be promised)."""
    want = "1" if onednn else "0"
    if "tensorflow" in sys.modules:
        if os.environ.get(ONEDNN_ENV) != want:
            raise ContractError(
                f"TensorFlow was imported before the pipeline pinned {ONEDNN_ENV}={want}; "
                "run the pipeline in a fresh process"
            )
        return
    os.environ[ONEDNN_ENV] = want
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(threads)
    os.environ["TF_NUM_INTEROP_THREADS"] = str(threads)


def numerics() -> dict[str, Any]:
    """The report's ``reproducibility`` section: what a rerun must match to give the same
    figures (library versions, kernel family, threads, the CPU's vector extensions)."""
    import numpy as np

    versions: dict[str, str] = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("tensorflow", "keras", "onnxruntime"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = str(getattr(module, "__version__", "?"))
    return {
        "versions": versions,
        "onednn": os.environ.get(ONEDNN_ENV) == "1",
        "intra_op_threads": os.environ.get("TF_NUM_INTRAOP_THREADS"),
        "machine": platform.machine(),
        "cpu_flags": _vector_flags(),
    }


def _vector_flags() -> list[str]:
    """The CPU's AVX/FMA/AMX flags (Linux), which pick Eigen's and oneDNN's code paths."""
    try:
        with Path("/proc/cpuinfo").open() as f:
            for line in f:
                if line.startswith("flags"):
                    return sorted(
                        {
                            flag
                            for flag in line.split(":", 1)[1].split()
                            if flag.startswith(("avx", "fma", "amx"))
                        }
                    )
    except OSError:
        pass
    return []
