"""Mixed adapter batches: ``adapter_names=`` routes each row to its adapter
(``"__base__"``: none) in forward and generate, with PEFT LoRA's errors."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from models import tiny_llama
from peft import get_peft_model
from torch import nn

from cera_rs import CeraConfig, CeraLinear


def two_adapter_llama():
    config = CeraConfig(
        r=4, target_modules=["q_proj", "v_proj"], cera_dropout=0.1, task_type="CAUSAL_LM"
    )
    model = get_peft_model(tiny_llama(), config, "first")
    model.add_adapter("second", CeraConfig(r=2, target_modules=["v_proj"], activation="relu"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, CeraLinear):
                for b in module.cera_B.values():
                    b.weight.copy_(torch.randn(b.weight.shape, generator=gen))
    return model.eval()


@contextmanager
def only(model, name: str):
    """``name``'s adapter alone (none for "__base__"); the first adapter after."""
    if name == "__base__":
        with model.disable_adapter():
            yield
    else:
        model.set_adapter(name)
        yield
        model.set_adapter("first")


def test_layer_routes_rows_and_checks_length():
    torch.manual_seed(0)
    layer = CeraLinear(nn.Linear(8, 6), r=2, dropout=0.0, adapter_name="a")
    layer.update_layer("b", 3, dropout=0.0, activation="relu")
    for b in layer.cera_B.values():
        nn.init.normal_(b.weight)
    x = torch.randn(4, 5, 8)
    names = ["b", "__base__", "a", "b"]
    mixed = layer(x, adapter_names=names)
    for i, name in enumerate(names):
        layer.set_adapter(name) if name != "__base__" else None
        want = layer.base_layer(x[i]) if name == "__base__" else layer(x[i])
        torch.testing.assert_close(mixed[i], want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="should be the same as the number of inputs, but got 3"):
        layer(x, adapter_names=names[:3])


def test_forward_and_generate_route_each_row():
    model = two_adapter_llama()
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    names = ["second", "__base__", "first"]
    logits = model(input_ids=ids, adapter_names=names).logits
    for i, name in enumerate(names):
        with only(model, name):
            want = model(input_ids=ids[i : i + 1]).logits
        torch.testing.assert_close(logits[i : i + 1], want, rtol=1e-5, atol=1e-5)
    assert model.active_adapters == ["first"]
    for beams in (1, 2):
        kwargs = {"max_new_tokens": 5, "do_sample": False, "num_beams": beams, "pad_token_id": 0}
        out = model.generate(input_ids=ids, adapter_names=names, **kwargs)
        for i, name in enumerate(names):
            with only(model, name):
                want = model.generate(input_ids=ids[i : i + 1], **kwargs)
            assert torch.equal(out[i : i + 1], want), (beams, name)


def test_errors_match_lora_and_leave_no_hooks():
    model = two_adapter_llama()
    ids = torch.randint(0, 128, (2, 4))
    cases = [
        (["first"], ValueError, "Length of `adapter_names` should be the same"),
        (["first", "typo"], ValueError, "non-existing adapter\\(s\\): typo"),
        ("fs", TypeError, "expected a list of str"),
    ]
    for names, error, match in cases:
        with pytest.raises(error, match=match):
            model(input_ids=ids, adapter_names=names)
    model.train()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in train"):
        model(input_ids=ids, adapter_names=["first", "second"])
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_beam_search_on_an_encoder_decoder_keeps_the_encoder_batch():
    """With beams the decoder sees each input num_beams times, the encoder once."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    cera = CeraConfig(r=4, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")
    model = get_peft_model(T5ForConditionalGeneration(config), cera, "first")
    model.add_adapter("second", CeraConfig(r=2, target_modules=["v"], task_type="SEQ_2_SEQ_LM"))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, CeraLinear):
                for b in module.cera_B.values():
                    nn.init.normal_(b.weight, std=2.0)
    model.eval()
    ids = torch.randint(1, 64, (3, 7), generator=torch.Generator().manual_seed(1))
    names = ["second", "first", "__base__"]
    kwargs = {"max_new_tokens": 4, "do_sample": False, "num_beams": 2}
    out = model.generate(input_ids=ids, adapter_names=names, **kwargs)
    alone = []
    for i, name in enumerate(names):
        with only(model, name):
            alone.append(model.generate(input_ids=ids[i : i + 1], **kwargs)[0])
        assert torch.equal(out[i, : len(alone[-1])], alone[-1]), name
    with only(model, "first"):  # the adapters do change what is generated
        assert not torch.equal(model.generate(input_ids=ids[:1], **kwargs)[0], alone[0])
