"""PEFT LoRA adapter folders: `adapter_config.json` + `adapter_model.safetensors`.

PEFT stores, per adapted layer `<name>` (the module's path in the base model),
    base_model.model.<name>.lora_A.weight: (r, d_in)     (lora_embedding_A: (r, num_embeddings))
    base_model.model.<name>.lora_B.weight: (d_out, r)    (lora_embedding_B: (embedding_dim, r))
and applies  ΔW = scale · B @ A  with  scale = alpha / r  (alpha / √r with `use_rslora`), where
r and alpha come from `rank_pattern` / `alpha_pattern` when one of their keys matches the module
(the first key k with  re.match(rf"(.*\\.)?({k})$", name), as peft.utils.other.get_pattern_key),
else from `r` / `lora_alpha`.

Scale folding (our choice): the output keeps `lora_alpha` and `use_rslora`, sets `r` to the target
rank, drops `alpha_pattern`, and writes `rank_pattern` only for modules whose target rank differs
from `r` (with `--energy`), each key anchored to exactly one module. The squeezed effective update
U_r S_r V_rᵀ of scale·B@A is stored as  B' = U_r √(S_r / scale_out),  A' = √(S_r / scale_out) V_rᵀ
with scale_out = lora_alpha / r_tgt (or / √r_tgt): PEFT then applies exactly the squeezed ΔW, and
the factors are balanced as a fresh rank-r_tgt PEFT adapter trained at the same alpha would be.

Tensors that are not LoRA factors (`modules_to_save`, trainable tokens) are copied byte for byte;
all other config fields and all other files in the folder are kept.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np

from lora_squeeze.adapters import safetensors_io
from lora_squeeze.adapters.errors import AdapterError
from lora_squeeze.adapters.modules import Factors, ModuleInfo, as_float32

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# (suffix of lora_A, suffix of lora_B) for Linear-like and Embedding layers.
_FACTOR_SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))
# Config switches whose adapters are not plain A/B products, so a squeeze would change them.
_UNSUPPORTED = {
  "use_dora": "DoRA rescales by the norm of W + ΔW, which a rank change alters",
  "lora_bias": "lora_B bias terms scale with alpha/r",
  "target_parameters": "parameter-targeted LoRA stores several experts' factors in one tensor",
  "use_qalora": "QA-LoRA's lora_A acts on group-pooled inputs",
  "use_bdlora": "BD-LoRA factors are block-diagonal",
  "kasa_config": "KaSA adds a learned diagonal of singular values",
  "monteclora_config": "MonteCLoRA samples its factors",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class _PeftModule:
  info: ModuleInfo
  key_a: str
  key_b: str
  dtype: np.dtype
  scale: float


def is_peft_folder(path: pathlib.Path) -> bool:
  return path.is_dir() and (path / CONFIG_FILE).is_file()


def pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
  """PEFT's rank_pattern/alpha_pattern lookup: the first key k matching (.*\\.)?(k)$, else default."""
  for key in patterns:
    if re.match(rf"(.*\.)?({key})$", name):
      return patterns[key]
  return default


def peft_scale(*, alpha: float, r: int, use_rslora: bool) -> float:
  """PEFT's LoRA scale: alpha / r, or alpha / √r with rsLoRA."""
  return alpha / math.sqrt(r) if use_rslora else alpha / r


