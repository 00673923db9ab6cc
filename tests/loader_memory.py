"""Peak memory of streaming an ImageNet-style folder (run in its own process by test_imagenet.py).

Prints one JSON line: images read, this process's peak RSS (VmHWM, reset after the imports through
``/proc/self/clear_refs``) less its RSS then, the tracemalloc peak (numpy's buffers included) and a
checksum of what was decoded. The decoding workers hold one batch each and are not counted.
"""

from __future__ import annotations

import json
import sys
import tracemalloc

import numpy as np

from littlebig.imagenet import index_folder, iter_batches


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main(root: str, size: int, batch_size: int, workers: int) -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter
    base_rss = _status_kib("VmRSS")
    tracemalloc.start()
    index = index_folder(root)
    total, checksum = 0, 0
    for images, labels in iter_batches(index, (size, size, 3), batch_size=batch_size, workers=workers):
        total += len(images)
        checksum += int(images.sum(dtype=np.int64)) + int(labels.sum())
    _, peak = tracemalloc.get_traced_memory()
    peak_rss = _status_kib("VmHWM")
    print(json.dumps({
        "images": total, "rss_growth_kib": peak_rss - base_rss, "tracemalloc_peak": peak, "checksum": checksum,
    }))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
