"""Fuzz the three models of the comparison experiment (dense, top-k, MoE) and say where each breaks first.

    python experiments/fuzz_three_models.py --bert runs/bert_adapt/hf \
        [runs/three_models/dense runs/three_models/topk runs/three_models/moe] [--out runs/fuzz_three_models]

Needs the three runs of experiments/three_models.py and a BERT folder with an MLM head
(python launch.py bert-adapt --config experiments/configs/bert_adapt.py --workdir runs/bert_adapt).
Settings: 8 probes per family, budget 60 queries per attack, up to 3 edits, beam 3, 3 MLM candidates per slot,
all four oracles; sized for <= 20 minutes on a 2-core CPU.
Expect (2026-12-01, shared 2-core CPU, BERT adapted for 119 steps): 9 min 18 s; 14 minimal breaks, all confirmed
from scratch; each model breaks first at one edit, a consistent renaming on an owner probe (dense Zoe -> Mia, top-k
Amy -> Lily, MoE Lucy -> Lily); substitution success 0.30 / 0.18 / 0.07 (dense / top-k / MoE); invariance broke
only dense, once. Details: docs/experiments/three_models.md#fuzzing-the-three-models.
"""

from __future__ import annotations

import argparse
import sys

from toyjax import fuzz_report
from toyjax.cli import run_reporting_errors

DEFAULT_RUNS = ["runs/three_models/dense", "runs/three_models/topk", "runs/three_models/moe"]
SETTINGS = ["--n-probes", "8", "--budget", "60", "--max-edits", "3", "--beam-width", "3", "--candidates", "3"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", default=DEFAULT_RUNS)
    parser.add_argument("--bert", default=None, help="BERT folder with an MLM head (default: $TOYJAX_BERT)")
    parser.add_argument("--out", default="runs/fuzz_three_models")
    args = parser.parse_args(argv)
    return run_reporting_errors(fuzz_report.main, [*(args.runs or DEFAULT_RUNS), "--out", args.out, *SETTINGS]
                                + (["--bert", args.bert] if args.bert else []))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
