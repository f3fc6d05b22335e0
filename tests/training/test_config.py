import pytest

from gemini_lm.config import build_parser, num_micro_batches, parse_config
from gemini_lm.errors import UsageError


def test_megatron_flag_names_and_defaults():
    cfg = parse_config(["--num-layers", "3", "--tensor-model-parallel-size", "2",
                        "--micro-batch-size", "2", "--global-batch-size", "8", "--bf16",
                        "--no-gemini", "--gemini-replicas", "3"], world_size=4)
    assert cfg.model.num_layers == 3
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.training.bf16 and not cfg.gemini.gemini
    assert cfg.gemini.gemini_replicas == 3
    assert num_micro_batches(cfg, 4) == 2          # 8 = 2 micro x 2 accumulation x 2 DP
    assert cfg.training.lr_decay_iters == cfg.training.train_iters
    assert cfg.checkpoint.load is None


def test_global_batch_defaults_to_micro_times_dp():
    cfg = parse_config(["--micro-batch-size", "3"], world_size=2)
    assert cfg.training.global_batch_size == 6


def test_load_defaults_to_save(tmp_path):
    cfg = parse_config(["--save", str(tmp_path)], world_size=1)
    assert cfg.checkpoint.load == str(tmp_path)


@pytest.mark.parametrize("argv,world,msg", [
    (["--tensor-model-parallel-size", "3"], 4, "not divisible by --tensor-model-parallel-size"),
    (["--micro-batch-size", "2", "--global-batch-size", "6"], 2, "not divisible by --micro-batch-size"),
    (["--bf16", "--fp16"], 1, "mutually exclusive"),
    (["--save-interval", "5"], 1, "needs --save"),
    (["--split", "a,b"], 1, "--split"),
    (["--num-layers", "x"], 1, "invalid int value"),
    (["--no-such-flag"], 1, "unrecognized arguments"),
    (["--gemini-placement", "star"], 1, "invalid choice"),
    (["--persistent-bandwidth-mbs", "-1"], 1, "--persistent-bandwidth-mbs -1.0: must be a number >= 0"),
    (["--persistent-bandwidth-mbs", "nan"], 1, "--persistent-bandwidth-mbs: 'nan' is not a finite number"),
    (["--persistent-bandwidth-mbs", "inf"], 1, "--persistent-bandwidth-mbs: 'inf' is not a finite number"),
    # issue 13, item 5: numbers as a class - non-finite, zero sizes, out-of-range, quietly "off"
    (["--lr", "nan"], 1, "--lr: 'nan' is not a finite number"),
    (["--clip-grad", "nan"], 1, "--clip-grad: 'nan' is not a finite number"),
    (["--adam-eps=-inf"], 1, "--adam-eps: '-inf' is not a finite number"),
    (["--hidden-size", "0"], 1, "--hidden-size 0: must be an integer >= 1"),
    (["--num-attention-heads", "0"], 1, "--num-attention-heads 0: must be an integer >= 1"),
    (["--seq-length", "0"], 1, "--seq-length 0: must be an integer >= 1"),
    (["--gemini-buffer-mb", "0"], 1, r"--gemini-buffer-mb 0.0: must be a number > 0"),
    (["--gemini-hang-timeout", "-1"], 1, r"--gemini-hang-timeout -1.0: must be a number >= 0"),
    (["--adam-beta2", "1"], 1, r"--adam-beta2 1.0: must be a number in \[0, 1\)"),
    (["--hidden-dropout", "1.5"], 1, r"--hidden-dropout 1.5: must be a number in \[0, 1\)"),
    (["--seed", "-1"], 1, r"--seed -1: must be an integer in \[0, 4294967295\]"),
    (["--split", "nan,1,1"], 1, "--split 'nan,1,1'"),
    (["--async-save"], 1, "--async-save needs --save"),
])
def test_bad_input_is_a_usage_error(argv, world, msg):
    with pytest.raises(UsageError, match=msg):
        parse_config(argv, world_size=world)


def test_persistent_bandwidth_zero_is_unthrottled(tmp_path):
    from gemini_lm.checkpoint.files import Throttle

    cfg = parse_config(["--save", str(tmp_path), "--async-save", "--persistent-bandwidth-mbs", "0"], world_size=1)
    assert cfg.checkpoint.async_save and Throttle.from_mbs(cfg.checkpoint.persistent_bandwidth_mbs) is None
    assert Throttle.from_mbs(2.5) == Throttle(2.5e6)


def test_every_field_has_help():
    parser = build_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, action.dest


def test_every_numeric_flag_declares_its_range():
    """A new numeric flag must say what it accepts (gemini_lm/flag_bounds.py), so no value
    can reach the code that divides by it or hands it to torch unchecked."""
    import dataclasses
    import typing

    from gemini_lm.config import SECTIONS, _flag_type
    from gemini_lm.flag_bounds import BOUNDS

    numeric = {f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)
               if _flag_type(typing.get_type_hints(cls)[f.name]) in (int, float)}
    assert numeric - set(BOUNDS) == set()
    assert set(BOUNDS) - numeric == set()


def test_a_tool_flag_refuses_nan_too():
    from gemini_lm.errors import UsageArgumentParser

    p = UsageArgumentParser()
    p.add_argument("--timeout", type=float)
    with pytest.raises(UsageError, match="'nan' is not a finite number"):
        p.parse_args(["--timeout", "nan"])


def test_a_clamped_warmup_is_noted_for_the_start_up_echo():
    cfg = parse_config(["--train-iters", "10", "--lr-warmup-iters", "30"], world_size=1)
    assert cfg.training.lr_warmup_iters == 10
    assert cfg.notes == ["--lr-warmup-iters 30 > --lr-decay-iters 10: warmup shortened to 10"]
    assert parse_config(["--train-iters", "100", "--lr-warmup-iters", "30"], world_size=1).notes == []
