"""Out-of-memory on the GPU: recognised, freed, and (what no smaller piece can avoid) one line naming the setting
to lower, a failed trial in ``kk tune``; and ``kk train --plan``'s bytes per GPU."""

from __future__ import annotations

from .errors import KKError


class OutOfMemory(KKError):
    """The GPU ran out of memory and nothing smaller could be tried; the message names what to lower."""


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error: ``torch.OutOfMemoryError`` (CUDA's), or one of the
    messages accelerate's ``should_reduce_batch_size`` recognises (cuDNN, CPU allocator...)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    try:
        from accelerate.utils.memory import should_reduce_batch_size
    except ImportError:  # accelerate is a dependency of peft; this is only a safety net
        return False
    return should_reduce_batch_size(exc)


def free_memory(device=None, device_map: dict | None = None) -> None:
    """Collect the garbage a model or an out-of-memory error left (peft and transformers models hold reference cycles,
    so ``del`` alone frees nothing; an error's traceback holds its tensors), then return the allocator's cached blocks
    to the driver on the GPU(s) of ``device`` / ``device_map`` ONLY (inside ``torch.cuda.device(i)``: ``empty_cache``
    on another device would stall the thread working there, the kernel's other GPU)."""
    import gc

    import torch

    gc.collect()
    if not torch.cuda.is_available():
        return
    indices = set()
    for d in [device, *(device_map or {}).values()]:
        if isinstance(d, int) or str(getattr(d, "type", d)).startswith("cuda"):
            index = d if isinstance(d, int) else torch.device(d).index
            indices.add(torch.cuda.current_device() if index is None else index)
    for i in sorted(indices):
        with torch.cuda.device(i):
            torch.cuda.empty_cache()


# --- kk train --plan: bytes per GPU before any weight is read -------------------------------------------------------

GIB = 2**30
HEADROOM = 0.9  # of a GPU's memory: the rest is CUDA's context, the allocator's fragmentation and validation
PARTS = ("weights", "gradients", "optimizer state", "activations")


def plan_memory(cfg, gpus: int, strategy: str, zero_stage: int = 0) -> dict:
    """Per-GPU bytes of PARTS for training ``cfg`` on ``gpus`` GPUs under ``strategy`` (ddp, fsdp, deepspeed at
    ``zero_stage``), from the backbone's config on the meta device. Estimates: fp32 master weights and grads (autocast,
    FSDP's fp32 shards; DeepSpeed: a 16-bit model + fp32 master copy); AdamW 8 bytes a trained parameter; activations 34
    bytes per token and hidden unit per layer (16-bit, flash/SDPA attention: Korthikanti et al. 2022), with checkpointing
    2 per layer + one layer's 34; a micro-batch's tokens = train.max_tokens, else batch_size x max_length."""
    import torch
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from .modeling import base_weights, is_head_param, lora_targets
    from .task import get_task

    try:
        conf = AutoConfig.from_pretrained(base_weights(cfg.model), num_labels=get_task(cfg.task).n_classes)
    except (OSError, ValueError) as e:
        raise KKError(f"model.backbone {cfg.model.backbone}: cannot read its config ({str(e).splitlines()[0]})") from None
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(conf)
    targets, lora = set(lora_targets(model, cfg.lora) or PEFT_TARGETS.get(conf.model_type, ())), cfg.lora.enabled
    n = linear = trained = 0
    for name, m in model.named_modules():
        own, head = sum(p.numel() for p in m.parameters(recurse=False)), is_head_param(name)
        n, linear = n + own, linear + (m.weight.numel() if isinstance(m, torch.nn.Linear) and not head else 0)
        lora_here = lora and isinstance(m, torch.nn.Linear) and name.split(".")[-1] in targets
        trained += own if head or not lora else cfg.lora.r * (m.in_features + m.out_features) if lora_here else 0
    ds, quant = strategy == "deepspeed", {"4bit": 0.5, "8bit": 1.0}.get(cfg.model.quantization) if lora else None
    per = 2 if ds else 4  # DeepSpeed holds the model in 16-bit; its fp32 master copy counts as optimizer state
    shard_w, shard_o, shard_g = (gpus if strategy == "fsdp" or (ds and zero_stage >= k) else 1 for k in (3, 1, 2))
    base = quant * linear + 2 * (n - linear) if quant else per * n
    weights = (base + per * trained * lora) / shard_w + (4 * n / conf.num_hidden_layers if shard_w > 1 else 0)
    tokens = (cfg.train.max_tokens if isinstance(cfg.train.max_tokens, int) else 0) or cfg.train.batch_size * cfg.model.max_length
    ckpt = cfg.model.gradient_checkpointing
    acts = tokens * conf.hidden_size * ((2 if ckpt else 34) * conf.num_hidden_layers + 32 * ckpt)
    return {"weights": weights, "gradients": 4 * trained / shard_g, "optimizer state": (8 + 4 * ds) * trained / shard_o,
            "activations": acts, "parameters": n, "trained": trained, "tokens": tokens}


def plan_verdict(cfg, gpus: int, strategy: str, gpu_gib: float, zero_stage: int = 0) -> tuple[dict, float, list[str]]:
    """(the plan, its GiB per GPU, the knobs that would each make it fit: [] when it fits)."""
    def need(c=cfg, g=gpus, st=strategy) -> float:
        p = plan_memory(c, g, st, zero_stage)
        return sum(p[k] for k in PARTS) / GIB

    def fits(c=cfg, g=gpus, st=strategy) -> bool:
        return need(c, g, st) <= HEADROOM * gpu_gib

    def with_(key, value):
        section, name = key.split(".")
        return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update={name: value})})

    plan, total = plan_memory(cfg, gpus, strategy, zero_stage), need()
    if total <= HEADROOM * gpu_gib:
        return plan, total, []
    sharded = "fsdp" if strategy == "ddp" else strategy
    more = next((g for g in (2, 4, 8, 16, 32, 64) if g > gpus and fits(g=g, st=sharded)), None)
    key = "train.max_tokens" if isinstance(cfg.train.max_tokens, int) and cfg.train.max_tokens else "model.max_length"
    now = plan["tokens"] if key == "train.max_tokens" else cfg.model.max_length
    shorter = next((v for v in (now * 3 // 4, now // 2, now // 4) if v >= 128 and fits(with_(key, v))), None)
    knobs = [f"train.strategy=fsdp ({gpus} GPUs)" if strategy == "ddp" and gpus > 1 and fits(st="fsdp") else "",
             f"--gpus {more}" + (" with train.strategy=fsdp" if strategy == "ddp" else "") if more else "",
             "model.quantization=4bit" if cfg.lora.enabled and cfg.model.quantization == "none"
             and fits(with_("model.quantization", "4bit")) else "",
             "model.gradient_checkpointing=true" if not cfg.model.gradient_checkpointing
             and fits(with_("model.gradient_checkpointing", True)) else "",
             f"{key}={shorter}" if shorter else ""]
    return plan, total, [k for k in knobs if k] or ["a smaller backbone"]


def check_fits(cfg, gpus: int, strategy: str, gpu_gib: float) -> None:
    """``kk train`` before loading onto a GPU: one line naming the knobs when the plan cannot fit even one row of
    model.max_length a micro-batch (what the out-of-memory re-splitting of larger micro-batches can go down to)."""
    one_row = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": 1, "max_tokens": 0})})
    _, need, knobs = plan_verdict(one_row, gpus, strategy, gpu_gib, zero_stage_of(cfg, strategy))
    if knobs:
        raise OutOfMemory(f"training {cfg.model.backbone} needs about {need:.3g} GiB per GPU at one row of {cfg.model.max_length} "
                          f"tokens, more than {HEADROOM:.0%} of {gpu_gib:.3g} GiB; fits with: {'; '.join(knobs)} (kk train --plan shows the parts)")


def zero_stage_of(cfg, strategy: str) -> int:
    from .train import deepspeed_json

    return int(deepspeed_json(cfg.train.deepspeed)[1].get("zero_optimization", {}).get("stage", 0)) if strategy == "deepspeed" else 0
