"""timm Vision Transformers behind the Backbone interface.

Taps (one forward pass, stopped after the deepest requested block):

* ``block1`` .. ``blockN``: the token output of each transformer block, patch tokens only, as a
  map N x D x h x w (h x w the patch grid), so the probes' spatial pooling applies unchanged;
  these are the ``conv_tap_names`` (see :class:`ViTBackbone`).
* ``cls``: the CLS token after the final norm (N x D), DINO's and timm's image feature.
* ``avgpool``: the mean of the final normed patch tokens (N x D; through ``fc_norm`` for models
  that pool that way, i.e. timm's pre-logits feature of average-pooled ViTs).
* ``clsN`` (N >= 2; ``cls4`` listed): the CLS tokens of the last N blocks, each through the final
  norm, concatenated (N*D), and ``cls+avgpool`` / ``clsN+avgpool``: the same followed by
  ``avgpool``. These are facebookresearch/dino ``eval_linear.py``'s linear-probe features:
  ``get_intermediate_layers(x, n)`` (vision_transformer.py: ``self.norm`` of each of the last n
  block outputs), ``[CLS]`` of each concatenated, ``--avgpool_patchtokens`` adds the mean of the
  last one's patch tokens; DINO uses n=4 without avgpool for ViT-S (``cls4``) and n=1 with it for
  ViT-B (``cls+avgpool``). DINO interleaves CLS and average (a permutation of the same features);
  dcbench concatenates them in order.

The clustering feature (``cluster`` tap) is ``cls``, or ``avgpool`` for a model without a CLS
token. Models are built with ``dynamic_img_size=True`` (position embeddings resampled to the
input's patch grid), so 32-64 px inputs work; an input side that is not a multiple of the patch
size loses its last ``side % patch`` pixel rows / columns, as the strided patch convolution of
facebookresearch/dino vision_transformer.py (PatchEmbed: Conv2d, kernel = stride = patch) drops
them (timm asserts divisibility instead), so retrieval's aspect-preserving resizes work.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from dcbench.models.base import CLUSTER_TAP, LOGITS_TAP
from dcbench.models.hooked import HookedBackbone

CLS_TAP = "cls"
AVGPOOL_TAP = "avgpool"
#: ``clsN`` / ``cls+avgpool`` / ``clsN+avgpool`` (see the module docstring)
CONCAT_TAP = re.compile(r"^cls(\d*)(\+avgpool)?$")
#: DINO eval_linear.py's features: ViT-S (n_last_blocks 4) and ViT-B (1 block + avgpool_patchtokens)
DINO_SMALL_TAP, DINO_BASE_TAP = "cls4", "cls+avgpool"


def concat_parts(tap: str) -> tuple[int, bool] | None:
    """``(number of last blocks, with avgpool)`` of a concatenated CLS tap, None for other names
    (``cls`` itself is the plain tap; ``cls1`` is not a name, ``cls`` is)."""
    match = CONCAT_TAP.match(tap)
    if match is None or tap == CLS_TAP or match.group(1) in ("0", "1") or match.group(1).startswith("0"):
        return None
    return int(match.group(1) or 1), bool(match.group(2))
#: timm modules whose models are VisionTransformer (sub)classes taking ``dynamic_img_size``
#: (the hybrids, e.g. ``vit_tiny_r_s16_p8_224``, are VisionTransformers with a CNN stem: built
#: without it they fail below 224 px with a position-embedding shape mismatch)
VIT_MODULES = ("timm.models.vision_transformer", "timm.models.deit", "timm.models.vision_transformer_hybrid",
               "timm.models.eva")


def is_timm_vit(name: str) -> bool:
    """Whether timm model ``name`` (without tag) is built by a :data:`VIT_MODULES` module."""
    from timm.models import model_entrypoint

    return model_entrypoint(name).__module__ in VIT_MODULES


def _token_model_classes() -> tuple[type, ...]:
    """timm transformer classes outside VisionTransformer that many ``vit_*`` names build
    (Eva: the ``vit_*_rope_*`` models; VisionTransformerRelPos: ``vit_relpos_*``). They token-map
    like a ViT; :class:`ViTBackbone` reads them through timm's ``forward_intermediates``."""
    from timm.models.eva import Eva
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos

    return Eva, VisionTransformerRelPos


