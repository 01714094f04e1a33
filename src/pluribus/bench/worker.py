"""One measurement in a process of its own: `python -m pluribus.bench.worker TASK ROOT SETTINGS_JSON [ARG]`.

Prints the measurement as one JSON line, last on stdout. A fresh process per measurement keeps each peak
memory figure its own and each side's warm caches out of the other's timings.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path


def main(argv: list[str]) -> None:
    task, root, settings_json, *arg = argv
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    import torch

    from pluribus.bench.settings import BenchSettings
    from pluribus.bench.workloads import TASKS
    from pluribus.parallel import keep_freed_memory

    data = json.loads(settings_json)
    data["teacher_counts"] = tuple(data["teacher_counts"])
    settings = BenchSettings(**data)
    torch.set_num_threads(settings.threads)
    keep_freed_memory()  # both sides alike: the comparison is of the libraries, not of glibc's settings
    result = TASKS[task](Path(root), settings, *(int(a) for a in arg))
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
