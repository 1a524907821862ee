"""``predict.engine: vllm``: vLLM's classify (pooling) runner over one plain decoder classifier (``kk merge --unload`` or
``kk quantize``: Marlin kernels on a T4), as the WSDM Cup 3rd/4th places ran it: prefix caching, one engine per GPU,
tensor parallel 2 for a model placed over both. Logits are its class log-probabilities (its output is softmaxed)."""

from __future__ import annotations

import os

import numpy as np

from .errors import KKError

CHUNK = 256  # rows per LLM.classify call: progress (the time budget, the uncertain second pass) after each


class VLLMEngine:
    def __init__(self, folds: list, backbone=None, device=None, device_map: dict | None = None, overrides=None):
        import json

        import torch

        from .engine import LOAD_LOCK
        from .formatting import Formatter
        from .modeling import load_tokenizer

        if len(folds) != 1 or folds[0].adapter:
            raise KKError(f"predict.engine=vllm serves one plain model (kk merge --unload / kk quantize), not {folds[0].path}: use hf")
        self.fold, self.cfg = folds[0], folds[0].inference(overrides)
        self.task, self.device = self.fold.task, torch.device(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
        gemma2 = json.loads((self.fold.path / "config.json").read_text()).get("model_type") == "gemma2"
        if gemma2 and self.device.type == "cuda" and torch.cuda.get_device_capability(self.device) < (8, 0):
            raise KKError(f"{self.fold.path}: vLLM has no Gemma-2 logit softcap on compute capability < 8 (T4; vllm #8929): use predict.engine=hf")
        try:
            import vllm
        except ImportError:
            raise KKError("predict.engine=vllm needs vllm (pip install vllm; kk kernel bundles its wheel)") from None
        self.fmt = Formatter.from_config(load_tokenizer(str(self.fold.path)), self.cfg.inference_model())
        tp = 2 if len({v for v in (device_map or {}).values() if isinstance(v, int)}) > 1 else 1
        with LOAD_LOCK:  # vLLM's engine process takes the GPUs visible when it starts
            old = os.environ.get("CUDA_VISIBLE_DEVICES")
            if tp == 1 and self.device.index is not None:
                os.environ["CUDA_VISIBLE_DEVICES"] = str(self.device.index)
            try:
                self.llm = vllm.LLM(model=str(self.fold.path), runner="pooling", convert="classify", dtype="half", seed=self.cfg.seed,
                                    tensor_parallel_size=tp, enable_prefix_caching=True, enforce_eager=True,
                                    max_model_len=self.fmt.max_length + 8)
            finally:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None) if old is None else os.environ.update(CUDA_VISIBLE_DEVICES=old)

    def config(self, fold):
        return self.cfg

    def formatter(self, fold):
        return self.fmt

    def use(self, fold) -> None:
        if fold is not self.fold:
            raise KKError(f"{getattr(fold, 'path', fold)} is not this engine's fold")

    def logits(self, seqs, segs=None, on_rows=None) -> np.ndarray:
        out = np.zeros((len(seqs), self.task.n_classes), dtype=np.float32)
        order = np.argsort([len(s) for s in seqs], kind="stable")
        for b in range(0, len(order), CHUNK):
            res = self.llm.classify([{"prompt_token_ids": [int(t) for t in seqs[i]]} for i in order[b : b + CHUNK]], use_tqdm=False)
            out[order[b : b + CHUNK]] = np.log(np.clip([r.outputs.probs for r in res], 1e-30, None))
            if on_rows:
                on_rows(len(res))
        return out

    def close(self) -> None:
        from .memory import free_memory

        self.llm = None
        free_memory(self.device)
