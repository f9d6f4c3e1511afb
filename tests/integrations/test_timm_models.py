"""``split_params``/``Hybrid`` on timm's own models (built without weights, no downloads): what each model declares
about itself — ``get_classifier()`` (a distilled model's pair of heads), its depthwise convolutions (by their
``groups``), its ``pos_embed``/``cls_token``, its relative-position bias tables and layer scales — decides what must
go to AdamW, independently of orthoptim's rules; one Hybrid step on a small CNN is checked against the float64-SVD
polar factor of a conv gradient.

timm needs torchvision; where neither is installed the module is skipped.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

import orthoptim  # noqa: E402

MODELS = [
    "resnet18",
    "convnext_atto",
    "vit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "swin_tiny_patch4_window7_224",
    "levit_128s",
    "efficientnet_b0",
    "fastvit_t8",
    "mobilevit_xxs",
    "tnt_s_patch16_224",
    "swinv2_tiny_window8_256",
    "vit_base_patch16_siglip_224",
]


def _must_be_adamw(model: nn.Module) -> dict[str, str]:
    """Each parameter a Muon user would keep off the orthogonalized update, by name, with why — read from the model's
    own modules and names, not from orthoptim."""
    why: dict[str, str] = {}
    names = {id(p): n for n, p in model.named_parameters()}
    heads = model.get_classifier()
    for head in heads if isinstance(heads, tuple) else (heads,):
        for p in head.parameters():
            why[names[id(p)]] = "classifier"
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.in_channels > 1:
            why[names[id(module.weight)]] = "depthwise"
    for name, p in model.named_parameters():
        own = name.rsplit(".", 1)[-1]
        if p.ndim < 2 or sum(d > 1 for d in p.shape) <= 1:
            why.setdefault(name, "vector")
        elif own in ("pos_embed", "cls_token", "dist_token", "patch_pos", "pixel_pos") or "bias_table" in own:
            why.setdefault(name, "table")
        elif own == "attention_biases":
            why.setdefault(name, "table")
    return why


@pytest.mark.parametrize("name", MODELS)
def test_timm_models_keep_heads_tables_and_depthwise_filters_off_the_matrices(name: str) -> None:
    model = timm.create_model(name, pretrained=False, num_classes=7)
    matrices, others = orthoptim.split_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(matrices) + len(others) == len(names)
    must = _must_be_adamw(model)
    wrong = {names[id(p)]: must[names[id(p)]] for p in matrices if names[id(p)] in must}
    assert not wrong, wrong
    # Every nn.Linear outside the classifier is a hidden matrix.
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and f"{module_name}.weight" not in must:
            assert any(p is module.weight for p in matrices), module_name
    opt = orthoptim.Hybrid(model)
    in_groups = [p for g in opt.param_groups for p in g["params"]]
    assert len(in_groups) == len(names)


def test_a_hybrid_step_on_a_timm_resnet_moves_a_conv_by_its_polar_factor() -> None:
    """One step from zero momentum on resnet18 (32×32 inputs): the stem conv's update is −lr·√max(1, out/(in·49))·
    polar(G), G its gradient flattened out × in·49, against float64 SVD; the classifier moves as AdamW's first step
    (−adamw_lr·sign(g) up to eps)."""
    torch.manual_seed(0)
    # zero_init_last=False: timm zeroes each block's last norm gain, which would leave that block's convs no gradient
    model = timm.create_model("resnet18", pretrained=False, num_classes=7, zero_init_last=False).double()
    lr, adamw_lr = 0.05, 1e-3
    opt = orthoptim.Hybrid(
        model, lr=lr, adamw_lr=adamw_lr, momentum=0.0, weight_decay=0.0, adamw_weight_decay=0.0,
        schedule="polar_express", ns_steps=8, compute_dtype="float64",
    )  # fmt: skip
    conv, fc = model.conv1.weight, model.get_classifier().weight  # the 7×7 stem: a full-rank gradient from 4 images
    before_conv, before_fc = conv.detach().clone(), fc.detach().clone()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    G = conv.grad.reshape(conv.shape[0], -1)  # type: ignore[union-attr]
    U, _, Vt = torch.linalg.svd(G, full_matrices=False)
    scale = math.sqrt(max(1.0, G.shape[0] / G.shape[1]))
    opt.step()
    step = (conv.detach() - before_conv).reshape_as(G)
    expected_step = -lr * scale * (U @ Vt)
    err = torch.linalg.norm(step - expected_step) / torch.linalg.norm(expected_step)
    assert err <= 1e-6, float(err)  # 8 Polar Express steps in float64 on a well-conditioned gradient
    g = fc.grad
    assert g is not None
    expected = -adamw_lr * g / (g.abs() + opt.param_groups[-1]["eps"])
    torch.testing.assert_close(fc.detach() - before_fc, expected, atol=1e-9, rtol=1e-6)
