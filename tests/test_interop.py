"""Checkpoints are plain `transformers` folders: stock transformers reads ours and we read theirs."""

import json
import subprocess
import sys
import textwrap

import torch
import transformers

from apertus_hf import ApertusForCausalLM
from tests.helpers import model_pair, randomize_xielu, tiny_config

# Runs in a fresh interpreter that never imports apertus_hf, so only the built-in Apertus can load the folder.
STOCK_LOADER = textwrap.dedent(
    """
    import sys, torch, transformers
    folder = sys.argv[1]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert type(model) is transformers.models.apertus.ApertusForCausalLM, type(model)
    assert "apertus_hf" not in sys.modules
    input_ids = torch.load(f"{folder}/input_ids.pt")
    with torch.no_grad():
        logits = model(input_ids).logits
        generated = model.generate(input_ids, max_new_tokens=6, do_sample=False, pad_token_id=3)
    torch.save({"logits": logits, "generated": generated}, f"{folder}/stock_outputs.pt")
    """
)


def test_folder_saved_by_us_loads_in_stock_transformers(tmp_path):
    model = ApertusForCausalLM(tiny_config(num_key_value_heads=1, head_dim=24))
    randomize_xielu(model)
    model.eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    input_ids = torch.randint(4, 256, (2, 9))
    torch.save(input_ids, tmp_path / "input_ids.pt")

    subprocess.run([sys.executable, "-c", STOCK_LOADER, str(tmp_path)], check=True, timeout=300)

    stock_outputs = torch.load(tmp_path / "stock_outputs.pt")
    with torch.no_grad():
        logits = model(input_ids).logits
        generated = model.generate(input_ids, max_new_tokens=6, do_sample=False, pad_token_id=3)
    assert (logits - stock_outputs["logits"]).abs().max().item() < 1e-5
    assert torch.equal(generated, stock_outputs["generated"])


def test_folder_saved_by_stock_transformers_loads_into_ours(tmp_path):
    _, stock = model_pair(tiny_config())
    stock.save_pretrained(tmp_path / "stock")
    ApertusForCausalLM.from_pretrained(tmp_path / "stock").save_pretrained(tmp_path / "ours")

    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "stock").eval()
    assert type(ours) is ApertusForCausalLM
    input_ids = torch.randint(4, 256, (2, 9))
    with torch.no_grad():
        assert (ours(input_ids).logits - stock(input_ids).logits).abs().max().item() < 1e-5

    stock_config = json.loads((tmp_path / "stock" / "config.json").read_text())
    ours_config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert stock_config.keys() == ours_config.keys()
    assert stock_config == ours_config


def test_bfloat16_round_trip_keeps_dtype_and_weights(tmp_path):
    model = ApertusForCausalLM(tiny_config()).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = ApertusForCausalLM.from_pretrained(tmp_path)
    assert reloaded.dtype == torch.bfloat16
    for (name, tensor), reloaded_tensor in zip(model.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(tensor, reloaded_tensor), name
