"""The one entry point: python launch.py <command> ...

  train       --config experiments/configs/NAME.py --workdir DIR [--config.model.d_model=256 ...]
              [--coordinator HOST:PORT --num-processes N --process-id I]   one of N processes (toyjax.sharding)
  quickstart  [--workdir DIR] [--config.KEY=VALUE ...]     the main job on the embedded corpus
  sample      WORKDIR [--prompt TEXT] [--n 4] [--temperature 0.8] [--top-k K] [--top-p P] [--greedy] [--free]
  inspect     WORKDIR [--samples 3] [--step N]
  bert-adapt  --config experiments/configs/bert_adapt.py --workdir DIR [--config.bert_adapt.mask_rate=0.25 ...]
                                                           MLM-adapt a BERT, writes DIR/hf
  compare     RUN_A RUN_B [RUN_C ...] --out DIR [--text FILE] [--n-examples 200] [--n-probes 100]
  sweep       --config FILE --workdir DIR --grid model.d_model=64,128 [KEY=V,V ...] [--zip] [--seeds 0,1,2]
              [--metric ppl] [--config.KEY=VALUE ...]   a run per point and seed; DIR/results.csv, .md, plots
  fuzz        RUN [RUN ...] --bert DIR --out DIR [--budget 100 --n-probes 10 --max-edits 3 --seed 0]
  interp      RUN --text TEXT [--corrupted TEXT --answer WORD --wrong WORD] --out DIR
                                                           attention, routing, logit lens, DLA, patching
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
QUICKSTART = ROOT / "experiments" / "configs" / "quickstart.py"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors end in one line starting with 'error:' (exit status 2)."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {self.prog}: {message}\n")


def _config(path: str | Path, overrides: list[str]):
    from toyjax import config as config_lib

    return config_lib.apply_overrides(config_lib.load_config_file(path), overrides)


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    overrides = [a for a in argv if a.startswith("--config.")]
    return [a for a in argv if not a.startswith("--config.")], overrides


def cmd_train(argv: list[str]) -> None:
    rest, overrides = _split_overrides(argv)
    parser = _Parser(prog="launch.py train")
    parser.add_argument("--config", required=True, help="a config file, e.g. experiments/configs/quickstart.py")
    parser.add_argument("--workdir", required=True, help="where checkpoints, metrics and samples go (resumes if present)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--coordinator", help="multi-process: HOST:PORT of process 0 (default $JAX_COORDINATOR_ADDRESS)")
    parser.add_argument("--num-processes", type=int, help="multi-process: how many (default $JAX_NUM_PROCESSES)")
    parser.add_argument("--process-id", type=int, help="multi-process: this one's rank (default $JAX_PROCESS_ID)")
    args = parser.parse_args(rest)
    cfg = _config(args.config, overrides)  # before the trainer, optax and orbax: a bad config is reported at once
    from toyjax import sharding, train

    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    train.run(cfg, args.workdir, quiet=args.quiet)


def cmd_quickstart(argv: list[str]) -> None:
    rest, overrides = _split_overrides(argv)
    parser = _Parser(prog="launch.py quickstart")
    parser.add_argument("--workdir", default="runs/quickstart")
    args = parser.parse_args(rest)
    cfg = _config(QUICKSTART, overrides)
    from toyjax import train

    result = train.run(cfg, args.workdir)
    print(f"quickstart: valid perplexity {result['ppl']:.3f}, accuracy {result['accuracy']:.3f}; "
          f"checkpoint, metrics.jsonl, samples.txt and loss.png are in {args.workdir}")


def cmd_sample(argv: list[str]) -> None:
    parser = _Parser(prog="launch.py sample")
    parser.add_argument("workdir")
    parser.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--length", type=int, default=0, help="total tokens, prompt included (default: model.max_len)")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--free", action="store_true", help="on a grammar run, sample without the grammar constraint")
    args = parser.parse_args(argv)
    import jax

    from toyjax import load_run
    from toyjax.data.run_data import run_grammar
    from toyjax.sample import check_sampling_settings, cut_at_eos, sample

    check_sampling_settings(n=args.n, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    run = load_run(args.workdir, args.step)
    prompt = [run.tokenizer.eos_id] + run.tokenizer.encode(args.prompt)
    grammar = run_grammar(run.config, run.tokenizer)
    prompt_states = None
    if grammar is not None:
        from toyjax.grammar import annotate

        # The prompt's <eos> opens a document: the states after it come from the rest of the prompt.
        prompt_states = [grammar.start] + annotate(grammar, prompt[1:], run.tokenizer.vocab).tolist()
    tokens = sample(run.model, run.params, prompt, n=args.n, length=args.length or None, key=jax.random.key(args.seed),
                    greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    grammar=grammar, constrain=not args.free, prompt_states=prompt_states)
    for row in cut_at_eos(tokens, run.tokenizer.eos_id, skip=1):
        print(run.tokenizer.decode(row), end="\n\n")


def cmd_inspect(argv: list[str]) -> None:
    parser = _Parser(prog="launch.py inspect")
    parser.add_argument("workdir")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--step", type=int, default=None)
    args = parser.parse_args(argv)
    from toyjax.report import describe_run

    print(describe_run(args.workdir, n_samples=args.samples, step=args.step))


def cmd_bert_adapt(argv: list[str]) -> None:
    rest, overrides = _split_overrides(argv)
    parser = argparse.ArgumentParser(prog="launch.py bert-adapt")
    parser.add_argument("--config", required=True, help="a config file, e.g. experiments/configs/bert_adapt.py")
    parser.add_argument("--workdir", required=True, help="where checkpoints, metrics and DIR/hf go (resumes if present)")
    args = parser.parse_args(rest)
    cfg = _config(args.config, overrides)
    from toyjax.bert import adapt

    adapt.run(cfg, args.workdir)


def cmd_compare(argv: list[str]) -> None:
    from toyjax import compare

    compare.main(argv)


def cmd_sweep(argv: list[str]) -> None:
    rest, overrides = _split_overrides(argv)
    parser = argparse.ArgumentParser(prog="launch.py sweep")
    parser.add_argument("--config", required=True, help="the base config file (--config.KEY=V applies to every point)")
    parser.add_argument("--workdir", required=True, help="the sweep folder (a sub-workdir per point; resumes)")
    parser.add_argument("--grid", nargs="+", required=True, help="KEY=V1,V2,... items, e.g. model.d_model=64,128")
    parser.add_argument("--zip", action="store_true", help="pair the i-th values of the keys, not a cross product")
    parser.add_argument("--seeds", default="", help="comma-separated train.seed values (default: the config's)")
    parser.add_argument("--metric", default="ppl", help="the metric to plot (loss, ppl, accuracy, ...)")
    parser.add_argument("--quiet", action="store_true", help="no per-run progress bars or logs")
    args = parser.parse_args(rest)
    base = _config(args.config, overrides)
    from toyjax import sweep

    points = sweep.expand_points(sweep.parse_grid(args.grid, base), paired=args.zip)
    seeds = sweep.parse_seeds(args.seeds) if args.seeds else [base.train.seed]
    sweep.run_sweep(base, points, args.workdir, seeds=seeds, metric=args.metric, quiet=args.quiet)


def cmd_fuzz(argv: list[str]) -> None:
    from toyjax import fuzz_report

    fuzz_report.main(argv)


def cmd_interp(argv: list[str]) -> None:
    from toyjax.interp import report

    report.main(argv)


COMMANDS = {"train": cmd_train, "quickstart": cmd_quickstart, "sample": cmd_sample, "inspect": cmd_inspect,
            "bert-adapt": cmd_bert_adapt, "compare": cmd_compare, "sweep": cmd_sweep, "fuzz": cmd_fuzz,
            "interp": cmd_interp}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        print(f"error: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from toyjax.cli import run_reporting_errors

    return run_reporting_errors(COMMANDS[argv[0]], argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
