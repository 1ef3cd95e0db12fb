#!/usr/bin/env python
"""SAM-Med3D speed and memory: the padding-free window attention beside the official padded one, or
where the time of one scan's prediction goes.

    sam3d-bench                                   # vit_b_ori 128^3 on this machine's device
    sam3d-bench --device cuda --precision bf16 --max_batch_gb 10 --json outputs/bench_cuda.json
    sam3d-bench --predict scan.nii.gz --checkpoint best_model.pth [--report_model report/]

With --predict, one scan goes through what ``sam3d-predict`` (or, with --report_model,
``sam3d-report``) runs, in this process, and a table gives the seconds and peak resident memory of
each stage (read, resampling to the model grid and back, encoder, decoder, post-processing,
measurement, overlays, NIfTI and DICOM SEG writing, report LM); then two clicks are answered on the
prepared scan, as the app does: the first at the largest component (or the head's centre), which may
cost the encoder, the second beside it from the cached window. (With --report_model the scan is
prepared again for the clicks, so the first click also pays the scan's own post-processing parts.)

Measures, for ``window_attention`` = padding_free and reference on the same weights: encoder forward,
encoder forward + backward (batch --batch_size, with and without gradient checkpointing), and the
full segmentation training step (batch --step_batch_size, --num_clicks click rounds, DiceCE on the
upsampled logits, backward), and prints each with the ratio padding_free / reference. For the
training step it also prints where the time goes: the profiler ranges of sam3d.loss and
sam3d.clicks inside the forward pass (the profiler's own overhead included), and the forward and
backward wall times of that profiled step.

Every measurement runs in a fresh process, so the peak memory is its own: peak resident memory
(ru_maxrss, weights included) on CPU, ``torch.cuda.max_memory_allocated`` on CUDA. Times are the
median of --repeats after --warmup. With --max_batch_gb on CUDA the largest training-step batch
whose peak stays under that many GB is searched (padding_free). Writes every figure to --json.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ich_engine.cli import console_main
from ich_engine.config import CommandLineParser
from ich_engine.stage_timing import StageTimes, stage
from sam3d.data.io import load_volume
from sam3d.loss import InteractiveSegmentationLoss
from sam3d.modeling import build_sam3d, model_config
from sam3d.predict import Click, HemorrhageSegmenter

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
KINDS = ("encoder forward", "encoder forward+backward", "training step")
PROFILE_RANGES = ("sam3d.encoder", "sam3d.decoder", "sam3d.upsample", "sam3d.loss", "sam3d.click_sampling")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(config, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random image and an ellipsoid lesion at the centre (the clicks need a target)."""
    size = config.img_size
    axes = torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij")
    radii = torch.tensor([0.16, 0.12, 0.08]) * size
    lesion = sum(((a - size / 2) / r) ** 2 for a, r in zip(axes, radii)) < 1
    return {
        "image": torch.randn(batch_size, config.in_chans, size, size, size, device=device),
        "label": lesion[None, None].expand(batch_size, 1, -1, -1, -1).float().to(device),
    }


