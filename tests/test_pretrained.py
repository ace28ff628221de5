"""Public pretrained weights (medmim.models.pretrained): official MAE, SparK, timm and torchvision
layouts converted to medmim's encoders.

No network: every file is built here with the layout's own key names and shapes (listed explicitly
below, from facebookresearch/mae models_mae.py, keyu-tian/SparK spark.py, facebookresearch/ConvNeXt
and timm), by writing a medmim encoder's weights under those names. Loading the file into a fresh
encoder must then compute what the original computed (round trip), and the stem, position and
inflation arithmetic is checked against explicit computations.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medmim.errors import MedmimError
from medmim.models import build_encoder
from medmim.models.pretrained import convert_state, detect_layout, load_pretrained

D, DEPTH, HEADS, P, IMG = 48, 2, 2, 8, 32  # a small ViT: 4x4 patch grid


def vit(spatial_dims=2, img=IMG, in_channels=1, pos_embed="sincos"):
    torch.manual_seed(0)
    return build_encoder("vit_tiny", spatial_dims=spatial_dims, in_channels=in_channels, img_size=img, patch_size=P,
                         embed_dim=D, depth=DEPTH, num_heads=HEADS, pos_embed=pos_embed).eval()


def as_mae_layout(enc, cls_pos=100.0, decoder=True) -> dict[str, torch.Tensor]:
    """A medmim ViT (learned position) written as facebookresearch/mae's MaskedAutoencoderViT."""
    s = enc.state_dict()
    out = {"cls_token": torch.randn(1, 1, D),
           "pos_embed": torch.cat([torch.full((1, 1, D), cls_pos), s["pos_embed"]], dim=1),
           "patch_embed.proj.weight": s["patch_embed.weight"], "patch_embed.proj.bias": s["patch_embed.bias"],
           "norm.weight": s["norm.weight"], "norm.bias": s["norm.bias"]}
    for i in range(DEPTH):
        for ours, theirs in (("norm1", "norm1"), ("attn.qkv", "attn.qkv"), ("attn.proj", "attn.proj"),
                             ("norm2", "norm2"), ("mlp.0", "mlp.fc1"), ("mlp.2", "mlp.fc2")):
            for t in ("weight", "bias"):
                out[f"blocks.{i}.{theirs}.{t}"] = s[f"blocks.{i}.{ours}.{t}"]
    if decoder:
        out.update({"mask_token": torch.randn(1, 1, 32), "decoder_embed.weight": torch.randn(32, D),
                    "decoder_embed.bias": torch.randn(32), "decoder_pos_embed": torch.randn(1, 17, 32),
                    "decoder_blocks.0.norm1.weight": torch.randn(32), "decoder_norm.weight": torch.randn(32),
                    "decoder_pred.weight": torch.randn(P * P * 3, 32), "decoder_pred.bias": torch.randn(P * P * 3)})
    return out


MAE_ENCODER_KEYS = {  # the official names of a depth-2 MAE encoder (models_mae.py / timm Block)
    "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
    *[f"blocks.{i}.{m}.{t}" for i in range(DEPTH) for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1",
                                                             "mlp.fc2") for t in ("weight", "bias")]}


def save(state, path):
    torch.save(state, path)
    return path


def tokens(enc, x):
    return enc(x)[0]


def test_official_mae_layout_round_trip(tmp_path):
    src = vit(pos_embed="learned")
    with torch.no_grad():
        src.pos_embed.normal_()  # a position embedding that is not medmim's sin-cos
    state = as_mae_layout(src)
    assert MAE_ENCODER_KEYS <= set(state) and detect_layout(state) == "mae"
    assert state["blocks.0.mlp.fc1.weight"].shape == (4 * D, D) and state["pos_embed"].shape == (1, 17, D)
    path = save({"model": state}, tmp_path / "mae_pretrain_vit.pth")
    dst = vit()  # medmim default: fixed sin-cos -> becomes learned from the file
    lines = []
    report = load_pretrained(dst, path, log=lines.append)
    assert not report.missing and not report.mismatched
    assert "layout mae" in lines[0] and "weights:" in lines[0]  # the key report is always printed
    assert {"cls_token (not part of the encoder)", "decoder_embed.weight (not part of the encoder)"} <= \
        set(report.unexpected)
    x = torch.randn(2, 1, IMG, IMG)
    torch.testing.assert_close(tokens(dst, x), tokens(src, x), rtol=0, atol=1e-6)  # class position dropped
    assert dst.pos_embed_type == "learned" and isinstance(dst.pos_embed, torch.nn.Parameter)


