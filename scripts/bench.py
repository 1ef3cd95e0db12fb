#!/usr/bin/env python
"""Encoder speed and memory: forward and forward+backward, with/without gradient checkpointing and AMP.

    python scripts/bench.py --model_type vit_b_ori --batch_size 2 --device cuda --json outputs/bench.json

Prints a table and writes JSON. Peak memory is CUDA's max_memory_allocated on GPU; on CPU it is the
peak growth of the process's resident memory above its level before the timed steps, sampled every
millisecond by a thread (coarse: the allocator may keep freed memory).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.trainer import autocast_dtype  # noqa: E402
from sam3d.modeling import build_sam3d, model_config  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RssPeak:
    """Samples resident memory in a background thread; ``peak_gb`` is the growth over the start."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.base = self.process.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)

    def __enter__(self) -> "RssPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_gb(self) -> float:
        return (self.peak - self.base) / 1024**3


def measure(encoder, x, device, backward: bool, amp: bool, repeats: int, warmup: int) -> dict:
    dtype = autocast_dtype(device)
    encoder.train(backward)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=amp), torch.set_grad_enabled(backward):
            out = encoder(x)
        if backward:
            out.float().mean().backward()
            encoder.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with RssPeak() as rss:
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else rss.peak_gb
    times.sort()
    return {"median_s": times[len(times) // 2], "min_s": times[0], "peak_gb": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_type", default="vit_b_ori")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default="outputs/bench.json")
    args = p.parse_args()

    device = torch.device(args.device)
    config = model_config(args.model_type)
    encoder = build_sam3d(config).image_encoder.to(device)
    x = torch.randn(args.batch_size, config.in_chans, *(config.img_size,) * 3, device=device)
    rows = []
    for mode in ("forward", "forward+backward"):
        for checkpointing in (False, True):
            if mode == "forward" and checkpointing:
                continue  # checkpointing only changes training
            for amp in (False, True):
                encoder.gradient_checkpointing = checkpointing
                result = measure(encoder, x, device, mode != "forward", amp, args.repeats, args.warmup)
                rows.append({"mode": mode, "grad_checkpointing": checkpointing, "amp": amp,
                             "amp_dtype": str(autocast_dtype(device)) if amp else "float32", **result})
    header = f"{'mode':<18}{'ckpt':<6}{'precision':<16}{'median s':>10}{'min s':>10}{'peak GB':>10}"
    print(f"{args.model_type} encoder, batch {args.batch_size}, input {tuple(x.shape)}, {device}"
          f" ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'})")
    print(header)
    for r in rows:
        print(f"{r['mode']:<18}{str(r['grad_checkpointing']):<6}{r['amp_dtype']:<16}"
              f"{r['median_s']:>10.3f}{r['min_s']:>10.3f}{r['peak_gb']:>10.2f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model_type": args.model_type, "batch_size": args.batch_size, "device": str(device),
                               "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
