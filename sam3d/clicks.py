"""Simulated clicks, the way SAM-Med3D trains and validates its interactive decoder.

The first click lands on a random voxel of the hemorrhage; each next click is drawn uniformly from
the current error region: a missed voxel gives a positive click, a false-positive voxel a negative
one. The previous round's low-res logits go back in as the mask prompt; the image encoder runs once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import record_function

from .modeling.sam3d import Sam3D


def sample_next_clicks(
    prediction: torch.Tensor, target: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One click per case from the error region.

    prediction, target: bool (B, 1, *S). Returns points (B, 1, 3) in voxel coordinates and labels (B, 1)
    (1 positive, 0 negative, -1 "no click" when the prediction is already perfect).
    """
    batch = target.shape[0]
    points = torch.zeros((batch, 1, 3), dtype=torch.float32, device=target.device)
    labels = torch.full((batch, 1), -1, dtype=torch.long, device=target.device)
    for b in range(batch):
        error = (prediction[b, 0] ^ target[b, 0]).nonzero()
        if len(error) == 0:
            continue
        pick = error[int(torch.randint(len(error), (1,), generator=generator).item())]
        points[b, 0] = pick.float()
        labels[b, 0] = int(target[b, 0][tuple(pick)])
    return points, labels


def run_click_rounds(
    model: Sam3D,
    image_embeddings: torch.Tensor,
    target: torch.Tensor,
    num_clicks: int,
    generator: torch.Generator,
    on_round: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Refine a mask over ``num_clicks`` simulated clicks; returns the last full-size logits (B, 1, *S).

    ``on_round(i, logits)`` sees each round's logits (the training loss sums over rounds).
    """
    if num_clicks < 1:
        raise ValueError(f"num_clicks must be >= 1, got {num_clicks}")
    batch = target.shape[0]
    mask_size = tuple(4 * s for s in model.prompt_encoder.image_embedding_size)
    low_res = torch.zeros((batch, 1, *mask_size), device=target.device, dtype=image_embeddings.dtype)
    target = target > 0.5
    prediction = torch.zeros_like(target)
    points = torch.zeros((batch, 0, 3), device=target.device)
    labels = torch.zeros((batch, 0), dtype=torch.long, device=target.device)
    logits: torch.Tensor | None = None
    for i in range(num_clicks):
        with record_function("sam3d.click_sampling"):  # ranges read by sam3d-bench
            new_points, new_labels = sample_next_clicks(prediction, target, generator)
        points = torch.cat([points, new_points], dim=1)
        labels = torch.cat([labels, new_labels], dim=1)
        # The mask prompt is an input, as in the official loop: no gradient flows into earlier rounds.
        with record_function("sam3d.decoder"):
            low_res, _ = model.decode(image_embeddings, points, labels, low_res.detach())
        with record_function("sam3d.upsample"):
            logits = model.upsample_logits(low_res)
        prediction = logits.detach() > 0
        if on_round is not None:
            on_round(i, logits)
    assert logits is not None  # num_clicks >= 1 rounds ran
    return logits
