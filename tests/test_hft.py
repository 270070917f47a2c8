"""HFT: half of each block's matrices train, exactly the reported fraction; stages re-select."""

from __future__ import annotations

import torch

from slimtune.memory import optimizer_state_bytes
from slimtune.methods.base import PrepareContext
from slimtune.methods.params.hft import HalfFineTuning
from slimtune.models import tiny_llama, tiny_tokenizer


def setup(n_layers=6, reselect_every=0):
    torch.manual_seed(0)
    model = tiny_llama(num_hidden_layers=n_layers)
    method = HalfFineTuning(HalfFineTuning.Config(reselect_every=reselect_every))
    model = method.prepare(model, PrepareContext(tiny_tokenizer(), work_dir=None, seed=1))
    return model, method


def test_hft_freezes_the_stated_half():
    model, method = setup()
    layers = model.model.layers
    ffn_counts = []
    for block in layers:
        attn = [block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj]
        attn.append(block.self_attn.o_proj)
        assert sum(m.weight.requires_grad for m in attn) == 2
        ffn = [block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj]
        ffn_counts.append(sum(m.weight.requires_grad for m in ffn))
    assert sorted(ffn_counts) == [1, 1, 1, 2, 2, 2]  # half the blocks 1 of 3, half 2 of 3
    # nothing outside the block matrices trains
    for name, p in model.named_parameters():
        if "norm" in name or "embed" in name or "lm_head" in name:
            assert not p.requires_grad, name
    # the reported fraction is exactly what trains
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in method._candidates())
    assert method.fraction == trainable / total
    assert 0.4 < method.fraction < 0.6


def test_hft_stages_reselect_and_drop_stale_state():
    model, method = setup(reselect_every=2)
    opt = torch.optim.AdamW(method.param_groups(model, 0.0), lr=1e-2)
    selections = []
    for s in range(6):
        method.on_step_start(model, s, opt)
        ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(s))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert all(p.requires_grad for p in opt.state)  # no state for frozen matrices
        selections.append(method.chosen)
    assert selections[0] == selections[1] and selections[2] == selections[3]
    assert selections[0] != selections[2]
    assert optimizer_state_bytes(opt) > 0
