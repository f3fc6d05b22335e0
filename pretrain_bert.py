"""Pretrain BERT (post-LN, masked LM + next-sentence prediction) with tensor + data
parallelism and GEMINI recovery. Same flags, logging and checkpoints as pretrain_gpt.py.

    python pretrain_bert.py                                   # tiny BERT on the bundled corpus
    torchrun --nproc-per-node 4 pretrain_bert.py --tensor-model-parallel-size 2 \
        --data-path my_corpus_text_sentence --tokenizer-type SentencePieceTokenizer \
        --tokenizer-model tok.model --seq-length 512 ...

--data-path takes a corpus made with `tools/preprocess_data.py --split-sentences`.
"""
from gemini_lm.config import Config, parse_config
from gemini_lm.data.bert_dataset import build_bert_datasets
from gemini_lm.errors import run_cli
from gemini_lm.models.bert import BertModel, bert_config, bert_forward_step
from gemini_lm.training.loop import pretrain


def model_provider(cfg, transformer_config, ps, tracker):
    return BertModel(bert_config(transformer_config), ps, tracker)


def datasets_provider(cfg, tokenizer, num_samples):
    return build_bert_datasets(cfg.data.data_path, cfg.data.split, cfg.model.seq_length,
                               cfg.training.seed, num_samples, tokenizer)


def use_default_corpus(cfg: Config) -> Config:
    """No --data-path: the bundled corpus, split into sentences (built on first use)."""
    if cfg.data.data_path is None:
        from gemini_lm.data.bert_corpus import ensure_default_bert_corpus

        corpus = ensure_default_bert_corpus()
        cfg.data.data_path = corpus.data_prefix
        if cfg.data.tokenizer_type is None:
            cfg.data.tokenizer_type, cfg.data.tokenizer_model = corpus.tokenizer_type, corpus.tokenizer_model
    return cfg


def main() -> int:
    cfg = use_default_corpus(parse_config())
    return pretrain(cfg, model_provider, datasets_provider, bert_forward_step)


if __name__ == "__main__":
    run_cli(main, hard_exit=True)
