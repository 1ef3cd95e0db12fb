"""The report processor, in the Hugging Face sense: what turns a study into the model's inputs and the
model's ids back into text, in one object saved beside the model.

- image transforms per modality:
  - ``ct``: the exported encoder's preprocessing contract (``sam3d.data.preprocessing``: RAS,
    resampling, HU clamp, normalisation), then a centred crop or pad to the tower's input size.
    Padding uses the volume's minimum, i.e. air after normalisation.
  - ``xray``: grayscale → resized to the tower's square input → repeated to 3 channels → normalised
    with segment-anything's pixel statistics (what the 2-D encoder was trained on). The resize does not
    keep the aspect ratio, as R2Gen and R2GenGPT do for chest films.
- prompt building: ``[context] prompt`` (context: the measurement and diagnosis sentences,
  ``blip.conditioning``, ``blip.diagnosis``); text-only LM pretraining writes the same text.
- tokenisation of reports (each + end-of-text, right-padded, no BOS: the soft prompt starts the
  sequence) and decoding.

``save_pretrained(folder)`` writes ``processor_config.json``; the tokenizer is the LM's, in ``lm/``
of the same folder (``Blip2ReportModel.save_pretrained``), so it is not stored twice.
``from_pretrained(folder)`` reads both back; a folder saved before the processor existed is read
from its model ``config.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sam3d.data.io import Volume
from sam3d.data.preprocessing import Preprocessing

from .language_model import load_tokenizer
from .vision import SAM2D_PIXEL_MEAN, SAM2D_PIXEL_STD

__all__ = ["DEFAULT_PROMPTS", "PROCESSOR_NAME", "Blip2ReportProcessor", "prompt_text"]

PROCESSOR_NAME = "processor_config.json"
TOKENIZER_FOLDER = "lm"  # beside the LM whose vocabulary it is
DEFAULT_PROMPTS = {"ct": "Head CT report:", "xray": "Chest X-ray report:"}
ImageTransform = Callable[[str | Volume], torch.Tensor]


def prompt_text(prompt: str, context: str | None = None) -> str:
    """The text the LM reads after the soft prompt: ``context`` (measurement / diagnosis sentences),
    then the modality's prompt."""
    return f"{context} {prompt}" if context else prompt


def ct_image_transform(preprocessing: Preprocessing | Mapping[str, Any] | None, img_size: int) -> ImageTransform:
    """path or Volume → float32 (C, img_size, img_size, img_size) for the CT tower."""
    # MONAI takes tens of seconds to import on 2 busy cores: X-ray-only models never load it.
    from monai.transforms import Compose, ResizeWithPadOrCropd
    from monai.utils import convert_to_tensor

    from sam3d.data.transforms import build_inference_transforms

    pipeline = Compose(
        [build_inference_transforms(preprocessing), ResizeWithPadOrCropd("image", (img_size,) * 3, mode="minimum")]
    )
    # A plain tensor: MetaTensor's per-op bookkeeping would slow every layer of the model down.
    return lambda scan: convert_to_tensor(pipeline({"image": scan})["image"], dtype=torch.float32, track_meta=False)


