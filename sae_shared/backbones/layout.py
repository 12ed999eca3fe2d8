"""Token layout of a ViT's residual stream: which rows are CLS, registers and patches.

Every family lays its tokens out as ``[CLS?, registers..., patches (row-major)]``. The layout is part of the
contract between a recording (``metadata.json``), an SAE trained on it, and the backbone an intervention runs on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

TokenSelection = Literal["all", "cls", "patches", "registers"]
"""Which tokens of the residual stream to keep: every token, the CLS token, the patch tokens or the registers."""

TOKEN_SELECTIONS: tuple[str, ...] = ("all", "cls", "patches", "registers")


@dataclass(frozen=True)
class Layout:
    """Shape of a backbone's residual stream and where each kind of token sits in it."""

    n_blocks: int
    """Number of transformer blocks; valid (0-based) layer indices are ``0 .. n_blocks - 1``."""
    d_model: int
    """Width of the residual stream (D)."""
    n_tokens: int
    """Tokens per image (T): prefix tokens (CLS, registers) followed by the patch tokens."""
    cls_index: int | None
    """Row of the CLS token, or None when the model has none (SigLIP)."""
    register_indices: tuple[int, ...]
    """Rows of the register tokens (DINOv2 ``_reg4``: (1, 2, 3, 4)); empty when the model has none."""
    grid_rows: int
    """Patch rows; patch tokens are stored row-major, ``grid_rows * grid_cols`` of them."""
    grid_cols: int
    """Patch columns."""
    patch_size: int
    """Side of a square patch in pixels."""
    image_size: tuple[int, int]
    """Input image (height, width) in pixels that the position embeddings are built for."""

    def __post_init__(self) -> None:
        prefix = ([] if self.cls_index is None else [self.cls_index]) + list(self.register_indices)
        if sorted(prefix) != list(range(len(prefix))):
            raise ValueError(f"prefix tokens must occupy rows 0..{len(prefix) - 1}; got CLS "
                             f"{self.cls_index} and registers {self.register_indices}")
        if self.n_tokens != len(prefix) + self.grid_rows * self.grid_cols:
            raise ValueError(f"n_tokens={self.n_tokens} != {len(prefix)} prefix tokens + "
                             f"{self.grid_rows}x{self.grid_cols} patches")
        if (self.grid_rows * self.patch_size, self.grid_cols * self.patch_size) != tuple(self.image_size):
            raise ValueError(f"a {self.grid_rows}x{self.grid_cols} grid of {self.patch_size}px patches does not "
                             f"tile an image of {self.image_size}")

    @property
    def n_prefix_tokens(self) -> int:
        """Tokens before the first patch token (CLS and registers)."""
        return (0 if self.cls_index is None else 1) + len(self.register_indices)

    @property
    def n_patches(self) -> int:
        """Number of patch tokens."""
        return self.grid_rows * self.grid_cols

    def token_slice(self, tokens: TokenSelection) -> slice:
        """Rows of the residual stream that ``tokens`` selects (always a contiguous range)."""
        if tokens == "all":
            return slice(0, self.n_tokens)
        if tokens == "patches":
            return slice(self.n_prefix_tokens, self.n_tokens)
        if tokens == "cls":
            if self.cls_index is None:
                raise ValueError("tokens='cls' is not available: this backbone has no CLS token "
                                 "(use 'patches' or 'all')")
            return slice(self.cls_index, self.cls_index + 1)
        if tokens == "registers":
            if not self.register_indices:
                raise ValueError("tokens='registers' is not available: this backbone has no register tokens")
            return slice(self.register_indices[0], self.register_indices[-1] + 1)
        raise ValueError(f"unknown token selection {tokens!r}; expected one of {list(TOKEN_SELECTIONS)}")

    def n_selected(self, tokens: TokenSelection) -> int:
        """Number of rows ``tokens`` selects (T')."""
        s = self.token_slice(tokens)
        return s.stop - s.start

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as written to ``metadata.json``."""
        d = asdict(self)
        d["register_indices"] = list(self.register_indices)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layout:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**d, "register_indices": tuple(d["register_indices"]), "image_size": tuple(d["image_size"])})
