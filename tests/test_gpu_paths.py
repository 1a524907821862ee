"""GPU-only code paths, tested on CPU through simulated CUDA (tests/cudasim.py, tests/README.md): the device a
quantized load is given, DDP devices and sharded evaluation, a true fp32 recompute of overflowing rows, packing
without varlen attention, out-of-memory recovery, one fold model at a time, resuming on another GPU, the
overflow hint, the attention implementation per architecture (issue 19)."""

from __future__ import annotations

import json
from unittest import mock

import numpy as np
import pytest
from cudasim import OOM_MESSAGE, Stop, distributed_env, inject_oom, oom_after_load, simulated_cuda, spy

from conftest import REPO, predict_model, run_cli, tiny_config
from kagglekit.errors import KKError


def _llama(project, *overrides):
    return tiny_config(project, *overrides, arch="llama")


# --- 1, 8, 14: what a GPU load is given ----------------------------------------------------------------------------


@pytest.mark.parametrize("capability,dtype", [((7, 5), "float16"), ((9, 0), "bfloat16")])
def test_a_quantized_gpu_load_gets_a_device_index_and_its_compute_dtype(tiny_project, capability, dtype):
    """device_map={"": None} made transformers raise a TypeError at the first QLoRA load on a GPU; transformers 5's
    dtype="auto" left embeddings, norms and the heads in the checkpoint's bf16 on a T4."""
    pytest.importorskip("bitsandbytes")
    import torch
    from transformers import AutoModelForSequenceClassification

    from kagglekit.modeling import device_and_dtype, load_backbone, load_tokenizer

    cfg = _llama(tiny_project, "model.quantization=4bit")
    tok = load_tokenizer(cfg.model.backbone)
    with simulated_cuda(devices=2, capability=capability) as gpu:
        device, amp = device_and_dtype("auto")
        assert str(device) == "cuda:0" and amp == getattr(torch, dtype)
        with spy(AutoModelForSequenceClassification, "from_pretrained", stop=True) as calls, pytest.raises(Stop):
            load_backbone(cfg.model, tok, device, amp)
        kw = calls[0].kwargs
        assert kw["device_map"] == {"": 0} and type(kw["device_map"][""]) is int
        assert kw["dtype"] == getattr(torch, dtype)  # the layers left unquantized, in the compute dtype
        assert kw["quantization_config"].bnb_4bit_compute_dtype == getattr(torch, dtype)
        assert kw["attn_implementation"] == "sdpa"
        gpu.current = 1  # torch.cuda.set_device(1) earlier: a bare "cuda" is that device
        assert str(device_and_dtype("auto")[0]) == "cuda:1"
        assert str(device_and_dtype("auto", "cuda")[0]) == "cuda:1"


def test_kk_predict_loads_a_quantized_fold_on_a_concrete_device(tiny_project, tmp_path):
    """The same load through a fold folder (kk predict, kk ensemble, Predictor): FoldModel picks the device."""
    pytest.importorskip("bitsandbytes")
    import torch
    from transformers import AutoModelForSequenceClassification

    from kagglekit.io import write_text
    from kagglekit.modeling import build_model, load_tokenizer, save_model
    from kagglekit.predict import FoldModel

    cfg = _llama(tiny_project, "model.quantization=4bit")
    fold = tmp_path / "run" / "fold_0"
    tok = load_tokenizer(cfg.model.backbone)
    # a real (untrained) adapter: the fold's files are validated before anything loads
    save_model(build_model(_llama(tiny_project), tok, torch.device("cpu")), tok, fold)
    write_text(fold / "config.yaml", cfg.to_yaml())
    with simulated_cuda(capability=(7, 5)), pytest.raises(Stop), \
            spy(AutoModelForSequenceClassification, "from_pretrained", stop=True) as calls:
        FoldModel(fold)
    assert calls[0].kwargs["device_map"] == {"": 0}


