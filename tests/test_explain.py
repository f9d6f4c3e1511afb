"""``orthoptim.explain(model)`` and ``orthoptim explain``: the table of what an optimizer does with each parameter.

The lr factors are checked against √max(1, out/in) computed here from the layer's own dimensions; the
algorithm and reasons against how the model was built.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import orthoptim
from orthoptim.cli import main

from .test_weight_layout import Conv1D


class TinyResNet(nn.Module):
    """Laid out as torchvision's ResNet: convolutions, a depthwise one, a top-level ``fc`` classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3)
        self.dw = nn.Conv2d(16, 16, 3, groups=16)
        self.fc = nn.Linear(16, 10)


class TinyGPT(nn.Module):
    """Laid out as transformers' GPT-2: embeddings, Conv1D projections (c_attn fused q, k, v), a tied head."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(50, 16)
        self.c_attn = Conv1D(48, 16)
        self.c_fc = Conv1D(64, 16)
        self.lm_head = nn.Linear(16, 50, bias=False)
        self.lm_head.weight = self.wte.weight


def test_explain_a_resnet_layout() -> None:
    rows = {r.name: r for r in orthoptim.explain(TinyResNet()).rows}
    conv = rows["conv1.weight"]
    assert (conv.algorithm, conv.orientation, conv.split) == ("muon", "out×in", 1)
    assert conv.lr_factor == f"{math.sqrt(max(1.0, 16 / (3 * 3 * 3))):.3g}"
    assert "flattened" in conv.why
    assert rows["dw.weight"].algorithm == "adamw" and "depthwise" in rows["dw.weight"].why
    assert rows["fc.weight"].algorithm == "adamw" and rows["fc.weight"].why == "output head (fc)"
    assert rows["conv1.bias"].why.startswith("vector")


def test_explain_a_gpt2_layout_with_split_auto_and_normuon() -> None:
    table = orthoptim.explain(TinyGPT(), split="auto", row_norm=True)
    rows = {r.name: r for r in table.rows}
    attn, fc = rows["c_attn.weight"], rows["c_fc.weight"]
    assert (attn.algorithm, attn.orientation, attn.split) == ("normuon", "in×out", 3)
    assert attn.lr_factor == "1"  # three 16×16 blocks
    assert (fc.orientation, fc.split, fc.lr_factor) == ("in×out", 1, "2")  # out 64, in 16
    assert "lm_head.weight" not in rows  # tied to wte: one parameter, one row
    assert rows["wte.weight"].why.startswith("embedding table")
    text = str(table)
    assert text.splitlines()[0].split() == [
        "parameter",
        "shape",
        "orientation",
        "algorithm",
        "split",
        "lr",
        "factor",
        "why",
    ]
    assert "c_attn.weight" in text


def test_explain_an_optimizer_already_built() -> None:
    model = TinyResNet()
    opt = orthoptim.Muon([model.conv1.weight], scale_mode="unit_rms")
    rows = {r.name: r for r in orthoptim.explain(model, opt).rows}
    assert rows["conv1.weight"].lr_factor == f"{math.sqrt(27):.3g}"  # unit_rms: √max(out, in·k²)
    assert rows["fc.weight"].algorithm == "not optimized"
    with pytest.raises(TypeError, match="apply without optimizer"):
        orthoptim.explain(model, opt, split="auto")
    with pytest.raises(TypeError, match=r"an nn\.Module"):
        orthoptim.explain(torch.zeros(3))  # type: ignore[arg-type]


def test_the_explain_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "tests.test_explain:TinyGPT", "--split", "auto"]) == 0
    out = capsys.readouterr().out
    assert "c_attn.weight" in out and "3 blocks of 16 rows" in out
    assert main(["explain", "tests.test_explain"]) == 2
    assert "module.path:name" in capsys.readouterr().err
    assert main(["explain", "tests.test_explain:Nope"]) == 2
    assert "no attribute 'Nope'" in capsys.readouterr().err


def test_the_installed_command_imports_a_model_from_the_current_directory(tmp_path: Path) -> None:
    """The console script's sys.path starts at its bin directory, not the caller's: `orthoptim explain
    mymodels:build` run next to mymodels.py must still find it, as `python -m orthoptim` does."""
    script = Path(sys.executable).with_name("orthoptim")
    if not script.exists():
        pytest.skip("the orthoptim console script is not installed next to this interpreter")
    (tmp_path / "mymodels.py").write_text("import torch\ndef build():\n    return torch.nn.Linear(8, 4)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [str(script), "explain", "mymodels:build"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "weight" in done.stdout and "muon" in done.stdout


def test_the_explain_command_takes_every_form_of_split(capsys: pytest.CaptureFixture[str]) -> None:
    from orthoptim.cli import parse_split

    assert parse_split("auto") == "auto" and parse_split("3") == 3 and parse_split("32+16+16") == (32, 16, 16)
    assert parse_split("c_attn=3, qkv=8+4+4") == {"c_attn": 3, "qkv": (8, 4, 4)}
    assert main(["explain", "tests.test_explain:TinyGPT", "--split", "c_attn=24+12+12"]) == 0
    assert "24+12+12" in capsys.readouterr().out
    for bad, says in [
        ("three", "block count"),
        ("32+x", "block count"),
        ("c_attn=", "c_attn="),
        ("=3", "not name=count"),
        ("c_attn=3,c_attn=2", "given twice"),
        ("c_attn=20+20+20", "c_attn"),  # sizes that do not sum to the rows: Hybrid's error, naming the weight
    ]:
        assert main(["explain", "tests.test_explain:TinyGPT", "--split", bad]) == 2, bad
        assert says in capsys.readouterr().err, bad


def test_a_head_named_by_the_model_itself_goes_to_adamw() -> None:
    """A head whose module name says nothing (``proj_out``), known by the model's ``get_output_embeddings()``
    (transformers) or ``get_classifier()`` (timm)."""

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(16, 16)
            self.proj_out = nn.Linear(16, 50)

        def get_output_embeddings(self) -> nn.Module:
            return self.proj_out

    class Classifier(LM):
        def get_output_embeddings(self) -> nn.Module:
            raise NotImplementedError  # some models raise here: no head by that name

        def get_classifier(self) -> nn.Module:
            return self.proj_out

    for model in (LM(), Classifier()):
        rows = {r.name: r for r in orthoptim.explain(model).rows}
        assert rows["proj_out.weight"].algorithm == "adamw", type(model).__name__
        assert "output head" in rows["proj_out.weight"].why
        assert rows["body.weight"].algorithm == "muon"
        matrices, _ = orthoptim.split_params(model)
        assert [tuple(p.shape) for p in matrices] == [(16, 16)]


class TimmLikeViT(nn.Module):
    """Laid out as timm's distilled Swin/DeiT/LeViT models: a relative-position bias table (offsets × heads,
    indexed per token pair), a layer scale stored (C, 1, 1), a weight-normed projection (gain (out, 1)), a
    depthwise transposed convolution, and two heads that ``get_classifier()`` returns as a pair."""

    def __init__(self) -> None:
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.zeros(49, 4))
        self.patch_pos = nn.Parameter(torch.zeros(1, 49, 16))  # TNT's position table, a batch of one "matrix"
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.utils.parametrizations.weight_norm(nn.Linear(16, 16))
        self.gamma = nn.Parameter(torch.ones(16, 1, 1))
        self.up = nn.ConvTranspose2d(16, 16, 2, groups=16)
        self.up1d = nn.ConvTranspose1d(16, 8, 3)  # weight (in, out, k): one matrix, flattened as stored
        self.head = nn.Linear(16, 10)
        self.head_dist = nn.Linear(16, 10)

    def get_classifier(self) -> tuple[nn.Module, nn.Module]:
        return self.head, self.head_dist


def test_tables_gains_and_a_pair_of_heads_go_to_adamw() -> None:
    model = TimmLikeViT()
    hidden = {"qkv.weight", "proj.parametrizations.weight.original1", "up1d.weight"}  # weight_norm's direction
    rows = {r.name: r for r in orthoptim.explain(model).rows}
    assert {name for name, r in rows.items() if r.algorithm == "muon"} == hidden
    assert "attention-bias table" in rows["relative_position_bias_table"].why
    assert rows["patch_pos"].algorithm == "adamw" and "embedding" in rows["patch_pos"].why
    assert rows["gamma"].why.startswith("vector stored 16×1×1")
    assert rows["proj.parametrizations.weight.original0"].why.startswith("vector stored 16×1")  # the gain
    assert "depthwise" in rows["up.weight"].why
    assert "flattened as stored, in × out·k" in rows["up1d.weight"].why and rows["up1d.weight"].lr_factor == "1"
    assert "get_classifier()" in rows["head_dist.weight"].why and "get_classifier()" in rows["head.weight"].why
    matrices, others = orthoptim.split_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in matrices} == hidden
    assert len(matrices) + len(others) == len(names)
    # Named param groups without the model: the name and shape rules alone give the same matrices.
    opt = orthoptim.Hybrid([{"params": list(model.named_parameters())}])
    muon = [n for g in opt.param_groups if g["algorithm"] == "muon" for n in g["param_names"]]
    assert set(muon) == hidden | {"up.weight"}  # a depthwise convolution is known by its module only


def test_a_wrapped_model_splits_as_the_model_inside() -> None:
    """torch.compile's OptimizedModule and DataParallel prefix every name (``_orig_mod.``, ``module.``); the head
    rules that look at the model's direct children and accessors see through them."""
    model = TinyResNet()
    expected = {id(p) for p in orthoptim.split_params(model)[0]}
    assert expected == {id(model.conv1.weight)}
    for wrapped in (torch.compile(model), nn.DataParallel(model), nn.DataParallel(torch.compile(model))):
        assert {id(p) for p in orthoptim.split_params(wrapped)[0]} == expected, type(wrapped).__name__
        opt = orthoptim.Hybrid(wrapped)
        assert [p for g in opt.param_groups if g["algorithm"] == "muon" for p in g["params"]] == [model.conv1.weight]
