"""The values a request's omitted sampling fields take.

`--generation-config auto` (the default): the model's own, from generation_config.json in its
directory (temperature, top_p, top_k, min_p, repetition_penalty: what its authors recommend, e.g.
Qwen2.5's 0.7 / 0.8 / 20 / 1.05), as vLLM's and SGLang's servers do by default; `do_sample` is not
read (they do not read it either). `none`, or a field the file does not set (or sets to a value a
request could not ask for: logged and skipped): OpenAI's defaults (temperature 1, no truncation, no
penalty). A request's own value always wins; presence and frequency penalties are never in the file.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from pdserve.engine.sampling import SamplingParams
from pdserve.errors import InvalidRequestError

logger = logging.getLogger(__name__)

SOURCES = ("auto", "none")
_OPENAI = SamplingParams()  # OpenAI's defaults are SamplingParams' own: written once, there


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float = _OPENAI.temperature
    top_p: float = _OPENAI.top_p
    top_k: int = _OPENAI.top_k  # off
    min_p: float = _OPENAI.min_p
    repetition_penalty: float = _OPENAI.repetition_penalty

    def changed(self) -> dict[str, Any]:
        """The fields that differ from OpenAI's defaults."""
        openai = asdict(SamplingDefaults())
        return {k: v for k, v in asdict(self).items() if v != openai[k]}


def load_defaults(model_dir: str, source: str = "auto") -> SamplingDefaults:
    """The defaults for a model directory; `source` "none": OpenAI's."""
    if source not in SOURCES:
        raise ValueError(f"generation_config must be one of {', '.join(SOURCES)}, got {source!r}")
    path = os.path.join(model_dir, "generation_config.json")
    if source == "none" or not os.path.isfile(path):
        return SamplingDefaults()
    with open(path) as f:
        raw = json.load(f)
    taken: dict[str, Any] = {}
    for name in (f.name for f in fields(SamplingDefaults)):
        value = raw.get(name)
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        one: dict[str, Any] = {name: int(value) if name == "top_k" else float(value)}
        try:
            SamplingParams(**one)
        except InvalidRequestError as e:
            logger.warning("generation_config.json: %s=%r skipped (%s)", name, value, e)
            continue
        taken.update(one)
    defaults = SamplingDefaults(**taken)
    if defaults.changed():
        note = "--generation-config none: OpenAI's"
        logger.info("sampling defaults from %s (%s): %s", path, note, defaults.changed())
    return defaults
