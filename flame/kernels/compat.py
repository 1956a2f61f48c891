"""transformers >= 5.2x hands the generation cache to `forward(cache=...)`; FLA 0.6.0 models read only
`past_key_values`, so without this every decoding step after the first starts from an empty state. install()
renames the key in the inputs FLA's generation mixin prepares (on every device: it is not a kernel matter)."""

from __future__ import annotations

import functools


def patch_generation_cache_name() -> None:
    from fla.models.generation_utils import FLAGenerationMixin

    prepare = FLAGenerationMixin.prepare_inputs_for_generation
    if getattr(prepare, "__flame_original__", None) is not None:
        return

    @functools.wraps(prepare)
    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = prepare(self, *args, **kwargs)
        if "cache" in inputs and inputs.get("past_key_values") is None:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    prepare_inputs_for_generation.__flame_original__ = prepare
    FLAGenerationMixin.prepare_inputs_for_generation = prepare_inputs_for_generation


class _DropCacheNameWarning:
    """FLA 0.6.0 builds its outputs with `past_key_values=`, which transformers >= 5.2x answers with a
    "`past_key_values`/`cache_params` are deprecated" warning on every run: a matter between those two libraries
    that a flame user can do nothing about, so it is filtered from transformers' logger."""

    def filter(self, record) -> bool:
        return "`past_key_values`/`cache_params` are deprecated" not in record.getMessage()


def quiet_cache_name_warning() -> None:
    from transformers.utils import logging as hf_logging

    logger = hf_logging.get_logger("transformers.utils.generic")
    if not any(isinstance(f, _DropCacheNameWarning) for f in logger.filters):
        logger.addFilter(_DropCacheNameWarning())