def test_timm_vit_layout_with_head_and_no_decoder(tmp_path):
    src = vit(pos_embed="learned")
    state = as_mae_layout(src, decoder=False)
    state.update({"head.weight": torch.randn(10, D), "head.bias": torch.randn(10)})
    assert detect_layout(state) == "timm-vit"
    dst = vit()
    report = load_pretrained(dst, save(state, tmp_path / "timm.pth"), verbose=False)
    assert not report.missing and "head.weight (not part of the encoder)" in report.unexpected
    x = torch.randn(1, 1, IMG, IMG)
    torch.testing.assert_close(tokens(dst, x), tokens(src, x), rtol=0, atol=1e-6)


def test_partial_load_is_an_error_unless_allowed(tmp_path):
    state = as_mae_layout(vit(pos_embed="learned"))
    for k in [k for k in state if ".mlp." in k or k.startswith("patch_embed")]:
        del state[k]  # what a wrong conversion used to leave: patch embedding and every MLP missing
    path = save(state, tmp_path / "partial.pth")
    with pytest.raises(MedmimError, match="partial load.*--allow-partial"):
        load_pretrained(vit(), path, verbose=False)
    lines = []
    report = load_pretrained(vit(), path, allow_partial=True, log=lines.append)
    assert "patch_embed.weight" in report.missing and "blocks.0.mlp.0.weight" in report.missing
    assert "missing:" in lines[0]
    # a layer scale (timm DeiT-3) has no medmim counterpart: partial too
    full = as_mae_layout(vit(pos_embed="learned"))
    full["blocks.0.ls1.gamma"] = torch.ones(D)
    with pytest.raises(MedmimError, match="without a medmim counterpart"):
        load_pretrained(vit(), save(full, tmp_path / "ls.pth"), verbose=False)


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_rgb_stem_is_summed_or_averaged(tmp_path, channels):
    src = vit(pos_embed="learned")
    state = as_mae_layout(src, decoder=False)
    rgb = torch.randn(D, 3, P, P)
    state["patch_embed.proj.weight"] = rgb
    dst = vit(in_channels=channels)
    load_pretrained(dst, save(state, tmp_path / "rgb.pth"), verbose=False)
    gray = torch.randn(2, 1, IMG, IMG)
    # explicit: the RGB network shown the gray image on all 3 channels ...
    want = F.conv2d(gray.repeat(1, 3, 1, 1), rgb, state["patch_embed.proj.bias"], stride=P)
    # ... equals ours shown the gray image on each of its channels
    got = F.conv2d(gray.repeat(1, channels, 1, 1), dst.patch_embed.weight, dst.patch_embed.bias, stride=P)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # sums of 192 terms of size ~1
    if channels == 1:
        assert torch.equal(dst.patch_embed.weight, rgb.sum(1, keepdim=True))


def test_position_grid_is_interpolated_2d_and_3d(tmp_path):
    # 2D: a 4x4 file grid into an encoder on 16x16 images (2x2 grid): bicubic, as MAE's fine-tuning does
    src = vit(pos_embed="learned")
    state = as_mae_layout(src, decoder=False)
    dst = vit(img=16)
    load_pretrained(dst, save(state, tmp_path / "p2.pth"), verbose=False)
    grid = state["pos_embed"][:, 1:].reshape(1, 4, 4, D).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(2, 2), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 4, D)
    torch.testing.assert_close(dst.pos_embed.detach(), want)
    # 3D: a 2x2x2 grid (MONAI-style learned position of a 3D ViT) into a 4x4x4 grid, trilinear
    src3 = vit(3, img=16, pos_embed="learned")
    dst3 = vit(3, img=32)
    load_pretrained(dst3, save(src3.state_dict(), tmp_path / "p3.pth"), verbose=False)
    grid3 = src3.pos_embed.detach().reshape(1, 2, 2, 2, D).permute(0, 4, 1, 2, 3)
    want3 = F.interpolate(grid3, size=(4, 4, 4), mode="trilinear", align_corners=False)
    torch.testing.assert_close(dst3.pos_embed.detach(), want3.flatten(2).transpose(1, 2))