def xray_image_transform(img_size: int) -> ImageTransform:
    """path → float32 (3, img_size, img_size) for the X-ray tower."""
    mean = torch.tensor(SAM2D_PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(SAM2D_PIXEL_STD).view(3, 1, 1)

    def load(path: str | Volume) -> torch.Tensor:
        if isinstance(path, Volume):
            raise ValueError(f"{path.source}: an X-ray tower reads 2-D image files, not a CT volume")
        with Image.open(path) as image:
            gray = image.convert("L").resize((img_size, img_size), Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.asarray(gray, dtype=np.float32))
        return (pixels.expand(3, -1, -1) - mean) / std

    return load


class Blip2ReportProcessor:
    """Images, prompts and reports of one report model.

    Args:
        tokenizer: the LM's Hugging Face tokenizer.
        prompts: modality → prompt text.
        max_text_len: report tokens kept (end-of-text included).
        ct_preprocessing / ct_img_size: the CT tower's contract and input size (None: no CT tower).
        xray_img_size: the X-ray tower's input size (None: no X-ray tower).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompts: Mapping[str, str] | None = None,
        max_text_len: int = 128,
        ct_preprocessing: Preprocessing | Mapping[str, Any] | None = None,
        ct_img_size: int | None = None,
        xray_img_size: int | None = None,
    ) -> None:
        if max_text_len < 2:
            raise ValueError(f"max_text_len must be >= 2 (a token and end-of-text), got {max_text_len}")
        self.tokenizer = tokenizer
        self.prompts = dict(DEFAULT_PROMPTS if prompts is None else prompts)
        self.max_text_len = max_text_len
        self.ct_preprocessing = None if ct_img_size is None else Preprocessing.coerce(ct_preprocessing).for_inference()
        self.ct_img_size = ct_img_size
        self.xray_img_size = xray_img_size
        self._transforms: dict[str, ImageTransform] = {}

    @property
    def modalities(self) -> list[str]:
        return [m for m, size in (("ct", self.ct_img_size), ("xray", self.xray_img_size)) if size is not None]

    # ------------------------------------------------------------------ images
    def image_transform(self, modality: str) -> ImageTransform:
        """The pipeline that feeds the modality's tower: path (or CT Volume) → (C, *spatial) float32."""
        if modality not in self._transforms:
            if modality == "ct" and self.ct_img_size is not None:
                self._transforms[modality] = ct_image_transform(self.ct_preprocessing, self.ct_img_size)
            elif modality == "xray" and self.xray_img_size is not None:
                self._transforms[modality] = xray_image_transform(self.xray_img_size)
            else:
                raise ValueError(f"this report model has no {modality} tower (it reads {self.modalities})")
        return self._transforms[modality]

    def images(self, scans: Sequence[str | Volume], modality: str) -> torch.Tensor:
        """(B, C, *spatial): a batch of one modality."""
        transform = self.image_transform(modality)
        return torch.stack([transform(scan) for scan in scans])

    # ------------------------------------------------------------------ text
    def prompt_text(self, modality: str, context: str | None = None) -> str:
        if modality not in self.prompts:
            raise KeyError(f"no prompt for modality '{modality}'; the processor has {sorted(self.prompts)}")
        return prompt_text(self.prompts[modality], context)

    def prompt_ids(self, modality: str, context: str | None = None) -> torch.Tensor:
        """(P,) token ids of the modality's prompt, preceded by ``context`` when given."""
        return torch.tensor(self.tokenizer(self.prompt_text(modality, context), add_special_tokens=False).input_ids)

    def tokenize_reports(self, reports: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), each (B, T ≤ max_text_len): each report + end-of-text (so the
        LM learns to stop), right-padded; no BOS, since the soft prompt starts the sequence."""
        encoded = self.tokenizer(
            [text.strip() + self.tokenizer.eos_token for text in reports],
            add_special_tokens=False,
            truncation=True,
            max_length=self.max_text_len,
            padding="longest",
            return_tensors="pt",
        )
        return encoded.input_ids, encoded.attention_mask

    def decode(self, token_ids: torch.Tensor) -> list[str]:
        return [text.strip() for text in self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)]

    def __call__(
        self, images: Sequence[str | Volume] | None = None, modality: str = "ct", reports: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """``{"images" (B, C, *S), "input_ids", "attention_mask"}`` for what is given."""
        out: dict[str, Any] = {"modality": modality}
        if images is not None:
            out["images"] = self.images(images, modality)
        if reports is not None:
            out["input_ids"], out["attention_mask"] = self.tokenize_reports(reports)
        return out

    # ------------------------------------------------------------------ save / load
    def to_dict(self) -> dict[str, Any]:
        return {
            "processor_class": type(self).__name__,
            "prompts": self.prompts,
            "max_text_len": self.max_text_len,
            "ct_preprocessing": None if self.ct_preprocessing is None else self.ct_preprocessing.to_dict(),
            "ct_img_size": self.ct_img_size,
            "xray_img_size": self.xray_img_size,
            "tokenizer": TOKENIZER_FOLDER,
        }

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """``processor_config.json`` + the tokenizer in ``lm/`` (already there beside a saved LM)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PROCESSOR_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        if not (folder / TOKENIZER_FOLDER / "tokenizer_config.json").is_file():
            self.tokenizer.save_pretrained(folder / TOKENIZER_FOLDER)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> Blip2ReportProcessor:
        """From a ``save_pretrained`` folder (a report model's)."""
        folder = Path(folder)
        path = folder / PROCESSOR_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a report model folder with a processor")
        values = json.loads(path.read_text())
        return cls(
            load_tokenizer(folder / values["tokenizer"]),
            values["prompts"],
            values["max_text_len"],
            values["ct_preprocessing"],
            values["ct_img_size"],
            values["xray_img_size"],
        )
