"""The experiment scripts' arms, as sweep points: valid configs that differ from the base only where the arm says."""

import pytest

from experiments import moe_replication, phrase_tokens, sparse_output, topk_attention
from toyjax import sweep
from toyjax.config import load_config_file


def changed_keys(base, config, prefix=""):
    """Returns {dotted key: new value} wherever two configs differ (a brute-force walk of their dicts)."""
    a, b = (base.to_dict(), config.to_dict()) if not isinstance(base, dict) else (base, config)
    out = {}
    for key in a:
        if isinstance(a[key], dict):
            out.update(changed_keys(a[key], b[key], f"{prefix}{key}."))
        elif a[key] != b[key]:
            out[f"{prefix}{key}"] = b[key]
    return out


def test_moe_arms_keep_the_dense_arms_active_ffn_width_and_change_only_their_own_keys():
    base = load_config_file(moe_replication.CONFIG)
    dense_ff = base.model.d_ff * base.model.moe.top_k  # 256: what the script computes for this config
    names = "dense,4x1,8x1,16x1,8x2,16x2,8x2-noaux,8x1-switch".split(",")
    for name in names:
        arm = moe_replication.parse_arm(name)
        config = sweep.point_config(base, moe_replication.arm_point(arm, dense_ff), seed=5)  # validates it
        assert config.train.seed == 5
        if arm["experts"] == 0:
            assert (config.model.ffn, config.model.d_ff) == ("dense", dense_ff)
            continue
        moe = config.model.moe
        assert config.model.ffn == "moe" and config.model.d_ff * moe.top_k == dense_ff
        assert (moe.n_experts, moe.top_k, moe.router) == (arm["experts"], arm["top_k"], arm["router"])
        aux = [moe.importance_coef, moe.load_coef, moe.balance_coef, moe.z_loss_coef]
        assert (aux == [0.0] * 4) == name.endswith("-noaux") and any(aux) != name.endswith("-noaux")
    assert sweep.point_names([{}] * len(names), [0, 1], names)[-1] == "8x1-switch,seed=1"
    with pytest.raises(SystemExit, match="not divisible by top_k 3"):
        moe_replication.arm_point(moe_replication.parse_arm("8x3"), dense_ff)


@pytest.mark.parametrize("top_k", [None, 1, 4])
def test_topk_arms_change_only_the_attention(top_k):
    base = load_config_file(topk_attention.CONFIG)
    config = sweep.point_config(base, topk_attention.arm_point(top_k), base.train.seed)
    expected = {"model.attention": "dense"} if top_k is None else (
        {"model.attention_top_k": top_k} if top_k != base.model.attention_top_k else {})
    assert changed_keys(base, config) == expected
    assert changed_keys(config, topk_attention.arm_config(base, top_k)) == {}  # the swap at inference uses the same


def test_sparse_output_and_phrase_token_arms_are_valid_and_differ_as_documented():
    base = load_config_file(sparse_output.CONFIG)
    changes = [changed_keys(base, sweep.point_config(base, point, base.train.seed))
               for point in sparse_output.ARMS.values()]
    assert changes == [{}, {"train.loss": "valid_subset"},
                       {"train.loss": "valid_subset", "model.grammar_state_embedding": True}]
    base = load_config_file(phrase_tokens.CONFIG)
    changes = {name: changed_keys(base, sweep.point_config(base, point, base.train.seed))
               for name, point in phrase_tokens.arm_points(base).items()}
    assert changes == {"word": {"tokenizer.kind": "topword", "tokenizer.phrase_vocab_size": 0}, "phrase": {}}