def is_vit_model(model: nn.Module) -> bool:
    """Whether ``model`` is a timm VisionTransformer or another timm token model read the same way
    (the layouts :class:`ViTBackbone` reads)."""
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, (VisionTransformer, *_token_model_classes()))


class ViTBackbone(HookedBackbone):
    """A timm VisionTransformer with block, ``cls`` and ``avgpool`` taps.

    ``conv_tap_names`` are the block taps: every engine consumer of conv taps (per-layer probes,
    R-MAC retrieval, segmentation heads, fine-tune trunks) needs a spatial map, and the block
    taps give the per-depth curve that conv1..conv5 give for a CNN. The standard ViT probe
    (DINO's last-block CLS) is ``taps=[cls]``, chosen by the protocol preset.
    """

    family = "vit"

    def __init__(self, arch: str, model: nn.Module, sobel: bool, input_size: int,
                 native_heads: tuple[str, ...] = ()) -> None:
        blocks = {f"block{i + 1}": f"blocks.{i}" for i in range(len(model.blocks))}
        super().__init__(arch, model, blocks, int(model.num_features), sobel, input_size, native_heads)
        self.family = "vit"
        self.has_cls = getattr(model, "cls_token", None) is not None
        self.conv_tap_names = list(blocks)
        self.depth = len(model.blocks)
        concat = ([DINO_SMALL_TAP] if self.depth >= 4 else []) + [DINO_BASE_TAP]
        self.tap_names = list(blocks) + ([CLS_TAP, AVGPOOL_TAP, *concat] if self.has_cls else [AVGPOOL_TAP])

    def has_tap(self, name: str) -> bool:
        """Listed taps, and every ``clsN[+avgpool]`` with 2 <= N <= depth (models with a CLS token)."""
        if name in self.tap_names:
            return True
        parts = concat_parts(name)
        return self.has_cls and parts is not None and parts[0] <= self.depth

    @property
    def image_feature_tap(self) -> str:
        """The tap DINO's eval_knn.py and the simple linear probe read: ``cls`` (``avgpool`` without
        a CLS token)."""
        return CLS_TAP if self.has_cls else AVGPOOL_TAP

    def dino_linear_tap(self) -> str:
        """DINO eval_linear.py's probe feature for this width: ``cls4`` for ViT-S and narrower
        (embed dim < 768), ``cls+avgpool`` for ViT-B and wider (``--n_last_blocks`` help: "n=4
        when evaluating ViT-Small and n=1 with ViT-Base"; ``--avgpool_patchtokens``: "False for
        ViT-Small and True with ViT-Base"); the image feature without a CLS token."""
        if not self.has_cls:
            return AVGPOOL_TAP
        return DINO_SMALL_TAP if self.feature_dim < 768 and self.depth >= 4 else DINO_BASE_TAP

    def _concat_needs(self, wanted: set[str]) -> set[int]:
        """Block indices (from 0) whose normed CLS token the wanted concatenated taps read."""
        needs: set[int] = set()
        for tap in wanted:
            parts = concat_parts(tap)
            if parts is not None:
                needs.update(range(self.depth - parts[0], self.depth))
        return needs

    def _forward_taps(self, x: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
        m = self.model
        if self.sobel is not None:
            x = self.sobel(x)
        x = self._fit_patches(x)
        if isinstance(m, _token_model_classes()):
            return self._forward_intermediates(x, wanted)
        x = m.patch_embed(x)
        # dynamic_img_size models emit N x h x w x D; fixed-size ones N x L x D on their own grid
        grid = tuple(x.shape[1:3]) if x.dim() == 4 else tuple(m.patch_embed.grid_size)
        x = m.norm_pre(m.patch_drop(m._pos_embed(x)))
        concat = self._concat_needs(wanted)
        heads = wanted & {CLS_TAP, AVGPOOL_TAP, CLUSTER_TAP, LOGITS_TAP} or concat
        blocks = [int(t[len("block"):]) for t in wanted if t.startswith("block")]
        depth = len(m.blocks) if heads else max(blocks, default=0)
        out: dict[str, torch.Tensor] = {}
        normed_cls: dict[int, torch.Tensor] = {}
        for i in range(depth):
            x = m.blocks[i](x)
            if f"block{i + 1}" in wanted:
                out[f"block{i + 1}"] = self._token_map(x, grid)
            if i in concat and i < depth - 1:  # LayerNorm is per token: norm(x)[:, 0] == norm(x[:, :1])
                normed_cls[i] = m.norm(x[:, :1])[:, 0]
        if heads:
            normed = m.norm(x)
            normed_cls[depth - 1] = normed[:, 0]
            out.update(self._head_taps(normed, wanted, normed_cls))
        return out

    def _forward_intermediates(self, x: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
        """The same taps through timm's ``forward_intermediates`` (block outputs as N x D x h x w
        maps, then the final norm), for the models whose blocks take extra inputs (rotary or
        relative position embeddings) that the plain block loop does not pass."""
        concat = self._concat_needs(wanted)
        heads = wanted & {CLS_TAP, AVGPOOL_TAP, CLUSTER_TAP, LOGITS_TAP} or concat
        blocks = {int(t[len("block"):]) - 1 for t in wanted if t.startswith("block")}
        indices = sorted(blocks | concat) or [len(self.model.blocks) - 1]
        result = self.model.forward_intermediates(x, indices=indices, norm=False, output_fmt="NCHW",
                                                  stop_early=not heads, intermediates_only=not heads,
                                                  return_prefix_tokens=bool(concat))
        normed, maps = result if heads else (None, result)
        normed_cls = {}
        if concat:  # (map, prefix tokens) pairs; the CLS token through the final (per-token) norm
            normed_cls = {i: self.model.norm(pair[1][:, :1])[:, 0] for i, pair in zip(indices, maps) if i in concat}
            maps = [pair[0] for pair in maps]
        out = {f"block{i + 1}": fmap for i, fmap in zip(indices, maps) if f"block{i + 1}" in wanted}
        if heads:
            out.update(self._head_taps(normed, wanted, normed_cls))
        return out

    def _token_map(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patch tokens N x L x D as a map N x D x h x w."""
        patches = tokens[:, self.model.num_prefix_tokens:]
        n, length, dim = patches.shape
        if length != grid[0] * grid[1]:
            raise RuntimeError(f"{self.arch}: {length} patch tokens do not fill a {grid[0]}x{grid[1]} grid")
        return patches.transpose(1, 2).reshape(n, dim, *grid)

    def _head_taps(self, normed: torch.Tensor, wanted: set[str],
                   normed_cls: dict[int, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        avg = self.model.fc_norm(normed[:, self.model.num_prefix_tokens:].mean(dim=1))
        feature = normed[:, 0] if self.has_cls else avg
        taps = {CLS_TAP: feature, AVGPOOL_TAP: avg, CLUSTER_TAP: feature}
        out = {t: v for t, v in taps.items() if t in wanted}
        for tap in wanted:
            parts = concat_parts(tap)
            if parts is not None:
                n, with_avg = parts
                cls = [normed_cls[i] if i < self.depth - 1 else normed[:, 0] for i in range(self.depth - n, self.depth)]
                out[tap] = torch.cat(cls + ([avg] if with_avg else []), dim=1)
        if LOGITS_TAP in wanted:
            out[LOGITS_TAP] = self.top_layer(feature)
        return out
