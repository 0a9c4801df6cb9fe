"""Train a text-to-image pipeline (tokenizer, text conditioner, generator) from a YAML recipe.

    python scripts/train_text_to_image.py --config configs/pipeline/shapes_text_to_image.yaml --output-dir runs/t2i \
        [train.max_minutes=3 tokenizer.path=runs/zoo/vq ...]

The same command line as ``scripts/train_tokenizer.py`` and ``scripts/train_generator.py``: ``--config`` and
dot-list overrides (``section.key=value``, the value parsed as YAML). Single process (the recipe trains the
tokenizer, then the conditioner and generator jointly, in time-budgeted rounds).
"""

from __future__ import annotations

from tokenloom.training.entry import parse_single_run_args
from tokenloom.training.text_to_image import train_text_to_image


def main(argv=None) -> None:
    cfg, output_dir, progress = parse_single_run_args(argv, __doc__, "pipeline", "pipeline folder")
    train_text_to_image(cfg, output_dir, progress=progress)
    print(f"wrote {output_dir}")


if __name__ == "__main__":
    main()
