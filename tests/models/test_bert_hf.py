"""Our BERT against Hugging Face's BertForPreTraining with the same weights, and the weight
mapping between them. Configs are built locally: nothing is downloaded."""
import pytest
import torch
from transformers import BertConfig, BertForPreTraining

from gemini_lm.errors import UsageError
from gemini_lm.models.bert import BertModel, bert_forward_step
from gemini_lm.models.hf_bert import bert_state_to_hf, config_from_hf, hf_config, hf_to_bert_state
from gemini_lm.models.hf_gpt2 import full_state_dict, load_full_state_dict
from tests.models.test_gpt_hf import single_rank_state

VOCAB = 100  # not a multiple of 128: our table has padding rows


def make_hf(attn_implementation: str = "eager", seed: int = 0) -> BertForPreTraining:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, attn_implementation=attn_implementation)
    model = BertForPreTraining(cfg)
    with torch.no_grad():  # HF inits biases and LN to constants; randomize so mapping errors show
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def ours_from_hf(hf: BertForPreTraining) -> BertModel:
    ps = single_rank_state()
    config = config_from_hf(hf.config)
    model = BertModel(config, ps)
    load_full_state_dict(model, hf_to_bert_state(hf.state_dict(), config), ps)
    return model.eval()


def _batch(seed: int = 1, b: int = 3, s: int = 19):
    g = torch.Generator().manual_seed(seed)
    # Id 0 is HF's pad_token_id, whose embedding HF freezes (padding_idx): keep it out.
    tokens = torch.randint(1, VOCAB, (b, s), generator=g)
    tokentypes = (torch.arange(s) >= s // 2).long().expand(b, s).contiguous()
    padding = torch.ones(b, s, dtype=torch.long)
    padding[1, 13:] = 0   # padded samples: the mask must match HF's attention_mask
    padding[2, 7:] = 0
    return tokens, tokentypes, padding


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_mlm_and_nsp_logits_match_hf(attn_implementation):
    hf = make_hf(attn_implementation)
    ours = ours_from_hf(hf)
    tokens, tokentypes, padding = _batch()
    with torch.no_grad():
        out = hf(input_ids=tokens, token_type_ids=tokentypes, attention_mask=padding)
        logits, nsp = ours(tokens, padding, tokentypes)
    assert logits.shape == (3, 19, 128)
    real = padding.bool()   # HF's outputs at padding positions are as arbitrary as ours
    diff = (logits[..., :VOCAB] - out.prediction_logits)[real].abs().max().item()
    assert diff <= 1e-4, diff
    assert (nsp - out.seq_relationship_logits).abs().max().item() <= 1e-4
    assert torch.all(logits[..., VOCAB:] == float("-inf"))


def test_pretraining_loss_and_gradients_match_hf():
    hf = make_hf()
    ours = ours_from_hf(hf)
    tokens, tokentypes, padding = _batch(seed=2)
    loss_mask = (torch.rand(tokens.shape, generator=torch.Generator().manual_seed(3)) < 0.3) & padding.bool()
    labels = torch.where(loss_mask, tokens, torch.full_like(tokens, -1))
    is_random = torch.tensor([0, 1, 1])
    out = hf(input_ids=tokens, token_type_ids=tokentypes, attention_mask=padding,
             labels=labels.masked_fill(~loss_mask, -100), next_sentence_label=is_random)
    out.loss.backward()
    batch = {"tokens": tokens, "tokentype_ids": tokentypes, "padding_mask": padding, "labels": labels,
             "loss_mask": loss_mask.long(), "is_random": is_random}
    loss, stats = bert_forward_step(ours, batch)
    loss.backward()
    assert abs(loss.item() - out.loss.item()) <= 1e-5
    assert set(stats) == {"lm loss", "nsp loss"}
    ours_grads = bert_state_to_hf({n: p.grad for n, p in ours.named_parameters()}, ours.config, VOCAB)
    for name, p in hf.named_parameters():
        assert torch.allclose(ours_grads[name], p.grad, atol=1e-5, rtol=1e-4), name


def test_hf_round_trip_is_exact():
    hf = make_hf()
    hf_state = hf.state_dict()
    ours = ours_from_hf(hf)
    back = bert_state_to_hf(full_state_dict(ours, single_rank_state()), ours.config)
    assert back.keys() == hf_state.keys()
    for name, tensor in hf_state.items():
        assert torch.equal(back[name], tensor), name
    fresh = BertForPreTraining(hf_config(ours.config))
    fresh.load_state_dict(back)
    assert fresh.config.vocab_size == VOCAB and fresh.config.layer_norm_eps == hf.config.layer_norm_eps


def test_mapping_rejects_mismatched_states():
    hf = make_hf()
    config = config_from_hf(hf.config)
    state = dict(hf.state_dict())
    del state["bert.encoder.layer.1.attention.self.key.bias"]
    with pytest.raises(UsageError, match="missing"):
        hf_to_bert_state(state, config)
    untied = dict(hf.state_dict(), **{"cls.predictions.decoder.weight": torch.zeros(VOCAB, 64)})
    with pytest.raises(UsageError, match="tied"):
        hf_to_bert_state(untied, config)
    with pytest.raises(UsageError, match="type_vocab_size"):
        config_from_hf(BertConfig(type_vocab_size=3))
