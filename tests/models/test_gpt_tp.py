"""GPT at TP=2 against TP=1 on 2 gloo ranks: same seed, same full weights, same loss,
same (unsharded) gradients."""
import pytest
import torch

from gemini_lm.models.config import TransformerConfig
from gemini_lm.models.gpt import GPTModel, gather_logits, gpt_forward_step
from gemini_lm.models.hf_gpt2 import full_state_dict, gather_full_tensor, load_full_state_dict
from gemini_lm.parallel.random import model_parallel_seed
from gemini_lm.parallel.state import ParallelState
from tests.dist import run_ranks

pytestmark = pytest.mark.slow   # spawns processes

SEED = 1234


def _config(dropout: float = 0.0) -> TransformerConfig:
    return TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                             max_position_embeddings=32, vocab_size=256, orig_vocab_size=200,
                             hidden_dropout=dropout, attention_dropout=dropout)


def _batch() -> dict:
    return {"tokens": torch.randint(0, 200, (3, 17), generator=torch.Generator().manual_seed(7))}


def _loss_and_grads(model: GPTModel, ps: ParallelState) -> tuple[float, dict]:
    loss, logged = gpt_forward_step(model, _batch())
    loss.backward()
    assert torch.equal(logged["lm loss"], loss.detach())
    grads = {name: gather_full_tensor(p.grad, p, ps) for name, p in model.named_parameters()}
    return loss.item(), grads


def _body(rank, world_size):
    ps_tp2 = ParallelState.initialize(tp_size=2)
    ps_tp1 = ParallelState(rank=0, world_size=1, tp_size=1, tp_rank=0, dp_size=1, dp_rank=0,
                           tp_group=None, dp_group=None, tp_ranks=[0], dp_ranks=[0])
    tracker = model_parallel_seed(SEED, ps_tp1)
    ref = GPTModel(_config(), ps_tp1, tracker)
    ref_loss, ref_grads = _loss_and_grads(ref, ps_tp1)

    tracker = model_parallel_seed(SEED, ps_tp2)
    model = GPTModel(_config(), ps_tp2, tracker)
    qkv = model.transformer.layers[0].self_attention.query_key_value.weight
    assert qkv.shape == (96, 64) and qkv.partition_stride == 3
    # Initialization does not depend on the TP size.
    ref_state, full = ref.state_dict(), full_state_dict(model, ps_tp2)
    init_equal = all(torch.equal(full[name], t) for name, t in ref_state.items())
    loss, grads = _loss_and_grads(model, ps_tp2)
    grad_diff = max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads)

    # Gathered logits equal TP=1 logits, padding masked on the rank that holds it.
    tokens = _batch()["tokens"]
    with torch.no_grad():
        logits = gather_logits(model(tokens), ps_tp2)
        logits_diff = (logits[..., :200] - ref(tokens)[..., :200]).abs().max().item()
    padding_masked = bool(torch.all(logits[..., 200:] == float("-inf")))

    # Sharded load of a full state: rank r keeps its shard, the gathered state is unchanged.
    other = GPTModel(_config(), ps_tp2, tracker)
    load_full_state_dict(other, ref_state, ps_tp2)
    reloaded = full_state_dict(other, ps_tp2)
    load_equal = all(torch.equal(reloaded[n], t) for n, t in ref_state.items())

    # With dropout on, both TP ranks see the same replicated loss.
    tracker = model_parallel_seed(SEED, ps_tp2)
    noisy = GPTModel(_config(dropout=0.1), ps_tp2, tracker).train()
    noisy_loss, _ = gpt_forward_step(noisy, _batch())
    noisy_loss.backward()
    return dict(ref_loss=ref_loss, loss=loss, grad_diff=grad_diff, init_equal=init_equal,
                logits_diff=logits_diff, padding_masked=padding_masked, load_equal=load_equal,
                noisy_loss=noisy_loss.item())


def test_tp2_matches_tp1(tmp_path):
    results = run_ranks(_body, world_size=2, tmp_path=tmp_path)
    for r in results:
        assert r["init_equal"] and r["load_equal"] and r["padding_masked"]
        assert abs(r["loss"] - r["ref_loss"]) <= 1e-5
        assert r["grad_diff"] <= 1e-5
        assert r["logits_diff"] <= 1e-5
    assert results[0]["loss"] == results[1]["loss"]
    assert results[0]["noisy_loss"] == results[1]["noisy_loss"]
    assert results[0]["noisy_loss"] != results[0]["loss"]
