"""A fold's LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``), checked before anything is built.

kk train writes both files, but a damaged or hand-edited one must give one line naming the file and the key,
not a traceback from deep inside peft, nor an allocation sized by whatever ``r`` says (``r: 1e9`` asks for
hundreds of GB). :func:`read_adapter_config` checks the config's types and ranges and the weights' shapes
(read from the safetensors header: no tensor is loaded); :func:`check_adapter_fits` then checks the modules
against the loaded backbone.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .config import MAX_LORA_RANK
from .errors import KKError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # peft's prefix of the backbone's module names in the weights file


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def read_adapter_config(folder) -> dict:
    """The folder's adapter_config.json as a dict, once what kagglekit (and peft) rely on is checked (weights whose
    shapes agree with the rank included); KKError naming the file and key otherwise."""
    path = Path(folder) / ADAPTER_CONFIG
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KKError(f"{path} does not exist") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise KKError(f"{path}: not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(cfg, dict):
        raise KKError(f"{path}: not a JSON object")

    def bad(key: str, why: str):
        raise KKError(f"{path}: {key} {why} (got {cfg.get(key)!r:.60})")

    if cfg.get("peft_type") != "LORA":
        bad("peft_type", "must be LORA (kagglekit trains LoRA adapters)")
    if cfg.get("task_type") not in (None, "SEQ_CLS"):
        bad("task_type", "must be SEQ_CLS")
    if not _is_int(cfg.get("r")) or not 1 <= cfg["r"] <= MAX_LORA_RANK:
        bad("r", f"must be an integer from 1 to {MAX_LORA_RANK}")
    if not _is_number(cfg.get("lora_alpha")) or cfg["lora_alpha"] <= 0:
        bad("lora_alpha", "must be a positive number")
    dropout = cfg.get("lora_dropout", 0.0)
    if not _is_number(dropout) or not 0 <= dropout < 1:
        bad("lora_dropout", "must be a number in [0, 1)")
    tm = cfg.get("target_modules")
    if tm is not None and not isinstance(tm, str) and not (isinstance(tm, list) and all(isinstance(t, str) for t in tm)):
        bad("target_modules", "must be a regular expression or a list of module names")
    if isinstance(tm, str) and tm != "all-linear":
        try:
            re.compile(tm)
        except re.error:
            bad("target_modules", "is not a valid regular expression")
    mts = cfg.get("modules_to_save")
    if mts is not None and not (isinstance(mts, list) and all(isinstance(m, str) for m in mts)):
        bad("modules_to_save", "must be a list of module names")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if key in cfg and not isinstance(cfg[key], bool):
            bad(key, "must be true or false")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key) not in (None, {}):
            bad(key, "is not supported (kagglekit trains one rank and alpha for every module)")
    if cfg.get("megatron_config") is not None or cfg.get("megatron_core") not in (None, "megatron.core"):
        bad("megatron_core", "is not supported (kagglekit adapters are plain LoRA)")
    _check_weight_shapes(Path(folder), cfg["r"])
    if isinstance(tm, list):
        # peft writes target_modules from a set: its order follows each process's hash seed, so folds trained in
        # separate processes list the same modules in another order. Sorted here, every comparison sees a set.
        cfg["target_modules"] = sorted(set(tm))
    return cfg


def adapter_modules(folder) -> dict[str, tuple[int, int]]:
    """{backbone module name: (in_features, out_features)} of the LoRA pairs in the weights file,
    read from its header alone."""
    from safetensors import safe_open

    from .io import safetensors_errors

    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise KKError(f"{path} does not exist")
    with safetensors_errors(path), safe_open(str(path), "pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    out = {}
    for key, a in shapes.items():
        if not key.endswith(".lora_A.weight"):
            continue
        b = shapes.get(key.replace(".lora_A.", ".lora_B."))
        if len(a) != 2 or b is None or len(b) != 2:
            raise KKError(f"{path}: {key} has no 2-D lora_B partner; not a LoRA adapter kagglekit can load")
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        out[name[: -len(".lora_A.weight")]] = (a[1], b[0], a[0], b[1])  # in, out, rank of A, rank of B
    return out


def _check_weight_shapes(folder: Path, r: int) -> None:
    path = folder / ADAPTER_WEIGHTS
    for module, (fan_in, fan_out, ra, rb) in adapter_modules(folder).items():
        if ra != r or rb != r:
            raise KKError(f"{folder / ADAPTER_CONFIG}: r is {r} but {path.name} holds rank {ra if ra != r else rb} for {module}")
        if r > min(fan_in, fan_out):
            raise KKError(f"{folder / ADAPTER_CONFIG}: r {r} does not fit {module} ({fan_in} -> {fan_out} features)")


def check_adapter_fits(folder, cfg: dict, model) -> None:
    """Before peft builds the adapter on ``model`` (the loaded backbone): every adapted module of the
    weights file exists in it with the same sizes, and target_modules names at least one of its modules."""
    path = Path(folder) / ADAPTER_CONFIG
    modules = dict(model.named_modules())
    for name, (fan_in, fan_out, _, _) in adapter_modules(folder).items():
        m = modules.get(name)
        if m is None:
            raise KKError(f"{Path(folder) / ADAPTER_WEIGHTS}: adapts {name}, which the backbone does not have "
                          f"(trained on another backbone?)")
        sizes = (getattr(m, "in_features", fan_in), getattr(m, "out_features", fan_out))
        if sizes != (fan_in, fan_out):
            raise KKError(f"{Path(folder) / ADAPTER_WEIGHTS}: {name} is {fan_in} -> {fan_out} features in the adapter "
                          f"but {sizes[0]} -> {sizes[1]} in the backbone (trained on another backbone?)")
    tm = cfg.get("target_modules")
    if tm is None or tm == "all-linear":
        return
    # peft's own matching: a regex must match a whole module name, a list entry a name or its last parts.
    if isinstance(tm, str):
        matched = any(re.fullmatch(tm, n) for n in modules)
    else:
        matched = any(n == t or n.endswith(f".{t}") for t in tm for n in modules)
    if not matched:
        raise KKError(f"{path}: target_modules {tm!r:.80} matches no module of the backbone")
