"""Benchmarks: speed and memory as ratios measured in one run (tests never time anything).

    python bench.py models      # our ViT-L/16, RoBERTa-large, GPT2-medium vs transformers (forward)
    python bench.py routing     # routed LoRA layers vs plain LoRA vs peft (forward + backward)
    python bench.py eval        # CIDEr-D vs pycocoevalcap; VQA accuracy over 200k questions

Needs the dev requirements (transformers, peft, pycocoevalcap). Runs on 2 threads unless told otherwise.
"""
import argparse
import statistics
import time

import torch


def median_seconds(fn, repeat=5, warmup=1):
    """Median wall time of fn() over `repeat` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def print_table(header, rows):
    """Print a Markdown table (header: list of column names, rows: lists of cells)."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in row) + " |")


# ---- models (issue 2) -------------------------------------------------------


# ---- routing (issue 3) ------------------------------------------------------


# ---- eval (issue 4) ---------------------------------------------------------


BENCHES = {}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", choices=sorted(BENCHES))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    BENCHES[args.bench]()


if __name__ == "__main__":
    main()
