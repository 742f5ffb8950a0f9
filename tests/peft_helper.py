"""Test helper run by the PEFT side-environment (.venv-peft, Python 3.11 + torch + peft), never imported.

The project itself needs neither torch nor peft; tests/test_adapters.py drives this script through
subprocess calls to make real PEFT adapters and to read back what PEFT does with ours:

  python tests/peft_helper.py build DIR SPEC_JSON [DIR SPEC_JSON ...]
      A tiny torch model (embedding, 2 blocks of q/o nn.Linear, head) with a PEFT LoRA on embed, q
      and o (random non-zero A and B, and a modified `modules_to_save` head), saved by
      save_pretrained(DIR). SPEC_JSON holds LoraConfig fields (r, lora_alpha, rank_pattern, ...)
      and "seed".
  python tests/peft_helper.py dump DIR NPZ [DIR NPZ ...]
      Loads DIR with PeftModel.from_pretrained onto the same base model and writes to NPZ:
      delta/<module> (peft's get_delta_weight, torch layout: (out, in), embeddings (num, dim)),
      r/<module>, scaling/<module>, base/<param> (the base model), head/weight, head/bias (the
      adapter's head), tokens and outputs (the model's outputs on fixed tokens).
"""

import json
import sys

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

VOCAB, D_MODEL, D_HIDDEN, N_LAYERS, N_OUT = 32, 16, 24, 2, 6
TARGETS = ["embed", "q", "o"]


class Block(nn.Module):
  def __init__(self):
    super().__init__()
    self.q = nn.Linear(D_MODEL, D_HIDDEN)
    self.o = nn.Linear(D_HIDDEN, D_MODEL)


class TinyModel(nn.Module):
  """outputs = head(h_L), h_0 = embed(tokens), h_{l+1} = h_l + o_l(tanh(q_l(h_l)))."""

  def __init__(self):
    super().__init__()
    self.embed = nn.Embedding(VOCAB, D_MODEL)
    self.layers = nn.ModuleList([Block() for _ in range(N_LAYERS)])
    self.head = nn.Linear(D_MODEL, N_OUT)

  def forward(self, tokens):
    h = self.embed(tokens)
    for layer in self.layers:
      h = h + layer.o(torch.tanh(layer.q(h)))
    return self.head(h)


def base_model() -> TinyModel:
  torch.manual_seed(0)
  return TinyModel().eval()


def build(folder: str, spec: dict) -> None:
  spec = dict(spec)
  generator = torch.Generator().manual_seed(spec.pop("seed", 1))
  config = LoraConfig(target_modules=TARGETS, modules_to_save=["head"], **spec)
  model = get_peft_model(base_model(), config)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "lora_" in name or "modules_to_save" in name:
        param.copy_(0.3 * torch.randn(param.shape, generator=generator))
  model.save_pretrained(folder)


def dump(folder: str, npz: str) -> None:
  base = base_model()
  out = {f"base/{k}": v.numpy().copy() for k, v in base.state_dict().items()}
  model = PeftModel.from_pretrained(base_model(), folder).eval()
  for name, module in model.base_model.model.named_modules():
    if isinstance(module, LoraLayer) and "default" in module.r:
      out[f"delta/{name}"] = module.get_delta_weight("default").detach().numpy()
      out[f"r/{name}"] = np.array(module.r["default"])
      out[f"scaling/{name}"] = np.array(module.scaling["default"])
  head = model.base_model.model.head.modules_to_save["default"]
  out["head/weight"], out["head/bias"] = head.weight.detach().numpy(), head.bias.detach().numpy()
  tokens = np.random.default_rng(0).integers(0, VOCAB, size=(3, 5))
  with torch.no_grad():
    out["outputs"] = model(torch.from_numpy(tokens)).numpy()
  out["tokens"] = tokens
  np.savez(npz, **out)


def main(argv: list[str]) -> None:
  torch.set_num_threads(1)
  command, rest = argv[1], argv[2:]
  if command not in ("build", "dump") or not rest or len(rest) % 2:
    sys.exit(__doc__)
  for first, second in zip(rest[::2], rest[1::2]):
    if command == "build":
      build(first, json.loads(second))
    else:
      dump(first, second)


if __name__ == "__main__":
  main(sys.argv)
