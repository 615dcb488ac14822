"""What a backbone family file gives the registry: one `FAMILY = Family(...)` at its end."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Family:
    """name: the `family` key of its presets. model: built as model(*, image_size, in_channels,
    num_classes, conditioning, learn_sigma, **the preset's other keys). conditionings: the
    schemes it implements, its own default first. presets: name -> preset dict.
    geometry_errors(spec, image_size, prefix="") -> messages, each naming its key ([]: the
    preset runs at that size). token_stream: a transformer whose blocks pass one token stream
    (what train.bf16_stream keeps in bf16)."""

    name: str
    model: Callable[..., nn.Module]
    conditionings: tuple[str, ...]
    presets: dict[str, dict]
    geometry_errors: Callable[..., list[str]]
    token_stream: bool = True
