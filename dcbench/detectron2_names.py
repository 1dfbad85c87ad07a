"""ResNet weight names in torchvision's layout and in detectron2's, both ways, from one table.

detectron2's ``tools/convert-torchvision-to-d2.py`` (facebookresearch/detectron2) renames a
torchvision ResNet's ``conv1`` / ``bn1`` / ``layerN.B.convK`` / ``bnK`` / ``downsample.0/1`` to
``stem.conv1`` / ``resN+1.B.convK[.norm]`` / ``shortcut[.norm]``; MoCo's
``detection/convert-pretrain-to-detectron2.py`` does the same. Used by the export
(:mod:`dcbench.export_detectron2`) and by the converter that reads such files back
(:mod:`dcbench.converters`).
"""
from __future__ import annotations

import re

_GROUPS = {"block": r"\d+", "k": "[1-3]", "bn": "weight|bias|running_mean|running_var"}
#: (torchvision name, detectron2 name); ``{stage}`` is torchvision's layer index, detectron2's is one more
_PAIRS = [
    ("conv1.weight", "stem.conv1.weight"),
    ("bn1.{bn}", "stem.conv1.norm.{bn}"),
    ("layer{stage}.{block}.conv{k}.weight", "res{stage}.{block}.conv{k}.weight"),
    ("layer{stage}.{block}.bn{k}.{bn}", "res{stage}.{block}.conv{k}.norm.{bn}"),
    ("layer{stage}.{block}.downsample.0.weight", "res{stage}.{block}.shortcut.weight"),
    ("layer{stage}.{block}.downsample.1.{bn}", "res{stage}.{block}.shortcut.norm.{bn}"),
]


def _pattern(template: str, stages: str) -> re.Pattern[str]:
    """``template`` as a regex with one named group per placeholder (``stages``: the stage digits)."""
    groups = {**_GROUPS, "stage": stages}
    parts = re.split(r"\{(\w+)\}", template)  # literal, group name, literal, ...
    return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{groups[p]})"
                              for i, p in enumerate(parts)))


_TO_D2 = [(_pattern(tv, "[1-4]"), d2) for tv, d2 in _PAIRS]
_TO_TV = [(_pattern(d2, "[2-5]"), tv) for tv, d2 in _PAIRS]


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]], stage_shift: int) -> str | None:
    for pattern, template in rules:
        match = pattern.fullmatch(key)
        if match:
            groups = match.groupdict()
            if "stage" in groups:
                groups["stage"] = str(int(groups["stage"]) + stage_shift)
            return template.format(**groups)
    return None


def to_detectron2(key: str) -> str | None:
    """detectron2's name of a torchvision ResNet weight (``layer1.0.bn2.weight`` ->
    ``res2.0.conv2.norm.weight``); None for a key outside the table."""
    return _rename(key, _TO_D2, +1)


def to_torchvision(key: str) -> str | None:
    """torchvision's name of a detectron2 ResNet weight (the inverse of :func:`to_detectron2`);
    None for a key outside the table (caffe2 names, a detector's heads)."""
    return _rename(key, _TO_TV, -1)
