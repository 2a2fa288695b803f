"""Fast vs reference evaluator: time per greedy step, same decisions.

Both evaluators score the same candidates of the same steps on the same supernet and
search split; their order alternates every step so drifting machine load hits both
alike. Each step asserts that both pick the same unit, then advances with it.

    python benchmarks/search_speed.py [--model mobilenet_v2_cifar] [--images 256] [--steps 4]
                                      [--checkpoint CKPT] [--bn recal]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import print_table, write_csv
from hwslim.checkpoint import Checkpoint, load_checkpoint
from hwslim.data import search_split, synthetic_data_info
from hwslim.evaluator import StepEvaluator
from hwslim.models import create_model


def pick(current_acc: float, candidates, scores):
    return min(range(len(candidates)), key=lambda j: (current_acc - scores[j].acc, scores[j].loss, j))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenet_v2_cifar")
    ap.add_argument("--width-mult", type=float, default=1.0)
    ap.add_argument("--checkpoint", help="a trained supernet (default: a fresh one on synthetic data)")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--bn", default="recal", choices=["recal", "batch"])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
    else:
        torch.manual_seed(0)
        ckpt = Checkpoint(create_model(args.model, width_mult=args.width_mult),
                          data=synthetic_data_info(num_train=4 * args.images, num_search=args.images))
    net = ckpt.model
    x, y = search_split(ckpt, max_images=args.images)
    evs = {m: StepEvaluator(net, x, y, bn=args.bn, mode=m, batch_size=args.batch_size) for m in ("fast", "reference")}
    current = net.full_config()
    acc = evs["reference"].score(current).acc
    rows = []
    for step in range(1, args.steps + 1):
        cands = [(u, current.replace(**{u: unit.narrower(current.widths[u])}))
                 for u, unit in net.units.items() if unit.narrower(current.widths[u]) is not None]
        times, choice = {}, {}
        for mode in (("fast", "reference") if step % 2 else ("reference", "fast")):
            t0 = time.perf_counter()
            scores = evs[mode].score_candidates(current, cands)
            times[mode] = time.perf_counter() - t0
            choice[mode] = (j := pick(acc, cands, scores)), scores[j]
        same = choice["fast"][0] == choice["reference"][0]
        j, s = choice["reference"]
        rows.append({"step": step, "candidates": len(cands), "unit": cands[j][0], "fast_s": times["fast"],
                     "reference_s": times["reference"], "speedup": times["reference"] / times["fast"],
                     "same_decision": same})
        print_table(rows[-1:])
        if not same:
            raise SystemExit(f"step {step}: fast chose {cands[choice['fast'][0]][0]}, reference {cands[j][0]}")
        current, acc = cands[j][1], s.acc
    med = statistics.median(r["speedup"] for r in rows)
    summary = {"step": "median", "candidates": "", "unit": "", "fast_s": statistics.median(r["fast_s"] for r in rows),
               "reference_s": statistics.median(r["reference_s"] for r in rows), "speedup": med,
               "same_decision": all(r["same_decision"] for r in rows)}
    common = {"model": f"{net.name}@{net.width_mult:g}", "images": len(y), "bn": args.bn, "threads": args.threads}
    print()
    print_table(rows + [summary])
    path = write_csv([{**common, **r} for r in rows + [summary]], f"search_speed_{net.name}_{args.bn}")
    print(f"\nmedian speedup per greedy step: {med:.2f}x  (written to {path})")


if __name__ == "__main__":
    main()