def _measure(spec: dict, results) -> None:
    """Child process: build the model, time ``spec['kind']``, report times and peak memory."""
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    config = model_config(spec["model_type"], window_attention=spec["window_attention"])
    model = build_sam3d(config).to(device)
    encoder = model.image_encoder
    encoder.gradient_checkpointing = spec["checkpointing"]
    dtype = PRECISIONS[spec["precision"]]
    batch = _batch(config, spec["batch_size"], device)
    loss_fn = InteractiveSegmentationLoss(model, num_clicks=spec["num_clicks"])
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def forward() -> torch.Tensor | None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            if spec["kind"] == "encoder forward":
                with torch.no_grad():
                    encoder.eval()(batch["image"])
                return None
            model.train()
            if spec["kind"] == "encoder forward+backward":
                return encoder(batch["image"]).float().mean()
            return loss_fn(batch)[0]

    def backward(loss: torch.Tensor | None) -> None:
        if loss is not None:
            scaler.scale(loss).backward()
            model.zero_grad(set_to_none=True)

    try:
        for _ in range(spec["warmup"]):
            backward(forward())
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            backward(forward())
            _sync(device)
            times.append(time.perf_counter() - start)
        profile = {}
        if spec["kind"] == "training step" and spec["profile"]:
            activities = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
            )
            with torch.profiler.profile(activities=activities) as prof:
                start = time.perf_counter()
                loss = forward()
                _sync(device)
                middle = time.perf_counter()
                backward(loss)
                _sync(device)
                end = time.perf_counter()
            totals = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key in PROFILE_RANGES}
            profile = {
                **{k: round(totals.get(k, 0.0), 3) for k in PROFILE_RANGES},
                "forward": round(middle - start, 3),
                "backward": round(end - middle, 3),
            }
        peak_gb = (
            torch.cuda.max_memory_allocated(device)
            if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        ) / 1024**3
        times.sort()
        results.put(
            {**spec, "median_s": times[len(times) // 2], "min_s": times[0], "peak_gb": peak_gb, "profile": profile}
        )
    except torch.OutOfMemoryError:
        results.put({**spec, "median_s": None, "min_s": None, "peak_gb": None, "profile": {}, "oom": True})
    except BaseException as err:  # the parent waits on the queue: it must hear of any failure
        results.put({**spec, "error": f"{type(err).__name__}: {err}"})
        raise


def run(spec: dict) -> dict:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_measure, args=(spec, results))
    child.start()
    row = results.get()
    child.join()
    if "error" in row:
        raise RuntimeError(f"{row['kind']} ({row['window_attention']}) failed in its process: {row['error']}")
    return row


def _largest_batch(base: dict, limit_gb: float) -> int:
    """Largest training-step batch whose peak CUDA memory stays under ``limit_gb`` (doubling, then bisection)."""

    def fits(batch: int) -> bool:
        row = run({**base, "batch_size": batch, "repeats": 1, "warmup": 0, "profile": False})
        return not row.get("oom") and row["peak_gb"] <= limit_gb

    low, high = 0, 1
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def print_pair(kind: str, batch: int, pair: dict, flush: bool = False) -> None:
    ref, fast = pair["reference"], pair["padding_free"]
    if ref.get("oom") or fast.get("oom"):
        print(f"{kind} (batch {batch}): out of memory ({'reference' if ref.get('oom') else 'padding_free'})")
        return
    print(
        f"{kind} (batch {batch}, {fast['model_type']}, {fast['precision']}, {fast['device']}):  "
        f"reference {ref['median_s']:.2f} s / {ref['peak_gb']:.2f} GB   padding_free {fast['median_s']:.2f} s / "
        f"{fast['peak_gb']:.2f} GB   ratio time {fast['median_s'] / ref['median_s']:.2f}, "
        f"memory {fast['peak_gb'] / ref['peak_gb']:.2f}",
        flush=flush,
    )
    for name, row in (("reference", ref), ("padding_free", fast)):
        if row["profile"]:
            print(
                f"    {name:<13} "
                + ", ".join(f"{k.removeprefix('sam3d.')} {v:.2f} s" for k, v in row["profile"].items())
            )


def _print_stages(times: StageTimes, total_s: float) -> None:
    print(f"{'stage':<24}{'seconds':>9}{'calls':>7}{'peak GB':>9}")
    for row in times.table():
        print(f"{row['stage']:<24}{row['seconds']:>9.2f}{row['calls']:>7}{row['peak_gb']:>9.2f}")
    unmarked = total_s - sum(times.seconds.values())
    print(f"{'(between stages)':<24}{unmarked:>9.2f}")
    print(f"{'total':<24}{total_s:>9.2f}{'':>7}{max(times.peak_gb.values(), default=0.0):>9.2f}")


def predict_stages(args) -> dict:
    """One scan through the predict (or report) path, then two clicks: seconds and memory per stage."""
    rows: dict = {"scan": args.predict, "checkpoint": args.checkpoint, "report_model": args.report_model}
    with tempfile.TemporaryDirectory() as out, StageTimes() as times:
        start = time.perf_counter()
        with stage("model load"):
            if args.report_model:
                from blip.app.grounded import ScanReporter  # sam3d imports blip only here, when asked to

                reporter = ScanReporter(args.checkpoint, args.report_model, args.device)
                assert reporter.segmenter is not None
                segmenter = reporter.segmenter
            else:
                segmenter = HemorrhageSegmenter(args.checkpoint, args.device)
        volume = load_volume(args.predict)
        if args.report_model:
            result = reporter.run(volume, "ct", output_dir=out)
            assert result.segmentation is not None  # a CT report
            measurements = result.segmentation.to_json()["measurements"]
        else:
            prepared = segmenter.prepare(volume)
            segmentation = segmenter.save(segmenter.predict(prepared), out)
            measurements = segmentation.to_json()["measurements"]
        total_s = time.perf_counter() - start
    print(f"{args.predict}: {volume.array.shape} voxels, spacing {[round(s, 3) for s in volume.spacing_mm]} mm")
    print(f"automatic {'report' if args.report_model else 'prediction'}: {measurements['total_volume_ml']} mL")
    _print_stages(times, total_s)
    rows.update(shape=list(volume.array.shape), automatic=times.table(), automatic_total_s=total_s)

    # Clicks as the app sends them, on the scan prepared for the automatic run (the report path prepares
    # its own inside ScanReporter.run, so here the scan is prepared again, outside the table).
    if args.report_model:
        prepared = segmenter.prepare(volume)
    if measurements["centroid_voxel"] is not None:
        first = np.round(measurements["centroid_voxel"]).astype(int)
    else:
        first = np.array(volume.array.shape) // 2
    second = np.clip(first + 2, 0, np.array(volume.array.shape) - 1)
    clicks: list = []
    for name, voxel in (("first click", first), ("second click", second)):
        clicks.append(Click((float(voxel[0]), float(voxel[1]), float(voxel[2]))))
        with StageTimes() as times:
            start = time.perf_counter()
            segmenter.predict(prepared, clicks)
            seconds = time.perf_counter() - start
        print(
            f"{name} at voxel {voxel.tolist()}: {seconds:.2f} s ("
            + ", ".join(f"{r['stage']} {r['seconds']:.2f}" for r in times.table())
            + ")"
        )
        rows[name.replace(" ", "_")] = {"voxel": voxel.tolist(), "seconds": seconds, "stages": times.table()}
    return rows


def main(argv=None) -> int:
    p = CommandLineParser(description=__doc__)
    p.add_argument("--predict", default=None, metavar="SCAN", help="time one scan's prediction by stage instead")
    p.add_argument("--checkpoint", default=None, help="--predict: the segmentation checkpoint")
    p.add_argument("--report_model", default=None, help="--predict: a report model folder (the sam3d-report path)")
    p.add_argument("--model_type", default="vit_b_ori")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--precision",
        choices=sorted(PRECISIONS),
        default="fp32",
        help="fp32, or autocast to bf16 / fp16 (fp16 with a grad scaler)",
    )
    p.add_argument("--batch_size", type=int, default=1, help="encoder rows")
    p.add_argument("--step_batch_size", type=int, default=2, help="training-step rows")
    p.add_argument("--num_clicks", type=int, default=11)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS), help="what to compare")
    p.add_argument(
        "--memory_batches",
        type=int,
        nargs="*",
        default=[1, 2],
        help="batches of the gradient-checkpointing memory rows (padding_free)",
    )
    p.add_argument("--max_batch_gb", type=float, default=None, help="CUDA: search the largest step batch under this")
    p.add_argument("--json", default="outputs/bench.json")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here")
    if args.predict is not None:
        if args.checkpoint is None or not Path(args.checkpoint).is_file():
            p.error(f"--predict needs --checkpoint, a segmentation checkpoint file; got {args.checkpoint}")
        if not Path(args.predict).exists():
            p.error(f"--predict {args.predict}: file or folder not found")
        stages = predict_stages(args)
        stages.update(device=args.device, torch=torch.__version__, threads=torch.get_num_threads())
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(stages, indent=2))
        print(f"written: {out}")
        return 0

    base = {
        "model_type": args.model_type,
        "device": args.device,
        "precision": args.precision,
        "num_clicks": args.num_clicks,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "checkpointing": False,
        "profile": True,
    }
    rows = []
    for kind in args.kinds:
        batch = args.step_batch_size if kind == "training step" else args.batch_size
        pair = {
            mode: run({**base, "kind": kind, "batch_size": batch, "window_attention": mode})
            for mode in ("reference", "padding_free")
        }
        rows += list(pair.values())
        print_pair(kind, batch, pair, flush=True)
    memory = [
        run(
            {
                **base,
                "kind": "encoder forward+backward",
                "batch_size": b,
                "checkpointing": c,
                "window_attention": "padding_free",
                "profile": False,
            }
        )
        for b in args.memory_batches
        for c in (False, True)
    ]
    print("\npadding_free encoder forward+backward, gradient checkpointing:")
    for row in memory:
        print(
            f"  batch {row['batch_size']}, checkpointing {str(row['checkpointing']):<5}: "
            f"{row['median_s']:.2f} s, peak {row['peak_gb']:.2f} GB"
        )
    largest = None
    if args.max_batch_gb is not None and args.device.startswith("cuda"):
        largest = _largest_batch(
            {**base, "kind": "training step", "window_attention": "padding_free"}, args.max_batch_gb
        )
        print(f"\nlargest training-step batch under {args.max_batch_gb:g} GB (padding_free): {largest}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    out.write_text(
        json.dumps(
            {
                "model_type": args.model_type,
                "device": args.device,
                "device_name": device_name,
                "precision": args.precision,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "rows": rows,
                "memory_rows": memory,
                "largest_step_batch": largest,
                "largest_step_batch_limit_gb": args.max_batch_gb,
            },
            indent=2,
        )
    )
    print(f"written: {out}")
    return 0


console = console_main(main)

if __name__ == "__main__":
    sys.exit(console())