def test_attention_implementation_per_architecture(tiny_project, tmp_path):
    """Gemma-2 soft-caps its attention scores, which SDPA cannot: eager. Llama: SDPA (exact up to rounding).
    DeBERTa-v2 has no SDPA path: eager. What the model got is recorded in metrics.json."""
    from transformers import AutoConfig

    from kagglekit.modeling import attention_implementation
    from kagglekit.tiny import build_tiny_model
    from kagglekit.train import train_fold

    gemma = build_tiny_model(tmp_path / "gemma2", "gemma2", str(tiny_project / "train.csv"), vocab_size=300, hidden=32)
    assert AutoConfig.from_pretrained(gemma).attn_logit_softcapping
    assert attention_implementation(AutoConfig.from_pretrained(gemma)) == "eager"
    assert attention_implementation(AutoConfig.from_pretrained(tiny_project / "llama")) == "sdpa"
    assert attention_implementation(AutoConfig.from_pretrained(tiny_project / "deberta")) == "eager"
    m = train_fold(tiny_config(tiny_project, f"model.backbone={gemma}", "train.max_steps=1", "model.max_length=64"), 0, tmp_path / "run")
    assert m["attn_implementation"] == "eager"
    assert json.loads((tmp_path / "run/fold_0/metrics.json").read_text())["attn_implementation"] == "eager"


# --- 2, 3: DDP ------------------------------------------------------------------------------------------------------


def test_each_ddp_rank_takes_its_own_gpu_before_the_process_group():
    import datetime

    import torch

    from kagglekit.modeling import device_and_dtype
    from kagglekit.train import _init_distributed

    current_at_init = []
    with simulated_cuda(devices=2) as gpu, \
            distributed_env(world=2, rank=1, side_effect=lambda *a, **k: current_at_init.append(torch.cuda.current_device())) as calls:
        _init_distributed(2)
        assert str(device_and_dtype("auto", "cuda:1")[0]) == "cuda:1"  # start_session's device for local rank 1
    assert gpu.set_device_calls == [1] and current_at_init == [1]  # set before the process group exists
    (call,) = calls
    assert call.args == ("nccl",) and call.kwargs["device_id"] == torch.device("cuda", 1)
    assert call.kwargs["timeout"] >= datetime.timedelta(minutes=30)  # not NCCL's 10-minute default


