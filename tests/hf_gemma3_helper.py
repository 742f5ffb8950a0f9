"""Test helper run by the PEFT side-environment (.venv-peft: torch, transformers, peft), never imported.

    python tests/hf_gemma3_helper.py logits SPEC_JSON OUT_NPZ [SPEC_JSON OUT_NPZ ...]

SPEC_JSON: {"hf_class": "Gemma3ForCausalLM" | "Gemma3ForConditionalGeneration",
            "text_config": Gemma3TextConfig fields, "base": a .safetensors of the text model's weights
            with keys "model.<...>" (or, instead, "gguf_dir" and "gguf": a GGUF file that
            transformers loads itself),
            "adapter": a PEFT folder or null, "tokens": [[...], ...]}
Builds the Hugging Face Gemma 3 model in float32 (eager attention), loads the base weights (the
multimodal class gets a tiny random SigLIP tower, unused by text input), applies the adapter with
PeftModel.from_pretrained, and writes logits (B, T, V) and the names of the adapted modules.
"""

import json
import pathlib
import sys

import numpy as np
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import (
  Gemma3Config,
  Gemma3ForCausalLM,
  Gemma3ForConditionalGeneration,
  Gemma3TextConfig,
)

TINY_SIGLIP = {
  "hidden_size": 16,
  "intermediate_size": 32,
  "num_hidden_layers": 1,
  "num_attention_heads": 2,
  "image_size": 28,
  "patch_size": 14,
}


def build(spec: dict) -> torch.nn.Module:
  torch.manual_seed(0)
  if spec.get("gguf"):
    return Gemma3ForCausalLM.from_pretrained(
      spec["gguf_dir"], gguf_file=spec["gguf"], dtype=torch.float32, attn_implementation="eager"
    )
  text = Gemma3TextConfig(**spec["text_config"])
  state = load_file(spec["base"])
  if spec["hf_class"] == "Gemma3ForCausalLM":
    model = Gemma3ForCausalLM(text)
  else:
    config = Gemma3Config(text_config=text.to_dict(), vision_config=TINY_SIGLIP, mm_tokens_per_image=4)
    model = Gemma3ForConditionalGeneration(config)
    state = {"model.language_model." + k[len("model.") :]: v for k, v in state.items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert not unexpected, unexpected
  assert all(k.startswith(("model.vision_tower", "model.multi_modal_projector", "lm_head")) for k in missing), missing
  model.tie_weights()
  model.config._attn_implementation = "eager"
  return model.eval()


def main(argv):
  torch.set_num_threads(1)
  command, rest = argv[1], argv[2:]
  if command != "logits" or not rest or len(rest) % 2:
    sys.exit(__doc__)
  for spec_path, out in zip(rest[::2], rest[1::2]):
    logits(json.loads(pathlib.Path(spec_path).read_text()), out)


def logits(spec: dict, out: str) -> None:
  model = build(spec)
  adapted = []
  if spec.get("adapter"):
    model = PeftModel.from_pretrained(model, spec["adapter"]).eval()
    adapted = sorted(n for n, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer))
  with torch.no_grad():
    logits = model(input_ids=torch.tensor(spec["tokens"])).logits
  np.savez(out, logits=logits.float().numpy(), adapted=np.array(adapted, dtype=str))


if __name__ == "__main__":
  main(sys.argv)
