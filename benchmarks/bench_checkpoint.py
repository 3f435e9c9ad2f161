"""What checkpoint checksums cost: saving and loading one rank's tensors with and without them.

Side by side in one run, in A B B A order per round (load from other jobs hits both alike):

* save: ``save_checkpoint`` (writes, fsyncs, then hashes every file for ``meta.json``) against the bare write it
  wraps (``safetensors.torch.save_file`` + fsync of the same tensors);
* load: ``load_checkpoint`` with ``verify=True`` (sha256 of the rank's files first) against ``verify=False``, each
  followed by a copy of every tensor (as a resume copies them into the model; safetensors maps files lazily).

    python benchmarks/bench_checkpoint.py [--megabytes 256] [--rounds 3] [--dir DIR (default: a temporary folder)]

Prints the median time of each and the ratio (target: a few percent on a real disk; the hash reads the file back
from the page cache).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from eellm_hf.trainer.checkpoint import load_checkpoint, save_checkpoint


def _tensors(megabytes: int) -> dict[str, torch.Tensor]:
    count = 16
    per = megabytes * 2**20 // 4 // count
    generator = torch.Generator().manual_seed(0)
    return {f"model/layer_{i}.weight": torch.randn(per, generator=generator) for i in range(count)}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (a real disk, say)")
    args = parser.parse_args()
    tensors = _tensors(args.megabytes)
    times: dict[str, list[float]] = {"save_checkpoint": [], "bare write": [], "load verified": [],
                                     "load unverified": []}
    with tempfile.TemporaryDirectory(prefix="bench_ckpt_", dir=args.dir) as tmp:
        root = Path(tmp)

        def checkpointed(step: list[int] = [0]) -> None:  # noqa: B006 - a counter across calls
            step[0] += 1
            save_checkpoint(root / "ckpt", step[0], 0, 1, tensors, {"step": step[0]}, None, keep_last=1)

        def bare() -> None:
            path = root / "bare.safetensors"
            save_file(tensors, str(path), metadata={"format": "pt"})
            with open(path, "rb") as f:
                os.fsync(f.fileno())

        checkpointed()
        latest = sorted((root / "ckpt").glob("step_*"))[-1]
        def load(verify: bool) -> None:
            loaded, _ = load_checkpoint(latest, 0, verify=verify)
            for tensor in loaded.values():
                tensor.clone()

        pairs = [("save_checkpoint", checkpointed, "bare write", bare),
                 ("load verified", lambda: load(True), "load unverified", lambda: load(False))]
        for _ in range(args.rounds):
            for name_a, a, name_b, b in pairs:
                if name_a == "load verified":
                    latest = sorted((root / "ckpt").glob("step_*"))[-1]
                for name, fn in ((name_a, a), (name_b, b), (name_b, b), (name_a, a)):
                    times[name].append(_timed(fn))
        shutil.rmtree(root / "ckpt", ignore_errors=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"{args.megabytes} MB of tensors, {args.rounds} rounds of A B B A, median seconds")
    for a, b in (("save_checkpoint", "bare write"), ("load verified", "load unverified")):
        print(f"  {a:16s} {median[a]:7.3f}   {b:16s} {median[b]:7.3f}   ratio {median[a] / median[b]:.3f}")


if __name__ == "__main__":
    main()
