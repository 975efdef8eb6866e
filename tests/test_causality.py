"""Causality of every registered decoder part: a position's logits depend only on earlier tokens of its own row.

Every attention kind and feed-forward kind in toyjax.models.registry is covered (the kind modules are imported
first, so a newly registered kind is tested automatically), and the MoE kind also for each router × dispatch with
a capacity factor that really drops tokens, since capacity is where a leak would come from.
"""

import dataclasses
import functools
import importlib
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import toyjax.models
from toyjax.config import ModelConfig, MoEConfig
from toyjax.models import registry
from toyjax.models.decoder import Decoder

for _module in pkgutil.iter_modules(toyjax.models.__path__):  # registering happens on import
    importlib.import_module(f"toyjax.models.{_module.name}")

VOCAB, BATCH, LENGTH = 40, 4, 24
CUTS = (0, 6, 13, 20)  # change every token after position t, check positions <= t


def tiny_config(**overrides) -> ModelConfig:
    # Untied embeddings make the logits O(1), so the 1e-6 tolerance is tight relative to them.
    base = dict(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_len=LENGTH,
                tie_embeddings=False, attention_top_k=4, moe=MoEConfig(n_experts=4))
    return ModelConfig(**{**base, **overrides})


def dropping_moe(router: str, dispatch: str, **moe) -> ModelConfig:
    # 4 experts, top-2, factor 0.5: 6 slots per expert and row for 48 assignments, so at least half are dropped.
    return tiny_config(ffn="moe", moe=MoEConfig(n_experts=4, top_k=2, router=router, dispatch=dispatch,
                                                capacity_factor=0.5, **moe))


CASES = {f"attention={kind}": tiny_config(attention=kind) for kind in sorted(registry.ATTENTION)}
CASES |= {f"ffn={kind}": tiny_config(ffn=kind) for kind in sorted(registry.FFN)}
CASES |= {f"moe-{router}-{dispatch}-dropping": dropping_moe(router, dispatch)
          for router in ("noisy_topk", "switch") for dispatch in ("einsum", "sort")}


@functools.lru_cache(maxsize=None)  # one compiled function per config and mode, shared by the tests
def forward(cfg: ModelConfig, *, training: bool):
    """Returns a jitted fn(params, tokens) -> (logits, dropped fraction of MoE assignments or None)."""
    model = Decoder(cfg)

    @jax.jit
    def run(params, tokens):
        rngs = {"noise": jax.random.key(7), "dropout": jax.random.key(8)} if training else None
        logits, state = model.apply({"params": params}, tokens, deterministic=not training, rngs=rngs,
                                    mutable=["metrics"])
        dropped = [v for path, v in jax.tree_util.tree_leaves_with_path(state)
                   if "moe_dropped_fraction" in jax.tree_util.keystr(path)]
        return logits, jnp.max(jnp.stack(dropped)) if dropped else None

    return run


def init_params(cfg: ModelConfig, tokens):
    return Decoder(cfg).init(jax.random.key(1), tokens)["params"]


def random_tokens(seed: int, batch: int = BATCH):
    return jax.random.randint(jax.random.key(seed), (batch, LENGTH), 0, VOCAB)


def assert_drops_if_dropping(name: str, dropped) -> None:
    if name.endswith("-dropping"):  # the MoE cases must really drop tokens, or capacity is not being tested
        assert dropped is not None and float(dropped) > 0.2, (name, dropped)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_later_tokens_do_not_change_earlier_logits(name, training):
    # In training, dropout and router noise are drawn per position of a [batch, length] array: the same rngs and
    # batch shape give every position the same draws in both runs, so only the tokens differ.
    cfg = CASES[name]
    if training:
        cfg = dataclasses.replace(cfg, dropout=0.1)
    run, tokens = forward(cfg, training=training), random_tokens(0)
    params = init_params(cfg, tokens)
    logits, dropped = run(params, tokens)
    assert_drops_if_dropping(name, dropped)
    for t in CUTS:
        later = random_tokens(100 + t)
        changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 1 + later[:, t + 1 :] % (VOCAB - 1)) % VOCAB)
        assert not np.any(np.asarray(changed[:, t + 1 :] == tokens[:, t + 1 :]))
        changed_logits, _ = run(params, changed)
        np.testing.assert_allclose(changed_logits[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-6,
                                   err_msg=f"{name}: logits at positions <= {t} changed with later tokens")
        assert np.abs(np.asarray(changed_logits[:, t + 1 :] - logits[:, t + 1 :])).max() > 1e-3  # the change shows


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_row_does_not_depend_on_the_other_rows(name, training):
    # In training the router noise and dropout masks are drawn for the whole [batch, length] array, so a row alone
    # would get different draws than in the batch: here training runs without them (noise off, dropout 0). The
    # training code path (capacity, dispatch) is still the one exercised. Tolerance: a batch of 1 and of 4 compile
    # to different matmul blockings, which round O(1) logits differently by ~1e-6; the leak this guards against
    # (GShard capacity over the batch) moved them by 0.07-0.21.
    cfg = CASES[name]
    if training and cfg.ffn == "moe":
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, noise=False))
    run, tokens = forward(cfg, training=training), random_tokens(1)
    params = init_params(cfg, tokens)
    batch_logits, dropped = run(params, tokens)
    assert_drops_if_dropping(name, dropped)
    for row in (0, BATCH - 1):
        alone, _ = run(params, tokens[row : row + 1])
        np.testing.assert_allclose(alone[0], batch_logits[row], rtol=0, atol=1e-5,
                                   err_msg=f"{name}: row {row} alone differs from row {row} in a batch of {BATCH}")
