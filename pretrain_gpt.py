"""Pretrain GPT (GPT-2 architecture) with tensor + data parallelism and GEMINI recovery.

    python pretrain_gpt.py                                    # tiny GPT on the bundled corpus
    torchrun --nproc-per-node 4 pretrain_gpt.py --tensor-model-parallel-size 2 \
        --data-path my_corpus_text_document --tokenizer-type SentencePieceTokenizer \
        --tokenizer-model tok.model --model-size gpt2 --seq-length 1024 ...
"""
from gemini_lm.config import parse_config
from gemini_lm.data.gpt_dataset import build_gpt_datasets
from gemini_lm.errors import run_cli
from gemini_lm.models.gpt import GPTModel, gpt_forward_step
from gemini_lm.training.loop import pretrain


def model_provider(cfg, transformer_config, ps, tracker):
    return GPTModel(transformer_config, ps, tracker)


def datasets_provider(cfg, tokenizer, num_samples):
    return build_gpt_datasets(cfg.data.data_path, cfg.data.split, cfg.model.seq_length,
                              cfg.training.seed, num_samples)


def main() -> int:
    return pretrain(parse_config(), model_provider, datasets_provider, gpt_forward_step)


if __name__ == "__main__":
    run_cli(main, hard_exit=True)
