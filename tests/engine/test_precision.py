"""``--precision`` / ``--channels-last``: what ``auto`` chooses on which hardware, the flags and
config keys, what the trainer and the demo record, and ``retina-fast bench model``."""

import json

import pytest
import torch

from retina_fast.cli import build_parser, main
from retina_fast.data.errors import RetinaFastError
from retina_fast.engine import config as rconfig
from retina_fast.engine import precision as rprec
from retina_fast.engine import train

from .helpers import CATEGORIES, tiny_config, tiny_stream


def _features(monkeypatch, amx=False, avx512_bf16=False, onednn=True):
    monkeypatch.setattr(rprec, "cpu_features", lambda: {"amx": amx, "avx512_bf16": avx512_bf16,
                                                        "onednn_bf16": onednn, "capability": "TEST"})


@pytest.mark.parametrize("amx,avx,onednn,want", [
    (True, False, True, "bf16"), (False, True, True, "bf16"), (True, True, True, "bf16"),
    (False, False, True, "fp32"), (True, True, False, "fp32"),
])
def test_auto_on_cpu_follows_native_bfloat16(monkeypatch, amx, avx, onednn, want):
    _features(monkeypatch, amx, avx, onednn)
    s = rprec.resolve("auto", None, "cpu")
    assert s.precision == want and s.requested == "auto" and not s.grad_scaler
    assert s.dtype == (torch.bfloat16 if want == "bf16" else None)
    assert ("AMX" if amx else "AVX-512-BF16") in s.reason if want == "bf16" else "no native bfloat16" in s.reason
    assert s.channels_last == torch.backends.mkldnn.is_available()


def test_explicit_settings_win_over_the_hardware(monkeypatch):
    _features(monkeypatch)  # no native bf16
    s = rprec.resolve("bf16", False, "cpu")
    assert (s.precision, s.channels_last, s.reason) == ("bf16", False, "as asked")
    assert s.memory_format == torch.contiguous_format
    assert rprec.resolve("fp32", True, "cpu").memory_format == torch.channels_last
    assert rprec.resolve("fp16", None, "cpu").dtype == torch.float16
    with pytest.raises(RetinaFastError, match="precision must be one of auto, fp32, bf16, fp16, not 'fp8'"):
        rprec.resolve("fp8", None, "cpu")


def test_autocast_context_matches_the_settings():
    with rprec.resolve("bf16", None, "cpu").autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with rprec.resolve("fp32", None, "cpu").autocast():
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("bf16_ok,want", [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda(monkeypatch, bf16_ok, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "TestGPU")
    s = rprec.resolve("auto", None, "cuda")
    assert s.precision == want and s.channels_last and s.grad_scaler == (want == "fp16")
    assert "TestGPU" in s.reason
    if not bf16_ok:
        with pytest.raises(RetinaFastError, match="does not support bfloat16"):
            rprec.resolve("bf16", None, "cuda")


def test_cpu_features_fall_back_to_proc_cpuinfo(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.setattr(rprec, "_cpuinfo_flags", lambda: {"avx512_bf16", "avx2"})
    f = rprec.cpu_features()
    assert f["avx512_bf16"] and not f["amx"]


def test_the_old_amp_switch_means_bf16_on_cpu():
    args = build_parser().parse_args(["train", "--amp"])
    assert rprec.from_args(args, "cpu").precision == "bf16"
    args = build_parser().parse_args(["train", "--amp", "--precision", "fp32"])
    assert rprec.from_args(args, "cpu").precision == "fp32"


def test_flags_and_config_keys(tmp_path):
    parser = build_parser()
    for cmd in ("train", "demo"):
        a = parser.parse_args([cmd])
        assert a.precision == "auto" and a.channels_last is None
        a = parser.parse_args([cmd, "--precision", "bf16", "--no-channels-last"])
        assert a.precision == "bf16" and a.channels_last is False
        assert parser.parse_args([cmd, "--channels-last"]).channels_last is True
    sub = rconfig.subparser(parser, "train")
    opts = rconfig.options(sub)
    assert opts["channels_last"].flag == "--channels-last" and opts["precision"].choices == rprec.PRECISIONS
    for text, want in (("precision: bf16\nchannels_last: true\n", ("bf16", True)),
                       ("channels_last: null\n", ("auto", None)), ("channels_last: false\n", ("auto", False))):
        p = tmp_path / "c.yaml"
        p.write_text(text)
        cfg = rconfig.load_config(str(p), sub)
        args = rconfig.apply_config(build_parser(), ["train", "--config", str(p)], cfg)
        assert (args.precision, args.channels_last) == want
    for text, msg in (("precision: fp8\n", "'precision': must be one of auto, fp32, bf16, fp16"),
                      ("channels_last: maybe\n", "'channels_last': must be true or false")):
        p = tmp_path / "bad.yaml"
        p.write_text(text)
        with pytest.raises(RetinaFastError, match=msg):
            rconfig.load_config(str(p), sub)


def test_trainer_records_and_applies_the_settings(tmp_path):
    res = train(tiny_config(tmp_path / "cl", precision="bf16", channels_last=True, max_iters=2),
                tiny_stream(8), CATEGORIES)
    assert res.settings["precision"] == "bf16" and res.settings["channels_last"]
    convs = [m.weight for m in res.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert all(p.dtype == torch.float32 for p in res.model.parameters())  # autocast, float32 master weights
    ckpt = torch.load(res.checkpoint, weights_only=True)
    assert ckpt["settings"] == res.settings
    assert res.data_wait_seconds >= 0
    res = train(tiny_config(tmp_path / "fp32", precision="fp32", channels_last=False, max_iters=1),
                tiny_stream(8), CATEGORIES)
    assert res.settings["precision"] == "fp32" and not res.settings["channels_last"]
    assert all(m.weight.is_contiguous() for m in res.model.modules() if isinstance(m, torch.nn.Conv2d))


def test_bench_model_prints_the_table(tmp_path, capsys):
    out = tmp_path / "t.json"
    rc = main(["bench", "model", "--size", "64", "--batch-size", "1", "--rounds", "1", "--warmup", "0",
               "--latency-rounds", "1", "--rows", "fp32,bf16+cl", "--finetune-rows", "bf16+cl", "--threads", "1",
               "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    table = json.load(open(out))
    assert [r["setting"] for r in table["rows"]] == ["like for like: fp32, NCHW", "like for like: bf16, channels_last"]
    head = table["headline"]
    assert head["torchvision"] == "fp32" and "(auto)" in head["setting"]
    for row in [head] + table["rows"]:
        assert row["train_ratio"] > 0 and row["infer_ratio"] > 0
    (ft,) = table["finetune_rows"]
    assert ft["setting"] == "fine-tuning layout, like for like: bf16, channels_last" and ft["train_ratio"] > 0
    assert "infer_ratio" not in ft
    assert table["latency"]["ratio"] > 0 and "cpu_flags" in table["machine"]
    assert "| setting |" in text and "AVX-512-BF16" in text
