"""CeRA on diffusers models, built from configs (no downloads): a tiny UNet2DConditionModel
(CeRA on attention projections and ResNet convolutions) and a tiny Flux-style transformer.
diffusers' own adapter API (add_adapter, set_adapters with weights, the lora ``scale`` of
cross_attention_kwargs, disable/enable, delete) works on CeRA layers; CeRA's save/load path
(cera_rs.diffusion) round-trips; diffusers' LoRA file API and fuse_lora refuse CeRA
adapters, naming the CeRA way, and still serve LoRA adapters."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")  # in the dev extra; a user install may lack it

from diffusers import FluxTransformer2DModel, UNet2DConditionModel  # noqa: E402
from peft import LoraConfig  # noqa: E402

from cera_rs import CeraConfig, CeraConv, CeraLayer, CeraLinear, CeraMergeError  # noqa: E402
from cera_rs.diffusion import load_adapter, save_adapter  # noqa: E402
from conftest import max_rel  # noqa: E402

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_out"]


def unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    ).eval()


def flux(seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        axes_dims_rope=[2, 2, 4],
    ).eval()


def unet_inputs(n: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "sample": torch.randn(n, 4, 8, 8, generator=gen),
        "timestep": torch.tensor([1, 10][:n]),
        "encoder_hidden_states": torch.randn(n, 3, 8, generator=gen),
    }


def flux_inputs(n: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(n, 16, 4, generator=gen),
        "encoder_hidden_states": torch.randn(n, 5, 16, generator=gen),
        "pooled_projections": torch.randn(n, 8, generator=gen),
        "timestep": torch.tensor([0.2, 0.7][:n]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(5, 3),
    }


MODELS = {"unet": (unet, unet_inputs, UNET_TARGETS), "flux": (flux, flux_inputs, FLUX_TARGETS)}


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def adapted(kind: str, name: str = "default", seed: int = 0, **config):
    build, inputs, targets = MODELS[kind]
    model = build()
    model.add_adapter(CeraConfig(r=4, target_modules=targets, **config), adapter_name=name)
    randomize(model, name, seed)
    return model.eval(), inputs()  # new layers start in training mode, as LoRA's do


def randomize(model, name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, CeraLayer) and name in module.cera_B:
                weight = module.cera_B[name].weight
                weight.copy_(0.3 * torch.randn(weight.shape, generator=gen))


@pytest.mark.parametrize("kind", ["unet", "flux"])
def test_add_adapter_and_a_training_step(kind):
    build, inputs, targets = MODELS[kind]
    model = build()
    x = inputs()
    base = run(model, x)
    model.add_adapter(CeraConfig(r=4, target_modules=targets, cera_dropout=0.1))
    layers = [m for m in model.modules() if isinstance(m, CeraLayer)]
    assert any(isinstance(m, CeraLinear) for m in layers)
    if kind == "unet":  # the ResNets' convolutions too
        assert sum(isinstance(m, CeraConv) for m in layers) >= 4
    torch.testing.assert_close(run(model, x), base, rtol=0, atol=0)  # B starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".cera_" in n for n in trainable)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        opt.zero_grad()
        out = model(**x, return_dict=False)[0]
        out.pow(2).mean().backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    assert max_rel(run(model.eval(), x), base) > 1e-4


@pytest.mark.parametrize("kind", ["unet", "flux"])
def test_set_adapters_weights_disable_enable_delete(kind):
    model, x = adapted(kind, scaling=0.5)
    base = run(MODELS[kind][0](), x)
    full = run(model, x)
    assert max_rel(full, base) > 1e-3
    model.set_adapters(["default"], [0.0])
    torch.testing.assert_close(run(model, x), base, rtol=1e-6, atol=1e-6)
    model.set_adapters(["default"], [0.4])
    layers = [m for m in model.modules() if isinstance(m, CeraLayer)]
    assert {m.scaling["default"] for m in layers} == {0.2}  # the config's 0.5 times 0.4
    partial = run(model, x)
    assert max_rel(partial, base) > 1e-4 and max_rel(partial, full) > 1e-4
    model.set_adapters(["default"], [1.0])
    torch.testing.assert_close(run(model, x), full, rtol=0, atol=0)
    model.disable_adapters()
    torch.testing.assert_close(run(model, x), base, rtol=0, atol=0)
    model.enable_adapters()
    torch.testing.assert_close(run(model, x), full, rtol=0, atol=0)
    # a second adapter, both active with weights
    model.add_adapter(CeraConfig(r=2, target_modules=MODELS[kind][2]), adapter_name="other")
    randomize(model, "other", seed=1)
    model.eval()
    model.set_adapters(["default", "other"], [1.0, 0.5])
    assert model.active_adapters() == ["default", "other"]
    assert {m.scaling["other"] for m in layers if "other" in m.scaling} == {0.5}
    both = run(model, x)
    assert max_rel(both, full) > 1e-4
    model.delete_adapters("other")
    assert list(model.peft_config) == ["default"]
    assert not any("other" in m.cera_A for m in layers)
    model.set_adapters(["default"], [1.0])
    torch.testing.assert_close(run(model, x), full, rtol=0, atol=0)


def test_lora_scale_of_cross_attention_kwargs_scales_and_restores():
    """The UNet scales its adapters by cross_attention_kwargs' "scale" for one call
    (scale_layer, then unscale_layer), as set_adapters with that weight does."""
    model, x = adapted("unet")
    full = run(model, x)
    scaled = run(model, {**x, "cross_attention_kwargs": {"scale": 0.3}})
    model.set_adapters(["default"], [0.3])
    torch.testing.assert_close(scaled, run(model, x), rtol=1e-6, atol=1e-6)
    model.set_adapters(["default"], [1.0])
    torch.testing.assert_close(run(model, x), full, rtol=0, atol=0)
    assert max_rel(scaled, full) > 1e-4


@pytest.mark.parametrize("kind", ["unet", "flux"])
def test_save_and_load_back(kind, tmp_path):
    model, x = adapted(kind)
    expected = run(model, x)
    save_adapter(model, tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    fresh = MODELS[kind][0]()
    config = load_adapter(fresh, tmp_path / "adapter")
    fresh.eval()
    assert isinstance(config, CeraConfig) and list(fresh.peft_config) == ["default"]
    torch.testing.assert_close(run(fresh, x), expected, rtol=0, atol=0)
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if ".cera_" in n)
    # as a second adapter under another name, trainable
    load_adapter(fresh, tmp_path / "adapter", "again", is_trainable=True)
    assert any(p.requires_grad for n, p in fresh.named_parameters() if ".cera_A.again" in n)
    with pytest.raises(ValueError, match="already has an adapter named 'again'"):
        load_adapter(fresh, tmp_path / "adapter", "again")


def test_loading_into_another_architecture_is_refused(tmp_path):
    model, _ = adapted("unet")
    save_adapter(model, tmp_path)
    other = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    with pytest.raises(ValueError, match="size mismatch|do not fit"):
        load_adapter(other, tmp_path)


def test_diffusers_lora_file_api_and_fuse_refuse_cera(tmp_path):
    model, x = adapted("unet")
    expected = run(model, x)
    with pytest.raises(
        TypeError,
        match=r"save_lora_adapter writes LoRA weight files.*"
        r"cera_rs\.diffusion\.save_adapter",
    ):
        model.save_lora_adapter(tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
    with pytest.raises(CeraMergeError, match="fuse_lora is impossible for CeRA"):
        model.fuse_lora(lora_scale=0.5)
    assert {m.scaling["default"] for m in model.modules() if isinstance(m, CeraLayer)} == {1.0}
    torch.testing.assert_close(run(model, x), expected, rtol=0, atol=0)
    save_adapter(model, tmp_path / "cera")
    fresh = unet()
    for source in (
        tmp_path / "cera",
        {"unet." + k: v for k, v in model.state_dict().items() if ".cera_" in k},
    ):
        with pytest.raises(
            TypeError,
            match=r"load_lora_adapter reads LoRA weights.*"
            r"cera_rs\.diffusion\.load_adapter",
        ):
            fresh.load_lora_adapter(
                source, prefix="unet", weight_name="pytorch_lora_weights.safetensors"
            )
    assert not getattr(fresh, "peft_config", None)


def test_lora_adapters_still_go_to_diffusers(tmp_path):
    """The guard leaves LoRA alone: diffusers saves, loads and fuses it as before."""
    model = unet()
    x = unet_inputs()
    model.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    expected = run(model.eval(), x)
    model.save_lora_adapter(tmp_path)
    fresh = unet()
    # (diffusers looks for the .bin file unless told the name: it does so for LoRA too)
    fresh.load_lora_adapter(
        tmp_path,
        prefix=None,
        adapter_name="default",
        weight_name="pytorch_lora_weights.safetensors",
    )
    fresh.eval()
    torch.testing.assert_close(run(fresh, x), expected, rtol=1e-5, atol=1e-6)
    fresh.fuse_lora()
    torch.testing.assert_close(run(fresh, x), expected, rtol=1e-4, atol=1e-5)


def test_the_guard_waits_for_diffusers_and_import_cera_rs_does_not_import_it():
    """In a fresh process: cera_rs first, diffusers later (the order a script importing
    cera_rs at the top has), and the other way round."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "if sys.argv[1] == 'cera_rs first':\n"
        "    import cera_rs\n"
        "    assert 'diffusers' not in sys.modules\n"
        "from diffusers import UNet2DConditionModel\n"
        "import cera_rs\n"
        "from diffusers.loaders.peft import PeftAdapterMixin\n"
        "print(PeftAdapterMixin._cera_guarded, hasattr(UNet2DConditionModel.fuse_lora, "
        "'__wrapped__'))\n"
    )
    for order in ("cera_rs first", "diffusers first"):
        out = subprocess.run(
            [sys.executable, "-c", script, order], capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == ["True", "True"], order