def exact_pattern_key(name: str) -> str:
  """A rank_pattern key that matches the module `name` and no other module."""
  return "^" + re.escape(name)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PeftAdapter:
  """An opened PEFT adapter folder (config and tensor index; no tensor data held)."""

  path: pathlib.Path
  config: Mapping[str, Any]
  header: safetensors_io.SafetensorsHeader
  lora: Mapping[str, _PeftModule]
  format: str = "peft"

  @property
  def modules(self) -> tuple[ModuleInfo, ...]:
    return tuple(m.info for m in self.lora.values())

  @property
  def weights_path(self) -> pathlib.Path:
    return self.path / WEIGHTS_FILE

  def read(self, module: ModuleInfo) -> Factors:
    """a = √scale·Aᵀ: (d_in, r), b = √scale·Bᵀ: (r, d_out), so a @ b = (scale·B@A)ᵀ."""
    m = self.lora[module.name]
    a_raw, b_raw = safetensors_io.read_tensors(self.weights_path, (m.key_a, m.key_b))
    a = as_float32(a_raw, path=self.weights_path, tensor=m.key_a)
    b = as_float32(b_raw, path=self.weights_path, tensor=m.key_b)
    root = math.sqrt(m.scale)
    return a.T * root, b.T * root

  def write(self, target: pathlib.Path, squeezed: Mapping[str, Factors], *, provenance: Mapping[str, Any]) -> None:
    ranks = {name: a.shape[1] for name, (a, _) in squeezed.items()}
    config = _squeezed_config(self.config, ranks)
    alpha, rslora = config["lora_alpha"], bool(config.get("use_rslora", False))
    factor_keys = {}
    for name, (a, b) in squeezed.items():
      m = self.lora[name]
      root = math.sqrt(peft_scale(alpha=alpha, r=ranks[name], use_rslora=rslora))
      factor_keys[m.key_a] = (a.T / root).astype(m.dtype)
      factor_keys[m.key_b] = (b.T / root).astype(m.dtype)
    tensors = [(key, factor_keys.get(key, entry)) for key, entry in self.header.tensors.items()]
    target.mkdir()
    for item in self.path.iterdir():
      if item.name == CONFIG_FILE or item.name.startswith("adapter_model."):
        continue
      if item.is_dir():
        shutil.copytree(item, target / item.name, symlinks=True)
      else:
        shutil.copy2(item, target / item.name)
    # Provenance goes into the safetensors metadata: an unknown config key would make PEFT warn
    # that the adapter was saved by a newer PEFT.
    metadata = {**self.header.metadata, "lora_squeeze": json.dumps(dict(provenance), sort_keys=True)}
    safetensors_io.write_safetensors(target / WEIGHTS_FILE, tensors, metadata)
    (target / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _squeezed_config(config: Mapping[str, Any], ranks: Mapping[str, int]) -> dict:
  """The source config with r/rank_pattern/alpha_pattern rewritten for the squeezed ranks."""
  counts: dict[int, int] = {}
  for r in ranks.values():
    counts[r] = counts.get(r, 0) + 1
  # The most common rank becomes `r` (the larger one on a tie); the others go to rank_pattern.
  r_main = max(counts, key=lambda r: (counts[r], r))
  out = dict(config)
  out["r"] = r_main
  out["rank_pattern"] = {exact_pattern_key(name): r for name, r in ranks.items() if r != r_main}
  out["alpha_pattern"] = {}
  return out


def open_peft(path: str | pathlib.Path) -> PeftAdapter:
  """Opens and checks a PEFT LoRA folder: config, tensor index, A/B pairing, shapes vs the config."""
  path = pathlib.Path(path)
  config = _read_config(path / CONFIG_FILE)
  weights = path / WEIGHTS_FILE
  if not weights.is_file():
    others = sorted(p.name for p in path.glob("adapter_model.*"))
    raise AdapterError(
      f"{path}: no {WEIGHTS_FILE}"
      + (f" (found {', '.join(others)}; only the safetensors format is read)" if others else "")
    )
  header = safetensors_io.read_header(weights)
  lora = _pair_factors(config, header)
  if not lora:
    raise AdapterError(f"{weights}: no LoRA factors (keys ending in .lora_A.weight / .lora_B.weight)")
  return PeftAdapter(path=path, config=config, header=header, lora=lora)


def _read_config(path: pathlib.Path) -> dict[str, Any]:
  try:
    config = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise AdapterError(f"{path}: cannot read the PEFT config: {e}") from e
  if not isinstance(config, dict):
    raise AdapterError(f"{path}: the PEFT config is not a JSON object")
  if config.get("peft_type", "LORA") != "LORA":
    raise AdapterError(f"{path}: peft_type is {config.get('peft_type')!r}; only 'LORA' adapters can be squeezed")
  for field, why in _UNSUPPORTED.items():
    if config.get(field):
      raise AdapterError(f"{path}: {field}={config[field]!r} is not supported ({why})")
  r = config.get("r")
  if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
    raise AdapterError(f"{path}: r must be a positive integer, got {r!r}")
  if not _positive_number(config.get("lora_alpha")):
    # json.loads accepts NaN and Infinity, which would scale every factor to NaN.
    raise AdapterError(f"{path}: lora_alpha must be a finite positive number, got {config.get('lora_alpha')!r}")
  for field, check, allowed in (
    ("rank_pattern", _positive_int, "positive integers"),
    ("alpha_pattern", _positive_number, "finite positive numbers"),
  ):
    patterns = config.get(field) or {}
    if not isinstance(patterns, dict):
      raise AdapterError(f"{path}: {field} must be a JSON object, got {config[field]!r}")
    for key, value in patterns.items():
      if not check(value):
        raise AdapterError(f"{path}: {field}[{key!r}] = {value!r}; its values must be {allowed}")
      try:
        re.compile(rf"(.*\.)?({key})$")
      except re.error as e:
        raise AdapterError(f"{path}: {field} key {key!r} is not a valid regular expression ({e})") from None
  return config


def _positive_int(value: Any) -> bool:
  return not isinstance(value, bool) and isinstance(value, int) and value > 0


def _positive_number(value: Any) -> bool:
  return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _pair_factors(config: Mapping[str, Any], header: safetensors_io.SafetensorsHeader) -> dict[str, _PeftModule]:
  where = header.path
  pairs: dict[str, _PeftModule] = {}
  for key_a, entry_a in header.tensors.items():
    for suffix_a, suffix_b in _FACTOR_SUFFIXES:
      if key_a.endswith(suffix_a):
        break
    else:
      if any(key_a.endswith(sb) for _, sb in _FACTOR_SUFFIXES) and not _has_partner(key_a, header):
        raise AdapterError(f"{where}: tensor {key_a!r} has no matching lora_A tensor")
      continue
    stem = key_a[: -len(suffix_a)]
    key_b = stem + suffix_b
    entry_b = header.tensors.get(key_b)
    if entry_b is None:
      raise AdapterError(f"{where}: tensor {key_a!r} has no matching {key_b!r}")
    if len(entry_a.shape) != 2 or len(entry_b.shape) != 2:
      raise AdapterError(
        f"{where}: {key_a!r} {entry_a.shape} / {key_b!r} {entry_b.shape}: only 2-D (Linear, Embedding) "
        "LoRA factors can be squeezed"
      )
    (r_a, d_in), (d_out, r_b) = entry_a.shape, entry_b.shape
    if r_a != r_b:
      raise AdapterError(
        f"{where}: mismatched LoRA shapes: {key_a!r} is {entry_a.shape} (r, d_in) but "
        f"{key_b!r} is {entry_b.shape} (d_out, r)"
      )
    if entry_a.dtype != entry_b.dtype:
      raise AdapterError(f"{where}: {key_a!r} is {entry_a.dtype} but {key_b!r} is {entry_b.dtype}")
    name = stem[len(_PREFIX) :] if stem.startswith(_PREFIX) else stem
    r_config = pattern_value(config.get("rank_pattern") or {}, name, config["r"])
    if r_config != r_a:
      raise AdapterError(
        f"{where}: tensor {key_a!r} has rank {r_a} but the config gives module {name!r} r={r_config} "
        "(r / rank_pattern); PEFT could not load this adapter"
      )
    alpha = pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
    scale = peft_scale(alpha=alpha, r=r_a, use_rslora=bool(config.get("use_rslora", False)))
    pairs[name] = _PeftModule(
      info=ModuleInfo(name=name, r_src=r_a, d_in=d_in, d_out=d_out),
      key_a=key_a,
      key_b=key_b,
      dtype=safetensors_io.numpy_dtype(entry_a.dtype, where=where, tensor=key_a),
      scale=scale,
    )
  return pairs


def _has_partner(key_b: str, header: safetensors_io.SafetensorsHeader) -> bool:
  for suffix_a, suffix_b in _FACTOR_SUFFIXES:
    if key_b.endswith(suffix_b) and key_b[: -len(suffix_b)] + suffix_a in header.tensors:
      return True
  return False
