"""Step timing for a peer training script (scripts/gpu_train_bench.sh): on PYTHONPATH as
sitecustomize, it wraps tqdm's `update` and records the time of every update of the "Steps" bar that
diffusers' example scripts advance once per optimizer step (after the step's work, before the next
data fetch), and at exit writes the times plus torch's peak CUDA memory (reserved and allocated) to
$PEER_TIMING as JSON. Nothing of the script itself changes."""

import atexit
import json
import os
import time

_path = os.environ.get("PEER_TIMING")
_times = []


def _install():
    import tqdm.std

    orig = tqdm.std.tqdm.update

    def update(self, n=1):
        out = orig(self, n)
        if getattr(self, "desc", "").startswith("Steps"):
            _times.append(time.perf_counter())
        return out

    tqdm.std.tqdm.update = update


def _write():
    info = {"step_times": _times}
    try:
        import sys

        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            info["max_memory_reserved"] = torch.cuda.max_memory_reserved()
            info["max_memory_allocated"] = torch.cuda.max_memory_allocated()
    except Exception as e:  # the timing must never fail the run
        info["memory_error"] = repr(e)
    with open(_path, "w") as f:
        json.dump(info, f)


if _path:
    _install()
    atexit.register(_write)