def test_2d_vit_inflated_to_3d_gives_the_2d_features_on_a_slice_stack(tmp_path):
    src = vit(pos_embed="learned")
    path = save(as_mae_layout(src, decoder=False), tmp_path / "mae2d.pth")
    with pytest.raises(MedmimError, match="--inflate"):
        load_pretrained(vit(3, img=16), path, verbose=False)
    dst = vit(3, img=IMG)
    load_pretrained(dst, path, inflate=True, verbose=False)
    image = torch.randn(1, 1, IMG, IMG)
    volume = image.unsqueeze(-1).repeat(1, 1, 1, 1, IMG)  # constant along the last (slice) axis
    f2, f3 = tokens(src, image), tokens(dst, volume)
    for k in range(IMG // P):  # every token column along the slice axis equals the 2D token
        torch.testing.assert_close(f3[..., k], f2, rtol=1e-4, atol=1e-5)


def resnet(d=2, in_channels=1, **kw):
    torch.manual_seed(1)
    kw = {"base_channels": 8, "small_input": True, **kw}
    return build_encoder("resnet18", spatial_dims=d, in_channels=in_channels, **kw).eval()


def test_spark_resnet_checkpoint_with_decoder(tmp_path):
    """SparK's `<model>_withdecoder_1kpretrained_spark_style.pth`: {'module': SparK state (with
    config)}, the encoder under sparse_encoder.sp_cnn. with timm ResNet names (incl. fc)."""
    src = resnet()
    for m in src.modules():  # non-trivial running statistics
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    enc = {f"sparse_encoder.sp_cnn.{k}": v for k, v in src.state_dict().items()}
    enc.update({"sparse_encoder.sp_cnn.fc.weight": torch.randn(1000, 512),
                "sparse_encoder.sp_cnn.fc.bias": torch.randn(1000),
                "dense_decoder.dec.0.up_sample.weight": torch.randn(8, 8, 2, 2), "densify_norms.0.weight": torch.ones(8),
                "densify_projs.0.weight": torch.randn(8, 8, 1, 1), "mask_tokens.0": torch.zeros(1, 8, 1, 1),
                "imn_m": torch.zeros(1, 3, 1, 1), "config": {"mask_ratio": 0.6, "hierarchy": 4}})
    path = save({"epoch": 1599, "module": enc, "is_pretrain": True}, tmp_path / "res_withdecoder_spark_style.pth")
    dst = resnet()
    report = load_pretrained(dst, path, verbose=False)
    assert not report.missing and not report.mismatched
    assert "dense_decoder.dec.0.up_sample.weight (not part of the encoder)" in report.unexpected
    assert "fc.weight (not part of the encoder)" in report.unexpected
    x = torch.randn(2, 1, 16, 16)
    for a, b in zip(dst(x), src(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torchvision_resnet_rgb_stem_and_3d_inflation(tmp_path):
    src = resnet(in_channels=3, num_stages=1)
    state = {**src.state_dict(), "fc.weight": torch.randn(10, 8), "fc.bias": torch.randn(10)}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # timm files lack them
    path = save(state, tmp_path / "resnet.pth")
    assert detect_layout(state) == "resnet"
    dst2 = resnet(num_stages=1)
    load_pretrained(dst2, path, verbose=False)
    assert torch.equal(dst2.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    dst3 = resnet(3, num_stages=1)
    with pytest.raises(MedmimError, match="--inflate"):
        load_pretrained(dst3, path, verbose=False)
    load_pretrained(dst3, path, inflate=True, verbose=False)
    assert dst3.layer1[0].conv1.weight.shape[-1] == 3
    torch.testing.assert_close(dst3.layer1[0].conv1.weight.sum(-1), state["layer1.0.conv1.weight"])
    # a volume constant along the last axis: away from its two ends (the receptive field of the stem
    # and four 3^3 convs is 5 slices each way) every slice of the 3D features is the 2D feature map
    image = torch.randn(1, 1, 16, 16)
    f2 = dst2(image)[0]
    f3 = dst3(image.unsqueeze(-1).repeat(1, 1, 1, 1, 16))[0]
    for k in range(5, 11):
        torch.testing.assert_close(f3[..., k], f2, rtol=1e-4, atol=1e-5)


def convnext(d=2):
    torch.manual_seed(2)
    return build_encoder("convnext_tiny", spatial_dims=d, base_channels=8, depths=(1, 1, 1, 1),
                         layer_scale=0.5).eval()


def as_official_convnext(enc):
    """facebookresearch/ConvNeXt (and SparK's ConvNeXt): stages.N.M.*, final norm + head."""
    s = {k.replace("stages_.", "stages."): v for k, v in enc.state_dict().items()}
    s.update({"norm.weight": torch.ones(64), "norm.bias": torch.zeros(64), "head.weight": torch.randn(5, 64),
              "head.bias": torch.zeros(5)})
    return s


def as_timm_convnext(enc):
    out = {}
    for k, v in enc.state_dict().items():
        parts = k.split(".")
        if k.startswith("downsample_layers.0."):
            out["stem." + ".".join(parts[2:])] = v
        elif k.startswith("downsample_layers."):
            out[f"stages.{parts[1]}.downsample." + ".".join(parts[2:])] = v
        else:  # stages_.N.M.<name>...
            name = {"dwconv": "conv_dw", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2"}.get(parts[3], parts[3])
            out[f"stages.{parts[1]}.blocks.{parts[2]}." + ".".join([name, *parts[4:]])] = v
    out.update({"head.norm.weight": torch.ones(64), "head.fc.weight": torch.randn(5, 64)})
    return out


@pytest.mark.parametrize("layout", ["convnext", "timm-convnext"])
def test_convnext_layouts_round_trip(tmp_path, layout):
    src = convnext()
    state = as_official_convnext(src) if layout == "convnext" else as_timm_convnext(src)
    if layout == "timm-convnext":
        assert {"stem.0.weight", "stem.1.weight", "stages.1.downsample.1.weight",
                "stages.0.blocks.0.conv_dw.weight", "stages.0.blocks.0.mlp.fc1.weight",
                "stages.0.blocks.0.gamma"} <= set(state)
    else:
        assert {"downsample_layers.0.0.weight", "stages.0.0.dwconv.weight", "stages.3.0.pwconv2.weight",
                "stages.0.0.gamma", "head.weight"} <= set(state)
    assert detect_layout(state) == layout
    dst = convnext()
    for p in dst.parameters():
        torch.nn.init.zeros_(p)
    report = load_pretrained(dst, save(state, tmp_path / "cnx.pth"), verbose=False)
    assert not report.missing and not report.mismatched
    x = torch.randn(2, 1, 64, 64)
    for a, b in zip(dst(x), src(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_monai_and_medmim_exports_still_load(tmp_path):
    from monai.networks.nets import ViT as MonaiViT

    from medmim.models.export import export_encoder

    theirs = MonaiViT(in_channels=1, img_size=16, patch_size=4, hidden_size=24, mlp_dim=96, num_layers=2, num_heads=2,
                      spatial_dims=2, classification=False, pos_embed_type="learnable")  # qkv_bias False
    path = save(theirs.state_dict(), tmp_path / "monai.pt")
    ours = build_encoder("vit_tiny", img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2).eval()
    report = load_pretrained(ours, path, verbose=False)  # zero qkv biases are filled in, not "missing"
    assert not report.missing and torch.count_nonzero(ours.blocks[0].attn.qkv.bias) == 0
    x = torch.randn(1, 1, 16, 16)
    torch.testing.assert_close(ours(x)[0].flatten(2).transpose(1, 2), theirs(x)[0], rtol=1e-5, atol=1e-5)
    src = resnet()
    export_encoder(src, tmp_path / "run", {"architecture": "resnet18"})
    dst = resnet()
    report = load_pretrained(dst, tmp_path / "run" / "encoder.safetensors", verbose=False)
    assert report.ok and all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(), src.state_dict().values()))


def test_cli_flags_set_the_finetune_keys():
    from medmim.cli import _cfg, build_parser

    args = build_parser().parse_args(["finetune", "-c", "demo", "--init", "x.pth", "--inflate", "--allow-partial"])
    cfg = _cfg(args)
    assert cfg.finetune.init_inflate and cfg.finetune.init_allow_partial
    cfg = _cfg(build_parser().parse_args(["study", "-c", "demo"]))
    assert not cfg.finetune.init_inflate and not cfg.finetune.init_allow_partial


def test_convert_state_names_only_medmim_keys():
    src = vit(pos_embed="learned")
    conv = convert_state(as_mae_layout(src), vit())
    assert conv.layout == "mae"
    assert set(conv.state) == set(src.state_dict())
    assert math.isclose(float(conv.state["pos_embed"].mean()), float(src.pos_embed.detach().mean()), rel_tol=1e-6)
