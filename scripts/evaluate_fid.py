"""FID (clean-fid) of a folder of generated images against a reference folder or ``.npz`` statistics.

    python scripts/evaluate_fid.py GENERATED REFERENCE --features shapes --weights runs/fe-shapes \\
        [--is] [--pr] [--json fid.json] [--save-ref-stats ref.npz]

REFERENCE is an image folder or an ADM-style ``.npz`` (``mu``, ``sigma``). ``--features``:
``shapes``/``digits`` (the built-in CNN; ``--weights`` is its save_pretrained folder or
safetensors file from ``scripts/train_feature_extractor.py``) or ``inception`` (``--weights`` is
a local ``inception-2015-12-05.pt`` TorchScript or ``pt_inception-2015-12-05-*.pth`` state dict;
nothing is downloaded). Every number is printed with the implementation and feature extractor
that made it. ``--is`` adds the Inception Score of GENERATED (the extractor's classifier);
``--pr`` adds precision/recall (k-NN manifolds; needs a reference folder). ``--json`` writes all
results; ``--save-ref-stats`` writes the reference folder's statistics for later runs.
"""

import argparse
import dataclasses
import json
from pathlib import Path

from tokenloom.evaluation.features import FEATURE_KINDS, extract_folder, load_feature_extractor
from tokenloom.evaluation.fid import FeatureStats, compute_fid
from tokenloom.evaluation.inception_score import inception_score
from tokenloom.evaluation.precision_recall import precision_recall


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("generated", help="folder of generated images")
    parser.add_argument("reference", help="folder of reference images or an .npz with mu and sigma")
    parser.add_argument("--features", required=True, choices=FEATURE_KINDS)
    parser.add_argument("--weights", required=True, help="local weights of the feature extractor")
    parser.add_argument(
        "--is", dest="inception_score", action="store_true", help="also compute the Inception Score"
    )
    parser.add_argument("--splits", type=int, default=10, help="Inception Score splits")
    parser.add_argument(
        "--pr", action="store_true", help="also compute precision/recall (reference folder only)"
    )
    parser.add_argument("--k", type=int, default=3, help="neighbours for precision/recall manifolds")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument(
        "--save-ref-stats", default=None, help="write the reference folder's statistics (.npz)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    ref_is_stats = Path(args.reference).suffix == ".npz"
    if args.pr and ref_is_stats:
        parser.error("--pr needs reference images (a folder), not statistics")
    if args.save_ref_stats and ref_is_stats:
        parser.error("--save-ref-stats needs a reference folder")

    extractor = load_feature_extractor(args.features, args.weights)
    kw = dict(
        batch_size=args.batch_size, num_workers=args.num_workers, device=args.device, verbose=not args.quiet
    )
    gen_feats, gen_logits = extract_folder(args.generated, extractor, with_logits=args.inception_score, **kw)
    gen_stats = FeatureStats.from_features(gen_feats, extractor.name)
    if ref_is_stats:
        ref_stats, ref_feats = args.reference, None
    else:
        ref_feats, _ = extract_folder(args.reference, extractor, **kw)
        ref_stats = FeatureStats.from_features(ref_feats, extractor.name)
        if args.save_ref_stats:
            ref_stats.save(args.save_ref_stats)
    fid = compute_fid(gen_stats, ref_stats, extractor, **kw)
    fid = dataclasses.replace(fid, reference=args.reference)
    results = {"generated": args.generated, "reference": args.reference, "fid": fid.to_dict()}
    print(fid)
    if args.inception_score:
        score = inception_score(gen_logits, splits=args.splits, classifier=extractor.name)
        results["inception_score"] = score.to_dict()
        print(score)
    if args.pr:
        pr = precision_recall(gen_feats, ref_feats, k=args.k, features=extractor.name)
        results["precision_recall"] = pr.to_dict()
        print(pr)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