def _sharded_eval_worker(rank: int, world: int, port: int, project: str, out: str) -> None:
    """One rank of a gloo group: predict_validation as evaluate() calls it; rank 0 saves what it gathered."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from pathlib import Path

    import kagglekit.inference as inference
    from kagglekit import train as T
    from kagglekit.formatting import Formatter
    from kagglekit.modeling import build_model, load_tokenizer

    cfg = _llama(Path(project), "lora.dropout=0")
    tok = load_tokenizer(cfg.model.backbone)
    torch.manual_seed(0)
    model = build_model(cfg, tok, torch.device("cpu"))
    val_df = T.load_fold_frames(cfg, 0)[1].head(15)  # an odd count: unequal shares
    s = T.Session(cfg, 0, Path(out), torch.device("cpu"), None, tok, Formatter.from_config(tok, cfg.model), model=model,
                  rank=rank, world=world)
    seen, real = [], inference.predict_tta
    inference.predict_tta = lambda engine, fold, df, *a, **kw: seen.append(len(df)) or real(engine, fold, df, *a, **kw)
    res = T.predict_validation(s, val_df)
    np.save(f"{out}/rows_{rank}.npy", np.array(seen))
    if rank == 0:
        np.savez(f"{out}/gathered.npz", probs=res["probs"], probs_ab=res["probs_ab"], probs_ba=res["probs_ba"],
                 kept=res["stats"].kept)
    else:
        assert res is None
    dist.barrier()  # both ranks are done with every collective
    # Leave without the interpreter's teardown: under load, gloo's threads have been seen to abort the process
    # there ("terminate called without an active exception") after all the work above was saved.
    os._exit(0)


@pytest.mark.slow
def test_ddp_evaluation_is_sharded_and_gathered_in_order(tiny_project, tmp_path):
    """Two gloo ranks each predict half the validation rows; rank 0 gets all of them, in order, equal to one
    process predicting everything (no rank waits in a collective while rank 0 evaluates alone)."""
    import socket

    import torch
    import torch.multiprocessing as mp

    from kagglekit import train as T
    from kagglekit.formatting import Formatter
    from kagglekit.modeling import build_model, load_tokenizer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_sharded_eval_worker, args=(2, port, str(tiny_project), str(tmp_path)), nprocs=2, join=True)
    cfg = _llama(tiny_project, "lora.dropout=0")
    tok = load_tokenizer(cfg.model.backbone)
    torch.manual_seed(0)
    model = build_model(cfg, tok, torch.device("cpu"))
    val_df = T.load_fold_frames(cfg, 0)[1].head(15)  # an odd count: unequal shares
    alone = predict_model(model, Formatter.from_config(tok, cfg.model), val_df, cfg, batch_size=cfg.train.eval_batch_size)
    got = np.load(tmp_path / "gathered.npz")
    shares = [int(np.load(tmp_path / f"rows_{r}.npy").sum()) for r in range(2)]
    assert shares == [(len(val_df) + 1) // 2, len(val_df) // 2]  # each rank predicted its half only
    for key in ("probs", "probs_ab", "probs_ba"):
        np.testing.assert_allclose(got[key], alone[key], atol=1e-5)
    np.testing.assert_array_equal(got["kept"], alone["stats"].kept)


# --- 4: a true fp32 recompute ---------------------------------------------------------------------------------------

MARK = 5  # sequences starting with this token overflow in half precision (a forward hook makes them)


def _overflow_hooks(model):
    """Rows whose first token is MARK get infinite logits whenever the head computes in half precision."""
    import torch

    state, head_dtypes = {}, []

    def mark(mod, args, kwargs):
        state["rows"] = kwargs["input_ids"][:, 0] == MARK

    def head(mod, args, out):
        head_dtypes.append(args[0].dtype)
        if args[0].dtype != torch.float32:
            out = out.clone()
            out[state["rows"]] = float("inf")
        return out

    model.register_forward_pre_hook(mark, with_kwargs=True)
    model.score.register_forward_hook(head)
    return head_dtypes


def _marked_seqs(vocab: int):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(6, vocab, size=int(n)).tolist() for n in (30, 12, 41, 7, 25)]
    seqs[2][0] = seqs[3][0] = MARK
    return seqs


def test_half_precision_weights_are_recomputed_in_true_fp32(tiny_project):
    """Weights loaded in fp16 (big backbones at inference): autocast(enabled=False) alone still runs the overflowing
    rows in fp16 and they stay infinite; the recompute must reach the head in fp32, and equal an fp32 model."""
    import copy

    import torch

    from kagglekit.engine import infer_logits
    from kagglekit.modeling import load_backbone, load_tokenizer

    cfg = _llama(tiny_project)
    tok = load_tokenizer(cfg.model.backbone)
    cpu = torch.device("cpu")
    model = load_backbone(cfg.model, tok, cpu, torch.float16, weight_dtype=torch.float16).eval()
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    reference = copy.deepcopy(model).float()
    head_dtypes = _overflow_hooks(model)
    seqs = _marked_seqs(model.config.vocab_size)
    counts: dict = {}
    out = infer_logits(model, seqs, tok.pad_token_id, 2, cpu, torch.float16, counts=counts)
    assert np.isfinite(out).all() and counts["fp32_rows"] == 2
    assert head_dtypes[-2:] == [torch.float32, torch.float32]  # the two recomputed rows reached the head in fp32
    with torch.no_grad():
        for r in (2, 3):
            ids = torch.tensor([seqs[r]])
            np.testing.assert_allclose(out[r], reference(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].numpy(),
                                       atol=1e-4)
    assert {p.dtype for p in model.parameters()} == {torch.float16}  # the fp32 copies are gone


def test_four_bit_layers_are_recomputed_in_fp32_and_eight_bit_fails_in_one_line(tiny_project):
    """bitsandbytes casts a 4-bit layer's input to its compute dtype (fp16 on a T4): the recompute sets it to fp32.
    LLM.int8 has no fp32 path: one line naming the rows, not a NaN in the submission."""
    bnb = pytest.importorskip("bitsandbytes")
    import torch

    from kagglekit.engine import infer_logits
    from kagglekit.modeling import load_backbone, load_tokenizer

    cpu = torch.device("cpu")
    cfg = _llama(tiny_project, "model.quantization=4bit")
    tok = load_tokenizer(cfg.model.backbone)
    model = load_backbone(cfg.model, tok, cpu, torch.float16).eval()
    _overflow_hooks(model)
    seqs = _marked_seqs(model.config.vocab_size)
    with spy(bnb, "matmul_4bit") as matmuls:
        out = infer_logits(model, seqs, tok.pad_token_id, 8, cpu, torch.float16, counts=(counts := {}))
    assert np.isfinite(out).all() and counts["fp32_rows"] == 2
    n_layers = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert [c.args[0].dtype for c in matmuls[-2 * n_layers:]] == [torch.float32] * (2 * n_layers)
    assert all(m.compute_dtype == torch.float16 for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))

    cfg8 = _llama(tiny_project, "model.quantization=8bit")
    model8 = load_backbone(cfg8.model, tok, cpu, torch.float16).eval()
    _overflow_hooks(model8)
    with pytest.raises(KKError, match=r"^2 sequence\(s\) have non-finite float16 logits .*8bit has no fp32 path"):
        infer_logits(model8, seqs, tok.pad_token_id, 8, cpu, torch.float16)


# --- 5: packing ----------------------------------------------------------------------------------------------------


def test_packing_on_a_gpu_needs_varlen_attention(tiny_project):
    import torch
    from transformers import AutoConfig

    from kagglekit.modeling import attention_implementation

    conf = AutoConfig.from_pretrained(tiny_project / "llama")
    cuda = torch.device("cuda", 0)
    for capability, flash, expected in [((8, 0), True, "flash_attention_2"), ((8, 0), False, None), ((7, 5), True, None)]:
        with simulated_cuda(capability=capability), mock.patch("transformers.utils.is_flash_attn_2_available", lambda flash=flash: flash):
            if expected is None:
                with pytest.raises(KKError, match="train.packing on a GPU needs flash-attention-2.*set train.packing=false"):
                    attention_implementation(conf, cuda, packing=True)
            else:
                assert attention_implementation(conf, cuda, packing=True) == expected
            assert attention_implementation(conf, cuda) == "sdpa"  # padded batches: no varlen kernel needed
    assert attention_implementation(conf, torch.device("cpu"), packing=True) == "sdpa"  # CPU: dense, and capped


def test_packed_rows_are_capped_without_varlen_attention(tiny_project, tmp_path, monkeypatch):
    """With SDPA/eager a packed row attends through a dense L x L mask: however big the budget, no packed row is
    longer than model.max_length (a huge train.max_tokens once made one row of the whole epoch)."""
    import kagglekit.train as train_mod
    from kagglekit.batching import plan_batches

    seen = []
    real = train_mod.forward_logits
    monkeypatch.setattr(train_mod, "forward_logits", lambda s, seqs, segs=None: seen.append(list(map(len, seqs))) or real(s, seqs, segs))
    cfg = _llama(tiny_project, "train.packing=true", "train.max_tokens=100000", "train.max_steps=3")
    train_mod.train_fold(cfg, 0, tmp_path / "run")
    assert seen and all(sum(row) <= cfg.model.max_length for row in seen)
    lengths = [60, 30, 90, 10, 45, 70, 20, 5]
    plan = plan_batches(lengths, [[i] for i in range(8)], 4, 0, 0, max_tokens=10**6, packed=True, max_packed=100)
    assert sorted(i for b in plan for i in b) == list(range(8))
    assert all(sum(lengths[i] for i in b) <= 100 for b in plan)


# --- 6: out of memory -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_out_of_memory_retries_in_pieces_with_the_same_gradients(tiny_project, tmp_path):
    """Every forward of more than one row runs out of memory: training and evaluation retry in smaller pieces
    and end where an uninterrupted run ends (the per-sequence loss makes the pieces' gradients add up)."""
    import pandas as pd

    from kagglekit.train import train_fold

    cfg = _llama(tiny_project, "train.max_steps=2", "train.batch_size=8", "train.grad_accum=2", "train.eval_every=2")
    plain = train_fold(cfg, 0, tmp_path / "plain")
    with oom_after_load(when=lambda ids: ids.shape[0] > 2) as oom:
        pieced = train_fold(cfg, 0, tmp_path / "pieced")
    assert oom.raised >= 3  # 8 rows -> 4 -> 2 in training, and again in evaluation
    assert pieced["steps"] == plain["steps"] == 2
    assert pieced["val_log_loss"] == pytest.approx(plain["val_log_loss"], abs=1e-4)
    a, b = (pd.read_csv(tmp_path / r / "fold_0/train_log.csv") for r in ("plain", "pieced"))
    np.testing.assert_allclose(a["train_loss"], b["train_loss"], atol=1e-4)
    np.testing.assert_allclose(pd.read_csv(tmp_path / "plain/fold_0/oof.csv").iloc[:, 1:],
                               pd.read_csv(tmp_path / "pieced/fold_0/oof.csv").iloc[:, 1:], atol=1e-4)


def test_a_sequence_that_never_fits_is_one_line(tiny_project, tmp_path):
    with oom_after_load():
        r = run_cli("train", "--fold", "0", "--config", REPO / "configs/tiny.yaml", "--train", tiny_project / "train.csv",
                    "--folds", tiny_project / "folds.csv", "--run", tmp_path / "r", "--set", f"model.backbone={tiny_project / 'llama'}",
                    "--set", "model.max_length=96")
    assert r.exit_code == 1 and "Traceback" not in r.output
    errors = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "out of GPU memory training one sequence of" in errors[0] and "model.max_length" in errors[0]


def test_inference_out_of_memory_retries_in_pieces(tiny_project):
    import torch

    from kagglekit.engine import infer_logits
    from kagglekit.memory import OutOfMemory
    from kagglekit.modeling import load_backbone, load_tokenizer

    cfg = _llama(tiny_project)
    tok = load_tokenizer(cfg.model.backbone)
    model = load_backbone(cfg.model, tok, torch.device("cpu")).eval()
    seqs = _marked_seqs(model.config.vocab_size) * 3
    plain = infer_logits(model, seqs, tok.pad_token_id, 8)
    with inject_oom(model.get_input_embeddings(), when=lambda ids: ids.shape[0] > 2) as oom:
        pieced = infer_logits(model, seqs, tok.pad_token_id, 8)
    assert oom.raised >= 2
    np.testing.assert_allclose(pieced, plain, atol=1e-5)
    with inject_oom(model.get_input_embeddings()), pytest.raises(OutOfMemory, match="predicting one sequence of 41 tokens"):
        infer_logits(model, seqs, tok.pad_token_id, 8)


def test_the_budget_probe_survives_out_of_memory():
    import torch

    from kagglekit.batching import auto_max_tokens, budget_from_probe
    from kagglekit.memory import OutOfMemory

    with simulated_cuda(free_gib=10) as gpu:
        def probe(rows, length):  # two rows do not fit; one row uses 1,000 bytes a token
            if rows > 1:
                raise torch.cuda.OutOfMemoryError(OOM_MESSAGE)
            gpu.peak = gpu.allocated + rows * length * 1000

        cuda = torch.device("cuda", 0)
        assert auto_max_tokens(probe, 500, cuda) == budget_from_probe(500 * 1000, 500, gpu.free, 500)

        def never(rows, length):
            raise torch.cuda.OutOfMemoryError(OOM_MESSAGE)

        with pytest.raises(OutOfMemory, match="single sequence of 500 tokens .*lower model.max_length"):
            auto_max_tokens(never, 500, cuda)


def test_a_tune_trial_out_of_memory_is_marked_and_the_study_goes_on(tiny_project, tmp_path, monkeypatch):
    import torch

    import kagglekit.train as train_mod
    from kagglekit.tune import run_tune

    real = train_mod.forward_logits

    def first_trial_oom(s, seqs, segs=None):
        if "trial_0" in str(s.work):
            raise torch.cuda.OutOfMemoryError(OOM_MESSAGE)
        return real(s, seqs, segs)

    monkeypatch.setattr(train_mod, "forward_logits", first_trial_oom)
    study = run_tune(tiny_config(tiny_project, "train.max_steps=1"), 0, 2, f"sqlite:///{tmp_path / 'tune.db'}", "oom",
                     runs_root=tmp_path, pruner="none")
    states = {t.number: t.state.name for t in study.trials}
    assert states == {0: "FAIL", 1: "COMPLETE"}
    assert "out of GPU memory" in study.trials[0].user_attrs["out_of_memory"]


# --- 9: one fold model at a time ----------------------------------------------------------------------------------


def test_predictor_holds_one_fold_model_at_a_time(tiny_run, monkeypatch):
    import weakref

    from kagglekit.predict import FoldModel, Predictor

    live, peak, models = set(), [0], []
    real_init, real_release = FoldModel.__init__, getattr(FoldModel, "release", lambda self: None)

    def init(self, *a, **k):
        real_init(self, *a, **k)
        live.add(id(self))
        peak[0] = max(peak[0], len(live))
        assert all(m() is None for m in models)  # the previous fold's model is gone before this one is used
        models.append(weakref.ref(self.model))

    def release(self):
        live.discard(id(self))
        real_release(self)

    monkeypatch.setattr(FoldModel, "__init__", init)
    monkeypatch.setattr(FoldModel, "release", release, raising=False)
    p = Predictor.from_run(tiny_run, folds="0,1,2")
    assert peak[0] == 0  # nothing loaded until a prediction is asked for
    res = p.predict_one("What is 2+2?", "4", "5")
    assert abs(sum(res.values()) - 1) < 1e-9 and peak[0] == 1 and len(models) == 3 and not live


# --- 11, 12: resuming on another GPU; the overflow hint ---------------------------------------------------------


def test_a_bf16_checkpoint_resumes_in_fp16(tiny_project, tmp_path, monkeypatch):
    """An H100 run (bf16: the loss scaler is off and saves {}) continued on a T4 (fp16: the scaler is on)."""
    import torch

    import kagglekit.modeling as modeling
    from kagglekit.train import Interrupted, train_fold

    cpu = torch.device("cpu")
    monkeypatch.setattr(modeling, "device_and_dtype", lambda precision="auto", device=None: (cpu, torch.bfloat16))
    cfg = tiny_config(tiny_project, "train.max_steps=4", "train.eval_every=2")

    def stop_at_2(step):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        train_fold(cfg, 1, tmp_path / "run", on_step=stop_at_2)
    assert torch.load(tmp_path / "run/fold_1/checkpoint/state.pt", weights_only=True)["scaler"] == {}
    monkeypatch.setattr(modeling, "device_and_dtype", lambda precision="auto", device=None: (cpu, torch.float16))
    m = train_fold(cfg, 1, tmp_path / "run", resume=True)
    assert m["steps"] == 4 and np.isfinite(m["val_log_loss"])


def test_an_auto_budget_is_remeasured_on_another_gpu(tiny_project, tmp_path, monkeypatch):
    """The saved budget is kept (the same batches, so --resume continues the same plan), but on a smaller GPU each
    batch runs in as many pieces as the budget measured there needs."""
    import kagglekit.batching as batching
    import kagglekit.train as train_mod
    from kagglekit.train import Interrupted

    budgets = iter([500, 200])
    monkeypatch.setattr(batching, "auto_max_tokens", lambda *a, **k: next(budgets))
    gpu = {"name": "NVIDIA H100 80GB HBM3", "total_memory": 80 * 2**30}
    monkeypatch.setattr(batching, "device_signature", lambda device: dict(gpu))
    cfg = tiny_config(tiny_project, "train.max_tokens=auto", "train.max_steps=8", "predict.max_tokens=0")
    real, calls, widths = train_mod.forward_logits, [0], []

    def cut_at_5(s, seqs, segs=None):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return real(s, seqs, segs)

    monkeypatch.setattr(train_mod, "forward_logits", cut_at_5)
    with pytest.raises(Interrupted):
        train_mod.train_fold(cfg, 2, tmp_path / "run")
    saved = json.loads((tmp_path / "run/fold_2/checkpoint/batching.json").read_text())
    assert saved == {"max_tokens": 500, "device": gpu}
    gpu.update(name="Tesla T4", total_memory=15 * 2**30)
    monkeypatch.setattr(train_mod, "forward_logits", lambda s, seqs, segs=None: widths.append(len(seqs) * max(map(len, seqs))) or real(s, seqs, segs))
    m = train_mod.train_fold(cfg, 2, tmp_path / "run", resume=True)
    assert next(budgets, None) is None  # measured again on the "T4"
    assert m["steps"] == 8 and widths and max(widths) <= 500 // 4 + cfg.model.max_length  # 500/200 -> 4 pieces


def test_the_overflow_hint_suggests_fp32_below_compute_capability_8():
    import torch

    from kagglekit.modeling import precision_hint

    cuda = torch.device("cuda", 0)
    with simulated_cuda(capability=(7, 5)):
        t4 = precision_hint(cuda, torch.float16)
    with simulated_cuda(capability=(8, 0)):
        a100 = precision_hint(cuda, torch.float16)
    assert "model.precision=fp32" in t4 and "model.precision=bf16" not in t4
    assert "model.precision=bf16" in a100
    assert "lower train.lr" in precision_hint(torch.device("cpu"), None)
