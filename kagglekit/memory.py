"""Out-of-memory on the GPU: recognised, freed, and turned into one line that names the setting to lower.

Training, inference and the ``auto`` budget probes retry with smaller pieces when the GPU runs out of memory
(see ``kagglekit.train.fit`` and ``kagglekit.inference.infer_logits``); what cannot be made smaller (one
sequence that does not fit) becomes :class:`OutOfMemory`, a :class:`KKError`: ``error: ...`` on the command
line, a failed trial (marked, the study goes on) in ``kk tune``.
"""

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


def plan_memory(cfg, gpus: int, strategy: str, zero_stage: int = 0) -> dict:
    """Per-GPU bytes of weights, gradients, AdamW state and activations for training ``cfg`` on ``gpus`` GPUs under
    ``strategy`` (ddp, fsdp, deepspeed at ``zero_stage``), from the backbone's config on the meta device. Estimates:
    kagglekit keeps fp32 master weights and grads (autocast; FSDP's fp32 shards; DeepSpeed's bf16 model + fp32 master);
    activations ~34 bytes per token and hidden unit per layer in 16-bit (Korthikanti et al. 2022, flash/SDPA attention),
    with checkpointing 2 per layer plus one layer's 34; micro-batch tokens = train.max_tokens, else batch_size x max_length."""
    import torch
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from .modeling import base_weights, is_head_param, lora_targets
    from .task import get_task

    try:
        conf = AutoConfig.from_pretrained(base_weights(cfg.model))
    except (OSError, ValueError) as e:
        raise KKError(f"model.backbone {cfg.model.backbone}: cannot read its config ({str(e).splitlines()[0]})") from None
    conf.num_labels = get_task(cfg.task).n_classes
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(conf)
    targets = set(lora_targets(model, cfg.lora) or PEFT_TARGETS.get(conf.model_type, ()))
    n = linear = trainable = 0
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        n += own
        head = is_head_param(name)
        if isinstance(module, torch.nn.Linear) and not head:
            linear += module.weight.numel()
            if cfg.lora.enabled and name.split(".")[-1] in targets:
                trainable += cfg.lora.r * (module.in_features + module.out_features)
        if head or not cfg.lora.enabled:
            trainable += own
    quant = {"4bit": 0.5, "8bit": 1.0}.get(cfg.model.quantization)
    ds = strategy == "deepspeed"
    per = 2 if ds else 4  # DeepSpeed holds the model in 16-bit; its fp32 master copy counts as optimizer state
    shard_w = gpus if strategy == "fsdp" or zero_stage == 3 else 1
    shard_o = gpus if strategy == "fsdp" or (ds and zero_stage >= 1) else 1
    shard_g = gpus if strategy == "fsdp" or (ds and zero_stage >= 2) else 1
    base = quant * linear + 2 * (n - linear) if cfg.lora.enabled and quant else per * n
    weights = (base + per * trainable * cfg.lora.enabled) / shard_w
    layers, hidden = getattr(conf, "num_hidden_layers", 1), getattr(conf, "hidden_size", 1)
    if shard_w > 1:  # one layer's weights gathered whole in 16-bit, and the next one prefetched
        weights += 2 * 2 * n / layers
    budget = cfg.train.max_tokens if isinstance(cfg.train.max_tokens, int) and cfg.train.max_tokens else 0
    tokens = budget or cfg.train.batch_size * cfg.model.max_length
    per_layer = 2 if cfg.model.gradient_checkpointing else 34
    return {"weights": weights, "gradients": 4 * trainable / shard_g, "optimizer state": (8 + 4 * ds) * trainable / shard_o,
            "activations": tokens * hidden * (per_layer * layers + 32 * cfg.model.gradient_checkpointing),
            "parameters": n, "trainable": trainable, "tokens": tokens}


def plan_verdict(cfg, gpus: int, strategy: str, gpu_gib: float, zero_stage: int = 0) -> tuple[dict, float, list[str]]:
    """(the plan, its GiB per GPU, the knobs that would each make it fit: [] when it fits)."""
    plan = plan_memory(cfg, gpus, strategy, zero_stage)

    def total(p) -> float:
        return sum(p[k] for k in ("weights", "gradients", "optimizer state", "activations")) / GIB

    need = total(plan)
    if need <= HEADROOM * gpu_gib:
        return plan, need, []

    def fits(c=cfg, g=gpus, st=strategy) -> bool:
        return total(plan_memory(c, g, st, zero_stage)) <= HEADROOM * gpu_gib

    def with_(key, value):
        section, field = key.split(".")
        return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update={field: value})})

    knobs = []
    if strategy == "ddp" and fits(st="fsdp"):
        knobs.append(f"train.strategy=fsdp ({gpus} GPUs)")
    more = next((g for g in (2, 4, 8, 16, 32, 64) if g > gpus and fits(g=g, st="fsdp" if strategy == "ddp" else strategy)), None)
    if more:
        knobs.append(f"--gpus {more}" + (" with train.strategy=fsdp" if strategy == "ddp" else ""))
    if cfg.lora.enabled and cfg.model.quantization == "none" and fits(with_("model.quantization", "4bit")):
        knobs.append("model.quantization=4bit")
    if not cfg.model.gradient_checkpointing and fits(with_("model.gradient_checkpointing", True)):
        knobs.append("model.gradient_checkpointing=true")
    key = "train.max_tokens" if isinstance(cfg.train.max_tokens, int) and cfg.train.max_tokens else "model.max_length"
    now = plan["tokens"] if key == "train.max_tokens" else cfg.model.max_length
    shorter = next((v for v in (now * 3 // 4, now // 2, now // 4) if v >= 128 and fits(with_(key, v))), None)
    if shorter:
        knobs.append(f"{key}={shorter}")
    return plan, need, knobs or ["a smaller backbone"]


def check_fits(cfg, gpus: int, strategy: str, gpu_gib: float) -> None:
    """``kk train`` before loading onto a GPU: one line naming the knobs when the plan cannot fit."""
    plan, need, knobs = plan_verdict(cfg, gpus, strategy, gpu_gib, zero_stage_of(cfg, strategy))
    if knobs:
        raise OutOfMemory(f"training {cfg.model.backbone} needs about {need:.3g} GiB per GPU, more than {HEADROOM:.0%} of "
                          f"{gpu_gib:.3g} GiB; fits with: {'; '.join(knobs)} (kk train --plan shows the parts)")


def zero_stage_of(cfg, strategy: str) -> int:
    if strategy != "deepspeed":
        return 0
    from .train import deepspeed_json

    return int(deepspeed_json(cfg.train.deepspeed)[1].get("zero_optimization", {}).get("stage", 0))
