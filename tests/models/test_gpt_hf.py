"""Our GPT against Hugging Face's GPT2LMHeadModel with the same weights, and the weight
mapping between them. Configs are built locally: nothing is downloaded."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gemini_lm.errors import UsageError
from gemini_lm.models.gpt import GPTModel
from gemini_lm.models.hf_gpt2 import (config_from_hf, full_state_dict, gpt_state_to_hf, hf_config,
                                      hf_to_gpt_state, load_full_state_dict)
from gemini_lm.parallel.state import ParallelState

VOCAB = 100  # deliberately not a multiple of 128, so our table has padding rows


def single_rank_state() -> ParallelState:
    return ParallelState(rank=0, world_size=1, tp_size=1, tp_rank=0, dp_size=1, dp_rank=0,
                         tp_group=None, dp_group=None, tp_ranks=[0], dp_ranks=[0])


def make_hf(attn_implementation: str = "eager", seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     attn_implementation=attn_implementation)
    model = GPT2LMHeadModel(cfg)
    assert model.config._attn_implementation == attn_implementation
    with torch.no_grad():  # HF inits biases and LN to constants; randomize so mapping errors show
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def ours_from_hf(hf: GPT2LMHeadModel) -> GPTModel:
    ps = single_rank_state()
    config = config_from_hf(hf.config)
    model = GPTModel(config, ps)
    load_full_state_dict(model, hf_to_gpt_state(hf.state_dict(), config), ps)
    return model.eval()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_logits_and_loss_match_hf(attn_implementation):
    hf = make_hf(attn_implementation)
    ours = ours_from_hf(hf)
    tokens = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = hf(tokens, labels=tokens)
        logits = ours(tokens)
        losses = ours(tokens[:, :-1], labels=tokens[:, 1:])
    assert logits.shape == (3, 17, 128)
    assert (logits[..., :VOCAB] - out.logits).abs().max().item() <= 1e-4
    assert abs(losses.mean().item() - out.loss.item()) <= 1e-5
    # Logits of the vocab padding are masked, so they take no probability mass.
    assert torch.all(logits[..., VOCAB:] == float("-inf"))


def test_gradients_match_hf():
    hf = make_hf()
    ours = ours_from_hf(hf)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    hf(tokens, labels=tokens).loss.backward()
    ours(tokens[:, :-1], labels=tokens[:, 1:]).mean().backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    ours_grads = gpt_state_to_hf({n: p.grad for n, p in ours.named_parameters()},
                                 ours.config, orig_vocab_size=VOCAB)
    for name, grad in hf_grads.items():
        assert torch.allclose(ours_grads[name], grad, atol=1e-5, rtol=1e-4), name


def test_hf_round_trip_is_exact():
    hf = make_hf()
    hf_state = hf.state_dict()
    ours = ours_from_hf(hf)
    back = gpt_state_to_hf(full_state_dict(ours, single_rank_state()), ours.config,
                           orig_vocab_size=VOCAB)
    assert back.keys() == hf_state.keys()
    for name, tensor in hf_state.items():
        assert torch.equal(back[name], tensor), name
    # ...and it loads into a fresh HF model built from the exported config.
    fresh = GPT2LMHeadModel(hf_config(ours.config, VOCAB))
    fresh.load_state_dict(back)
    assert fresh.config.n_layer == 2 and fresh.config.vocab_size == VOCAB


def test_exported_config_names_only_tokens_of_its_vocabulary():
    """GPT2Config's default bos/eos are GPT-2's 50256: outside a smaller vocabulary they name
    no token, and transformers warned about them on every export."""
    config = config_from_hf(make_hf().config)
    exported = hf_config(config, VOCAB)
    ids = {name: getattr(exported, name) for name in exported.to_dict() if name.endswith("_token_id")}
    assert ids and all(i is None or 0 <= i < VOCAB for i in ids.values()), ids
    given = hf_config(config, VOCAB, token_ids={"bos_token_id": 7, "eos_token_id": 7, "pad_token_id": 9})
    assert (given.bos_token_id, given.eos_token_id, given.pad_token_id) == (7, 7, 9)
    gpt2_vocab = hf_config(config, 50257)   # GPT-2's own vocabulary keeps its end-of-text id
    assert gpt2_vocab.bos_token_id == gpt2_vocab.eos_token_id == 50256


def test_mapping_rejects_mismatched_states():
    hf = make_hf()
    config = config_from_hf(hf.config)
    state = dict(hf.state_dict())
    del state["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(UsageError, match="missing"):
        hf_to_gpt_state(state, config)
    untied = dict(hf.state_dict(), **{"lm_head.weight": torch.zeros(VOCAB, 64)})
    with pytest.raises(UsageError, match="tied"):
        hf_to_gpt_state(untied, config)
    full = hf_to_gpt_state(hf.state_dict(), config)
    full["wpe.weight"] = torch.zeros(31, 64)
    with pytest.raises(UsageError, match="wpe.weight"):
        load_full_state_dict(GPTModel(config, single_rank_state()), full, single_rank_state())
