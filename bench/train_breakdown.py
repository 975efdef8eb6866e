"""Where a train step's time goes: toyjax's jitted step per XLA fusion (jax.profiler) next to PyTorch eager's
per aten op (torch.profiler), the same model and optimizer as bench/train_throughput.py.

    python bench/train_breakdown.py                   # config a, 4 profiled steps each
    python bench/train_breakdown.py --configs b --steps 3

toyjax: each fusion/kernel the XLA:CPU runtime ran, named in the trace, is mapped back through the compiled HLO
to the jax op that made it (metadata op_name, e.g. `transpose(jvp(Decoder))/block_0/ffn/up/dot_general`), and
summed per model part and pass (forward = jvp, backward = transpose, optimizer = neither). Times are summed over
XLA's worker threads, so they are CPU time, not wall time; "not in any op" is the step's wall time x threads
minus that sum (scheduling, waiting, idle threads). PyTorch: torch.profiler's self CPU time per aten op, grouped the
same way where the op name says it, and per phase (forward, backward, optimizer) from record_function ranges.
On a shared machine both absolute numbers move; the shares are what the comparison is for.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import tempfile
import time
from pathlib import Path

import jax

import train_throughput as tt

PARTS = (  # (part, pattern on the op_name inside the Decoder), first match wins
    ("logits (tied embed.attend)", r"embed\.attend"),
    ("attention q·k / softmax / ·v", r"attention/(?!qkv|out)"),
    ("attention qkv+out projections", r"attention/(qkv|out)/"),
    ("FFN matmuls", r"ffn/(up|down)/dot_general"),
    ("FFN bias+GELU", r"ffn/"),
    ("LayerNorm", r"ln_"),
    ("embedding gather/scatter", r"(embed|position)"),
)


def classify(op_name: str) -> tuple[str, str]:
    """Returns (pass, part) for an HLO op_name from the train step."""
    name = op_name.removeprefix("jit(train_step)/")
    phase = "backward" if name.startswith("transpose(") else "forward" if name.startswith("jvp(") else "optimizer"
    if phase == "optimizer":
        return phase, "optimizer (clip + AdamW) and metrics"
    if "Decoder" not in name.split("/")[0]:
        return phase, "loss (softmax cross-entropy, accuracy)"
    for part, pattern in PARTS:
        if re.search(pattern, name):
            return phase, part
    return phase, "other in the model (residual adds, dropout)"


def op_names(hlo_text: str) -> dict[str, str]:
    """Returns instruction name -> op_name metadata for every instruction in compiled HLO text."""
    found = {}
    for match in re.finditer(r"%([\w.\-]+) = [^\n]*?metadata=\{op_name=\"([^\"]*)\"", hlo_text):
        found.setdefault(match.group(1), match.group(2))
    return found


def profile_jax(runner, steps: int) -> tuple[collections.Counter, float]:
    """Returns (seconds per (pass, part) per step summed over threads, wall seconds per step)."""
    batch = runner.batches[0]
    compiled = runner.step.lower(runner.params, runner.opt_state, batch, runner.keys[0]).compile()
    names = op_names(compiled.as_text())
    runner.run(2)
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            runner.run(steps)
        wall = (time.perf_counter() - start) / steps
        trace = json.load(gzip.open(next(Path(directory).rglob("perfetto_trace.json.gz"))))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event["name"] in names:
            totals[classify(names[event["name"]])] += event["dur"] / 1e6 / steps
    return totals, wall


TORCH_PARTS = (
    ("logits / loss", r"cross_entropy|log_softmax|nll_loss|_log_softmax"),
    ("attention (SDPA)", r"scaled_dot_product|_flash_attention|_efficient_attention|softmax|baddbmm|bmm"),
    ("matmuls (Linear)", r"addmm|\bmm\b|aten::mm|aten::linear|matmul"),
    ("LayerNorm", r"layer_norm"),
    ("GELU", r"gelu"),
    ("embedding gather/scatter", r"embedding"),
    ("optimizer (clip + AdamW)", r"_foreach|adamw|clip|norm"),
)


def profile_torch(runner, steps: int) -> tuple[collections.Counter, collections.Counter, float]:
    """Returns (self CPU seconds per part per step, seconds per phase per step, wall seconds per step)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    runner.run(2)
    model, optimizer = runner.model, runner.optimizer
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for i in range(steps):
            batch = runner.batches[i % len(runner.batches)]
            with record_function("phase:forward"):
                loss = model(batch["inputs"], batch["targets"])
            optimizer.zero_grad(set_to_none=True)
            with record_function("phase:backward"):
                loss.backward()
            with record_function("phase:optimizer"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), runner.grad_clip)
                optimizer.step()
                runner.scheduler.step()
        wall = (time.perf_counter() - start) / steps
    parts, phases = collections.Counter(), collections.Counter()
    for item in prof.key_averages():
        seconds = item.self_cpu_time_total / 1e6 / steps
        if item.key.startswith("phase:"):
            phases[item.key.removeprefix("phase:")] = item.cpu_time_total / 1e6 / steps
            continue
        part = next((p for p, pattern in TORCH_PARTS if re.search(pattern, item.key)), "other")
        parts[part] += seconds
    return parts, phases, wall


def report(name: str, args) -> None:
    cfg, _ = tt.make_config(name, "dense")
    batches = tt.synthetic_batches(cfg, 4)
    jax_runner = tt.JaxRunner(cfg, batches)
    torch_runner = tt.TorchRunner(cfg, batches, jax_runner.initial_params)
    jax_totals, jax_wall = profile_jax(jax_runner, args.steps)
    torch_parts, torch_phases, torch_wall = profile_torch(torch_runner, args.steps)
    print(f"\nconfig {name}: toyjax {jax_wall * 1e3:.0f} ms/step wall (profiled), torch eager {torch_wall * 1e3:.0f} ms")
    jax_sum = sum(jax_totals.values())
    by_part = collections.Counter()
    for (_, part), seconds in jax_totals.items():
        by_part[part] += seconds
    print(f"  toyjax per part, ms CPU per step (summed over threads; {jax_sum * 1e3:.0f} ms in ops):")
    print(f"    {'part':42s} {'fwd':>7s} {'bwd':>7s} {'opt':>7s} {'total':>7s} {'share':>6s}")
    for part, total in by_part.most_common():
        cells = [jax_totals.get((phase, part), 0.0) * 1e3 for phase in ("forward", "backward", "optimizer")]
        print(f"    {part:42s} " + " ".join(f"{c:7.1f}" for c in cells) + f" {total * 1e3:7.1f} {total / jax_sum:6.1%}")
    torch_sum = sum(torch_parts.values())
    print(f"  torch eager per aten op group, ms self CPU per step ({torch_sum * 1e3:.0f} ms in ops); phases: "
          + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in torch_phases.items()))
    for part, total in torch_parts.most_common():
        print(f"    {part:42s} {total * 1e3:7.1f} {total / torch_sum:6.1%}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="a", help="comma-separated subset of: " + ",".join(tt.CONFIGS))
    parser.add_argument("--steps", type=int, default=4, help="profiled steps per framework")
    args = parser.parse_args(argv)
    for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
        if name not in tt.CONFIGS:
            parser.error(f"unknown config {name!r}; choose from {sorted(tt.CONFIGS)}")
        report(name, args)


if __name__ == "__main__":
    main()
