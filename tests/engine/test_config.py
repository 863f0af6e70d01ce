"""``retina-fast train --config FILE.yaml``: the schema, precedence, errors and the resolved config."""

import io
import sys

import pytest
import torch

from retina_fast.cli import build_parser, main
from retina_fast.data.errors import RetinaFastError
from retina_fast.engine import config as rconfig
from retina_fast.engine import load_checkpoint, train

from .helpers import CATEGORIES, tiny_config, tiny_stream

yaml = pytest.importorskip("yaml")


def _other_value(opt: rconfig.Option):
    """A valid value for ``opt`` that differs from its default."""
    if opt.kind == "bool":
        return not opt.default
    if opt.kind == "mapping":
        return {"head_convs": 3, "norm": "gn"}
    if opt.choices:
        v = next(c for c in opt.choices if c != opt.default)
    elif opt.kind == "int":
        v = (opt.default or 1) + 2
    elif opt.kind == "float":
        v = 0.25 if opt.default != 0.25 else 0.5
    else:
        v = f"some/{opt.key}"
    return [v, v + 1] if opt.many and opt.kind == "int" else [v] if opt.many else v


def _write(tmp_path, data, name="c.yaml"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(p)


def test_every_train_flag_can_be_set_in_the_file_and_the_command_line_wins(tmp_path):
    parser = build_parser()
    opts = rconfig.options(rconfig.subparser(parser, "train"))
    assert {"lr", "batch_size", "model_opt", "lr_steps", "amp", "tensorboard", "coco_backend",
            "omp_wait_policy", "device", "out"} <= set(opts)
    assert "config" not in opts and "print_config" not in opts
    values = {k: _other_value(o) for k, o in opts.items()}
    values["device"] = "cpu"  # the only other device sure to exist here
    path = _write(tmp_path, values)
    cfg = rconfig.load_config(path, rconfig.subparser(parser, "train"))
    argv = ["train", "--config", path]
    args = rconfig.apply_config(parser, argv, cfg)
    resolved = rconfig.resolved_config(args, parser)
    assert resolved == values
    # flags on the command line override the file; --model-opt merges key by key
    argv += ["--lr", "0.125", "--model-opt", "head_convs=4", "--lr-steps", "7"]
    args = rconfig.apply_config(build_parser(), argv, cfg)
    resolved = rconfig.resolved_config(args, parser)
    assert resolved["lr"] == 0.125 and resolved["lr_steps"] == [7]
    assert resolved["model_opt"] == {"head_convs": 4, "norm": "gn"}
    assert resolved["batch_size"] == values["batch_size"]


def test_yaml_details(tmp_path):
    parser = rconfig.subparser(build_parser(), "train")
    path = _write(tmp_path, "weight-decay: 1e-4\nlr: 2E-3\nmin_size: 512\nlr_steps: 16\nmax_size: null\n")
    assert rconfig.load_config(path, parser) == {
        "weight_decay": 1e-4, "lr": 2e-3, "min_size": [512], "lr_steps": [16], "max_size": None}
    assert rconfig.load_config(_write(tmp_path, "", "empty.yaml"), parser) == {}


@pytest.mark.parametrize("text, needle", [
    ("batchsize: 4", "unknown key 'batchsize' (did you mean 'batch_size'?)"),
    ("lr: fast", "'lr': must be a number, not 'fast'"),
    ("epochs: 2.5", "'epochs': must be an integer, not 2.5"),
    ("amp: yes please", "'amp': must be true or false"),
    ("optimizer: adam", "'optimizer': must be one of adamw, sgd"),
    ("lr_steps: [16, x]", "'lr_steps': must be an integer"),
    ("model_opt: [norm=gn]", "'model_opt': must be a mapping"),
    ("batch_size: 0", "'batch_size': must be at least 1, not 0"),
    ("hflip: 2", "'hflip': must be between 0 and 1"),
    ("dist_timeout: 0", "'dist_timeout': must be positive, not 0"),
    ("lr: 1\nlr: 2", "key 'lr' appears twice"),
    ("lr: [1", "not valid YAML"),
    ("- lr", "must hold a mapping"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(RetinaFastError) as e:
        rconfig.load_config(path, rconfig.subparser(build_parser(), "train"))
    assert needle in str(e.value) and path in str(e.value) and "\n" not in str(e.value)


def test_print_config_round_trips(tmp_path, capsys):
    path = _write(tmp_path, {"lr": 0.01, "model_opt": {"fpn_channels": 16}, "min_size": [480, 512]})
    assert main(["train", "--config", path, "--print-config", "--epochs", "3"]) == 0
    first = capsys.readouterr().out
    data = yaml.safe_load(first)
    assert data["lr"] == 0.01 and data["epochs"] == 3 and data["model_opt"] == {"fpn_channels": 16}
    again = _write(tmp_path, first, "again.yaml")
    assert main(["train", "--config", again, "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == data


def test_config_written_without_pyyaml_is_still_yaml(monkeypatch):
    cfg = {"lr": 0.01, "lr_steps": [16, 22], "model_opt": {"norm": "gn"}, "resume": None, "amp": True}
    monkeypatch.setitem(sys.modules, "yaml", None)
    text = rconfig.dump_config(cfg, "x.yaml")
    with pytest.raises(RetinaFastError, match="pip install pyyaml"):
        rconfig.read_yaml(__file__)
    monkeypatch.undo()
    assert yaml.safe_load(text) == cfg


def _plain(v):
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    if isinstance(v, list):
        return all(_plain(x) for x in v)
    return v is None or isinstance(v, (str, int, float, bool))


def test_checkpoint_keeps_the_config_as_plain_types(tmp_path):
    cfg = rconfig.resolved_config(build_parser().parse_args(["train", "--model-opt", "norm=\"gn\""]), build_parser())
    train(tiny_config(tmp_path, epochs=1), tiny_stream(4), CATEGORIES, config=cfg)
    kept = load_checkpoint(str(tmp_path / "checkpoint.pt"))["config"]
    assert kept == cfg and _plain(kept)
    buf = io.BytesIO()
    torch.save({"config": kept}, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["config"] == cfg


def test_the_example_configs_in_the_usage_guide_are_valid(tmp_path):
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    text = open(os.path.join(root, "docs", "usage.md"), encoding="utf-8").read()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    for i, block in enumerate(blocks):
        parser = build_parser()
        path = _write(tmp_path, block, f"example{i}.yaml")
        cfg = rconfig.load_config(path, rconfig.subparser(parser, "train"))
        args = rconfig.apply_config(parser, ["train", "--config", path], cfg)
        rconfig.check_model(args.model, rconfig.model_kwargs(args))
    assert "\nbackbone_weights: " in blocks[1]  # the COCO recipe starts from ImageNet weights


def test_model_names_are_what_build_model_accepts():
    from retina_fast.engine import MODEL_NAMES

    assert "resnet34-fpn" in MODEL_NAMES
    for name in MODEL_NAMES:
        rconfig.check_model(name, {})          # on the meta device: milliseconds
    with pytest.raises(RetinaFastError, match="unknown model 'resnet35-fpn'; choose one of .*resnet34-fpn"):
        rconfig.check_model("resnet35-fpn", {})
    with pytest.raises(RetinaFastError, match=r"unknown option\(s\) for resnet34-fpn: \['norm'\]"):
        rconfig.check_model("resnet34-fpn", {"norm": "gn"})
