"""``saev.v1.Image`` messages -> RGB PIL images, validated as untrusted input.

An image comes as encoded bytes (PNG/JPEG/... decoded by Pillow under a pixel limit), as an object-store key (read
under the request byte limit, then decoded the same way), or as raw pixels (uint8 ``[H, W, 3]`` or float32
``[3, H, W]`` in [0, 1]). Every failure is an :class:`InvalidArgument` / :class:`NotFound` / :class:`TooLarge`
naming the image's index.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from PIL import Image

from sae_shared.codec import CodecError, proto_to_array
from sae_shared.datasets import ImageError, decode_image
from sae_shared.proto.saev.v1 import common_pb2 as pb
from services.common.errors import InvalidArgument, NotFound, TooLarge
from services.common.limits import Limits


def check_image_count(images: Sequence[pb.Image], limits: Limits, field: str = "images") -> None:
    if not images:
        raise InvalidArgument(f"{field}: send at least one image", field)
    if len(images) > limits.max_batch_images:
        raise TooLarge(f"{field}: {len(images)} images, more than the limit of {limits.max_batch_images} per "
                       "request; split the batch", field)


def decode_images(images: Sequence[pb.Image], limits: Limits, max_pixels: int,
                  read_object: Callable[[str, int], bytes] | None, field: str = "images") -> list[Image.Image]:
    """Decode every image of a request; ``read_object(key, max_bytes)`` reads object-store keys."""
    check_image_count(images, limits, field)
    total = sum(len(im.encoded) + len(im.pixels.data) for im in images)
    if total > limits.max_request_bytes:
        raise TooLarge(f"{field}: {total} bytes of image data, more than the limit of {limits.max_request_bytes}",
                       field)
    return [decode_one(im, limits, max_pixels, read_object, f"{field}[{i}]") for i, im in enumerate(images)]


def decode_one(image: pb.Image, limits: Limits, max_pixels: int,
               read_object: Callable[[str, int], bytes] | None, field: str) -> Image.Image:
    kind = image.WhichOneof("source")
    if kind is None:
        raise InvalidArgument(f"{field}: no image given; set encoded, object_key or pixels", field)
    if kind == "encoded":
        return _decode_bytes(image.encoded, max_pixels, f"{field}.encoded")
    if kind == "object_key":
        if read_object is None:
            raise InvalidArgument(f"{field}.object_key: this service has no object store configured; send the "
                                  "image bytes instead", f"{field}.object_key")
        data = read_object(image.object_key, limits.max_request_bytes)
        return _decode_bytes(data, max_pixels, f"{field}.object_key")
    return _from_pixels(image.pixels, limits, max_pixels, f"{field}.pixels")


def _decode_bytes(data: bytes, max_pixels: int, field: str) -> Image.Image:
    if not data:
        raise InvalidArgument(f"{field}: empty image data", field)
    try:
        return decode_image(data, max_pixels=max_pixels)
    except ImageError as exc:
        too_big = "pixels, more than" in str(exc) or "decompression bomb" in str(exc)
        kind = TooLarge if too_big else InvalidArgument
        raise kind(f"{field}: {exc}; send a PNG or JPEG of at most {max_pixels} pixels", field) from None


def _from_pixels(msg: pb.Tensor, limits: Limits, max_pixels: int, field: str) -> Image.Image:
    try:
        arr = proto_to_array(msg, field=field, max_bytes=limits.max_request_bytes,
                             max_elements=limits.max_tensor_elements)
    except CodecError as exc:
        raise (TooLarge if exc.too_large else InvalidArgument)(str(exc), field) from None
    if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3:
        hwc = arr
    elif arr.dtype == np.float32 and arr.ndim == 3 and arr.shape[0] == 3:
        if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
            raise InvalidArgument(f"{field}: float32 pixels must be finite and in [0, 1]", field)
        hwc = np.ascontiguousarray((arr.transpose(1, 2, 0) * 255.0).round().astype(np.uint8))
    else:
        raise InvalidArgument(f"{field}: pixels must be uint8 [H, W, 3] or float32 [3, H, W] in [0, 1]; got "
                              f"{arr.dtype} {list(arr.shape)}", field)
    h, w = hwc.shape[:2]
    if h < 1 or w < 1:
        raise InvalidArgument(f"{field}: image has no pixels ({h}x{w})", field)
    if h * w > max_pixels:
        raise TooLarge(f"{field}: {h}x{w} pixels, more than the limit of {max_pixels}", field)
    return Image.fromarray(hwc)


def store_reader(store) -> Callable[[str, int], bytes]:
    """``read_object(key, max_bytes)`` over an ``ObjectStore``, refusing objects above ``max_bytes``."""
    from sae_shared.storage import InvalidKey, NotFound as StoreNotFound

    def read_object(key: str, max_bytes: int) -> bytes:
        try:
            size = store.size(key)
            if size > max_bytes:
                raise TooLarge(f"object {key!r} is {size} bytes, more than the limit of {max_bytes}", "object_key")
            return store.get_bytes(key)
        except InvalidKey as exc:
            raise InvalidArgument(f"object_key: {exc}", "object_key") from None
        except StoreNotFound:
            raise NotFound(f"object_key: no object {key!r} in the object store", "object_key") from None

    return read_object
