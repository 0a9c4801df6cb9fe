"""The base of every tokenloom model: ``diffusers.ModelMixin`` + ``ConfigMixin`` with strict loading.

diffusers only *warns* when a checkpoint folder lacks weights (and then initialises them at
random). A tokenloom model refuses instead: a folder with missing, unexpected or mis-shaped
weights raises a ``ValueError`` naming the keys and shapes (DESIGN.md §7).
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin


def _format_problems(name: str, missing, unexpected, mismatched) -> str:
    lines = [f"checkpoint for {name} does not fit its config:"]
    if missing:
        lines.append(f"  missing keys: {sorted(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys: {sorted(unexpected)}")
    for key, got, want in mismatched:
        lines.append(f"  mis-shaped key {key}: checkpoint {tuple(got)} vs model {tuple(want)}")
    return "\n".join(lines)


class TokenloomModel(ModelMixin, ConfigMixin):
    """ModelMixin + ConfigMixin whose ``from_pretrained`` fails on weights that do not fit."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        except RuntimeError as err:  # diffusers raises RuntimeError for size mismatches
            if "size mismatch" in str(err) or "Error(s) in loading" in str(err):
                raise ValueError(f"checkpoint for {cls.__name__} at {pretrained_model_name_or_path} does not fit "
                                 f"its config: {err}") from err
            raise
        missing, unexpected = info.get("missing_keys", []), info.get("unexpected_keys", [])
        mismatched = info.get("mismatched_keys", [])
        if missing or unexpected or mismatched:
            raise ValueError(_format_problems(f"{cls.__name__} at {pretrained_model_name_or_path}",
                                              missing, unexpected, mismatched))
        # safetensors hands back tensors at addresses off 64-byte alignment, which changes BLAS code paths
        # and so the last bits of outputs; owning aligned copies makes a loaded model bit-identical to the saved one.
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                tensor.data = tensor.data.clone()
        return (model, info) if want_info else model
