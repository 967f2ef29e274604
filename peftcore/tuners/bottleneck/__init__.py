"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) and Compacter / Compacter++.

Two registered methods share one injection: ``BOTTLENECK`` (:class:`BottleneckConfig`) and
``COMPACTER`` (:class:`CompacterConfig`; Compacter++ reaches it through its base class).
adapter_config.json holds the config's fields plus ``peft_type``.
"""

from ..base import Method, dataclass_from_json, dataclass_to_json, register_method
from .config import BottleneckConfig, CompacterConfig, CompacterPlusPlusConfig
from .model import PLACEMENT_POINTS, bottleneck_slots, inject_bottleneck, resolve_points


def _bottleneck_to_json(config, model, name: str) -> dict:
    return dataclass_to_json(config, "BOTTLENECK")


def _bottleneck_from_json(d: dict, source: str) -> BottleneckConfig:
    return dataclass_from_json(BottleneckConfig, d, "BOTTLENECK", source)


def _compacter_to_json(config, model, name: str) -> dict:
    return dataclass_to_json(config, "COMPACTER")


def _compacter_from_json(d: dict, source: str) -> CompacterConfig:
    # Both classes have the same fields; the Pfeiffer placement is what makes Compacter++.
    cls = CompacterPlusPlusConfig if isinstance(d, dict) and d.get("placement") == "pfeiffer" else CompacterConfig
    return dataclass_from_json(cls, d, "COMPACTER", source)


BOTTLENECK = register_method(
    Method("BOTTLENECK", BottleneckConfig, inject_bottleneck, _bottleneck_to_json, _bottleneck_from_json)
)
COMPACTER = register_method(
    Method("COMPACTER", CompacterConfig, inject_bottleneck, _compacter_to_json, _compacter_from_json)
)

__all__ = [
    "PLACEMENT_POINTS",
    "BottleneckConfig",
    "CompacterConfig",
    "CompacterPlusPlusConfig",
    "bottleneck_slots",
    "inject_bottleneck",
    "resolve_points",
]
