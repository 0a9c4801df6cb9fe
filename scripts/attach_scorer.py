"""Give a text-to-image pipeline folder a scorer, so it keeps the best of ``k`` candidates per image.

    python scripts/attach_scorer.py --model runs/default/model --scorer runs/default/scorer --num-candidates 8 \
        [--out DIR]

Writes the pipeline with its new ``scorer`` component and ``num_candidates`` setting to ``--out`` (default: over
``--model``). The scorer is a folder written by ``scripts/train_scorer.py``.
"""

from __future__ import annotations

import argparse

import tokenloom
from tokenloom.scoring import SCORERS


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="text-to-image pipeline folder")
    parser.add_argument("--scorer", required=True, help="scorer folder (scripts/train_scorer.py)")
    parser.add_argument("--num-candidates", type=int, required=True, help="candidates drawn per image")
    parser.add_argument("--out", default=None, help="folder to write (default: --model itself)")
    args = parser.parse_args(argv)
    pipe = tokenloom.pipeline("text-to-image", model=args.model)
    pipe = type(pipe).from_pipe(pipe, scorer=SCORERS.load(args.scorer), num_candidates=args.num_candidates)
    out = args.out or args.model
    pipe.save_pretrained(out)
    print(f"wrote {out}: best of {args.num_candidates} candidates by {type(pipe.scorer).__name__}")
    return out


if __name__ == "__main__":
    main()
