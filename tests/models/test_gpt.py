"""GPTModel and the shared transformer blocks in one process (TP=1)."""
import math

import pytest
import torch

from gemini_lm.errors import UsageError
from gemini_lm.models.config import MODEL_PRESETS, TransformerConfig, pad_vocab_size
from gemini_lm.models.gpt import GPTModel, gpt_forward_step
from gemini_lm.models.transformer import ParallelTransformer
from gemini_lm.parallel.random import model_parallel_seed
from gemini_lm.parallel.state import ParallelState


def single_rank_state() -> ParallelState:
    return ParallelState(rank=0, world_size=1, tp_size=1, tp_rank=0, dp_size=1, dp_rank=0,
                         tp_group=None, dp_group=None, tp_ranks=[0], dp_ranks=[0])


def small_config(**overrides) -> TransformerConfig:
    return TransformerConfig(**{**dict(num_layers=2, hidden_size=64, num_attention_heads=4,
                                       max_position_embeddings=32, vocab_size=128), **overrides})


def test_pad_vocab_size():
    assert pad_vocab_size(50257) == 50304
    assert pad_vocab_size(50257, 128, tp_size=2) == 50432
    assert pad_vocab_size(256, 128, tp_size=2) == 256
    with pytest.raises(UsageError):
        pad_vocab_size(0)


@pytest.mark.parametrize("overrides, tp_size, message", [
    (dict(num_attention_heads=3, hidden_size=63), 2, "attention heads 3 is not divisible"),
    (dict(hidden_size=66), 1, "hidden size 66 is not divisible"),
    (dict(ffn_hidden_size=130), 4, "ffn hidden size 130"),
    (dict(vocab_size=130), 4, "vocab size 130 .*pad_vocab_size"),
    (dict(orig_vocab_size=129), 1, "orig_vocab_size"),
    (dict(hidden_dropout=1.0), 1, "hidden_dropout"),
    (dict(activation="relu"), 1, "activation"),
    (dict(attn_mask_type="sliding"), 1, "attn_mask_type"),
    (dict(num_layers=0), 1, "num_layers"),
])
def test_config_validation(overrides, tp_size, message):
    with pytest.raises(UsageError, match=message):
        small_config(**overrides).validate(tp_size)


def test_presets():
    assert small_config().ffn_hidden_size == 256
    for name in MODEL_PRESETS:
        TransformerConfig.from_preset(name, vocab_size=pad_vocab_size(50257, 128, 4)).validate(4)
    gpt2 = TransformerConfig.from_preset("gpt2", vocab_size=50304)
    assert (gpt2.num_layers, gpt2.hidden_size, gpt2.num_attention_heads) == (12, 768, 12)
    with pytest.raises(UsageError, match="unknown model preset"):
        TransformerConfig.from_preset("gpt5", vocab_size=128)


def test_model_rejects_bad_config_and_inputs():
    with pytest.raises(UsageError):
        GPTModel(small_config(hidden_size=66), single_rank_state())
    model = GPTModel(small_config(), single_rank_state())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_initialization():
    torch.manual_seed(0)
    cfg = small_config(num_layers=8, hidden_size=128, vocab_size=1024)
    model = GPTModel(cfg, single_rank_state())
    scaled_std = 0.02 / math.sqrt(2 * cfg.num_layers)
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight"):
            assert torch.all(p == 1), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:
            std = scaled_std if name.endswith(("dense.weight", "dense_4h_to_h.weight")) else 0.02
            assert abs(p.std().item() - std) < 0.1 * std, name
        assert p.tensor_model_parallel == name.endswith(
            ("wte.weight", "query_key_value.weight", "query_key_value.bias", "dense.weight",
             "dense_h_to_4h.weight", "dense_h_to_4h.bias", "dense_4h_to_h.weight")), name


def test_untrained_loss_is_log_vocab_and_padding_is_masked():
    tokens = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    masked = GPTModel(small_config(orig_vocab_size=100), single_rank_state()).eval()
    losses = masked(tokens[:, :-1], labels=tokens[:, 1:])
    assert losses.shape == (2, 8) and losses.dtype == torch.float32
    assert abs(losses.mean().item() - math.log(100)) < 0.05
    torch.manual_seed(0)
    megatron_style = GPTModel(small_config(), single_rank_state()).eval()  # padding kept
    assert abs(megatron_style(tokens[:, :-1], labels=tokens[:, 1:]).mean().item()
               - math.log(128)) < 0.05
    assert torch.isfinite(megatron_style(tokens)).all()


def test_forward_step_loss_mask():
    model = GPTModel(small_config(), single_rank_state()).eval()
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8)
    mask[1, 4:] = 0
    loss, logged = gpt_forward_step(model, {"tokens": tokens, "loss_mask": mask})
    per_token = model(tokens[:, :-1], labels=tokens[:, 1:])
    assert torch.allclose(loss, per_token[mask.bool()].mean())
    assert torch.allclose(gpt_forward_step(model, {"tokens": tokens})[0], per_token.mean())
    assert not logged["lm loss"].requires_grad


def test_causal_attention_ignores_the_future():
    model = GPTModel(small_config(), single_rank_state()).eval()
    tokens = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 128
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_post_ln_padding_attention_for_bert():
    cfg = small_config(post_layer_norm=True, attn_mask_type="padding", activation="gelu")
    stack = ParallelTransformer(cfg, single_rank_state(), tracker=None).eval()
    assert stack.final_layernorm is None and not hasattr(stack.layers[0], "input_layernorm")
    x = torch.randn(2, 8, 64)
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[0, 5:] = False                        # sample 0 has 3 padding positions
    mask = keep[:, None, None, :]              # [b, 1, 1, s]: which keys may be attended
    noisy = x.clone()
    noisy[0, 5:] += 1.0
    with torch.no_grad():
        out, out_noisy, unmasked = stack(x, mask), stack(noisy, mask), stack(noisy)
    assert torch.allclose(out[0, :5], out_noisy[0, :5], atol=1e-6)
    assert not torch.allclose(out[0, :5], unmasked[0, :5], atol=1e-3)
    # Bidirectional: early positions see later ones.
    later = x.clone()
    later[1, 7] += 1.0
    with torch.no_grad():
        assert not torch.allclose(stack(later, mask)[1, 0], out[1, 0], atol=1e-4)
    # Post-LN: every output row is layer-normalized.
    assert torch.allclose(out.mean(-1), torch.zeros(2, 8), atol=1e-5)
    with pytest.raises(ValueError, match="causal"):
        GPTModel(cfg, single_rank_state())


def test_dropout_is_reproducible_and_off_in_eval():
    ps = single_rank_state()
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(2):
        tracker = model_parallel_seed(5, ps)
        model = GPTModel(small_config(hidden_dropout=0.2, attention_dropout=0.2), ps, tracker)
        losses.append(gpt_forward_step(model.train(), {"tokens": tokens})[0].item())
    eval_losses = [gpt_forward_step(model.eval(), {"tokens": tokens})[0].item() for _ in range(2)]
    assert losses[0] == losses[1]
    assert eval_losses[0] == eval_losses[1] != losses[1]


def test_loss_falls_when_training():
    torch.manual_seed(0)
    model = GPTModel(small_config(hidden_dropout=0.0, attention_dropout=0.0), single_rank_state())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = {"tokens": torch.randint(0, 128, (4, 17), generator=torch.Generator().manual_seed(0))}
    first = None
    for _ in range(30):
        loss, _ = gpt_forward_step(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or loss.item()
    assert loss.item() < 0.5 * first
