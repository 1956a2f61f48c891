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
