"""The model card (``README.md``) written into every saved pipeline folder.

Fields come from a ``card`` dict (given to the pipeline or to ``save_pretrained``, kept in ``model_index.json``):

* ``recipe``: how the model was trained — a string (e.g. ``"configs/generator/shapes_randar.yaml"``) or a dict;
* ``data``: what it was trained on — a string, a list of strings or a dict;
* ``metrics``: measured results — a dict ``{name: value}`` (or a string);
* ``licence`` (``license`` is accepted too): an SPDX-style identifier or a sentence;
* ``description``: free text shown under the title.

A field nobody filled in is written as ``unknown``: a card should say what is not known rather than omit it.
The components (classes, token spec, conditioning) and the sampling defaults are read from the pipeline itself.
"""

from __future__ import annotations

import json

from tokenloom.pipelines.base import COMPONENTS

CARD_FIELDS = ("recipe", "data", "metrics", "licence", "description")
UNKNOWN = "unknown"
# Hugging Face Hub pipeline tags of our tasks (the Hub has no class-conditional or editing-specific tag)
HUB_TAGS = {"text-to-image": "text-to-image", "unconditional-image-generation": "unconditional-image-generation",
            "image-inpainting": "image-to-image", "image-outpainting": "image-to-image",
            "image-variation": "image-to-image", "image-reconstruction": "image-to-image"}


def check_card(card) -> dict:
    """A card dict with known keys and JSON values → a copy (``license`` renamed ``licence``); None → ``{}``."""
    if card is None:
        return {}
    if not isinstance(card, dict):
        raise TypeError(f"card must be a dict with keys from {CARD_FIELDS}, got {type(card).__name__}")
    out = {}
    for key, value in card.items():
        key = "licence" if key == "license" else key
        if key not in CARD_FIELDS:
            raise ValueError(f"card has an unknown field {key!r}; allowed: {CARD_FIELDS} ('license' = 'licence')")
        try:
            json.dumps(value)
        except TypeError as err:
            raise TypeError(f"card[{key!r}] must be JSON-serialisable (str, number, list, dict), got "
                            f"{type(value).__name__}") from err
        out[key] = value
    return out


def _text(value) -> str:
    if value is None or value == "" or value == {} or value == []:
        return UNKNOWN
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(f"- {_text(v)}" for v in value)
    if isinstance(value, dict):
        return "\n".join(f"- **{k}**: {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in value.items())
    return str(value)


def _metrics(value) -> str:
    if not isinstance(value, dict) or not value:
        return _text(value)
    rows = "\n".join(f"| {k} | {json.dumps(v) if isinstance(v, (dict, list)) else v} |" for k, v in value.items())
    return "| metric | value |\n|---|---|\n" + rows


def _components(pipe) -> str:
    rows = []
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if module is None:
            continue
        notes = []
        spec = getattr(module, "spec", None)
        if spec is not None and name == "image_tokenizer":
            notes.append(f"tokens: {spec}")
        if name == "token_generator":
            kind = getattr(getattr(module, "config", None), "condition", None)
            if kind is not None:
                notes.append(f"condition: {kind}")
        if name == "scorer":
            notes.append(f"keeps the best of {pipe.config.get('num_candidates', 1)} candidates per image")
        params = sum(p.numel() for p in module.parameters()) if hasattr(module, "parameters") else 0
        notes.append(f"{params:,} parameters")
        rows.append(f"| `{name}` | `{type(module).__name__}` | {'; '.join(notes)} |")
    return "| component | class | notes |\n|---|---|---|\n" + "\n".join(rows)


def render_card(pipe, card: dict, name: str = "") -> str:
    """The README.md text of ``pipe`` with ``card`` fields (missing ones: ``unknown``)."""
    card = check_card(card)
    task = getattr(pipe, "task", "") or "unknown"
    licence = card.get("licence") or UNKNOWN
    front = ["---", "library_name: tokenloom",
             f"license: {licence if isinstance(licence, str) and ' ' not in licence else 'other'}"]
    if task in HUB_TAGS:
        front.append(f"pipeline_tag: {HUB_TAGS[task]}")
    front += ["tags:", "- tokenloom", f"- {task}", "---", ""]
    defaults = json.dumps(pipe.config.get("sampling_defaults") or {}, indent=2, sort_keys=True)
    body = [
        f"# {name or type(pipe).__name__} — tokenloom `{task}` pipeline", "",
        _text(card.get("description")) if card.get("description") else f"Pipeline class: `{type(pipe).__name__}`.", "",
        "## Components", "", _components(pipe), "",
        "## Recipe", "", _text(card.get("recipe")), "",
        "## Data", "", _text(card.get("data")), "",
        "## Metrics", "", _metrics(card.get("metrics")), "",
        "## Licence", "", _text(card.get("licence")), "",
        "## Sampling defaults", "", "```json", defaults, "```", "",
        "## Usage", "", "```python", "import tokenloom", "",
        f'pipe = tokenloom.pipeline("{task}", model="path/to/this/folder")',
        "# or, with diffusers:",
        "# from diffusers import DiffusionPipeline",
        '# pipe = DiffusionPipeline.from_pretrained("path/to/this/folder", trust_remote_code=True)', "```", "",
    ]
    return "\n".join(front + body)


__all__ = ["CARD_FIELDS", "check_card", "render_card"]
