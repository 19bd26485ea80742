"""Downstream evaluation with EleutherAI's lm-evaluation-harness (the `eval` extra: `lm-eval`).

`BLTLM` is the harness's LM interface for a bltkit model, on bytes (a BLT needs no tokenizer):
- `loglikelihood`: log p(continuation | context) from one forward over BOS + context +
  continuation, the continuation's bytes scored (the patcher is causal, so the context patches as
  it would alone); `is_greedy` where every continuation byte is the argmax;
- `loglikelihood_rolling`: a document's whole log-likelihood over the harness's rolling windows
  (`context_len=1`): each window BOS, past the first one earlier byte, then `max_length - 2`
  bytes, each scored once;
- `generate_until`: `bltkit.Generator`, greedy unless `do_sample`, stopping at the `until`
  strings (cut from the output) or after `max_gen_toks` bytes.
A context longer than the model allows keeps its last bytes (after BOS), as the harness's
Hugging Face models truncate on the left; each cut is counted in `truncated` and reported once.
With `noise` (`bltkit.eval.noise`: "drop:0.1", "randomcase", ...) every context, and every
document of a rolling request, is perturbed before it is read; continuations (the answers scored)
and generated text are not: the robustness evaluation of the BLT paper's noised benchmarks.

`evaluate_tasks` runs `lm_eval.simple_evaluate` on it; `blt eval tasks` calls that. The tasks'
datasets come from wherever the harness finds them (the Hugging Face hub, a local task folder
given by `include_path`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

try:
    from lm_eval.api.model import LM
except ImportError:  # the classes below then say what to install
    LM = object

from ..bytes import BOS_ID, OFFSET, encode

_INSTALL = "downstream evaluation needs lm-evaluation-harness: pip install 'bltkit[eval]'"


def _need_harness() -> None:
    if LM is object:
        raise ImportError(_INSTALL)


class BLTLM(LM):
    """A bltkit BLT (or entropy model: a plain byte LM, for the scoring requests) as an lm-eval LM.

    Args:
        model: a model directory, a loaded model, or None for the bundled one.
        device: where to run (default: cuda if available); dtype: the weights' (default fp32,
            which scoring on a CPU wants; bf16 on a GPU is faster and rounds the log-probs).
        batch_size: sequences a forward (scoring) and rows a generate call.
        max_gen_bytes: generation's length where a request gives no max_gen_toks.
        noise, noise_seed: character noise for the contexts (`bltkit.eval.noise`), None for none;
            noise_seed is also sampled generation's seed where a request names none.
    A loaded model given with a device or dtype is copied there (the caller's stays as it is).
    """

    def __init__(self, model=None, device: str | None = None, dtype: str | torch.dtype | None = None,
                 batch_size: int | str = 8, max_gen_bytes: int = 256, noise: str | None = None,
                 noise_seed: int = 0) -> None:
        _need_harness()
        super().__init__()
        if noise is not None:
            from .noise import parse

            parse(noise)  # a bad spec is refused before the model loads
        self.noise, self.noise_seed = noise, int(noise_seed)
        from ..checkpoint import load_model
        from ..model import BLT

        try:
            batch_size, max_gen_bytes = int(batch_size), int(max_gen_bytes)
        except ValueError:
            raise ValueError(f"batch_size and max_gen_bytes are whole numbers, got {batch_size!r}, "
                             f"{max_gen_bytes!r}") from None
        if batch_size < 1 or max_gen_bytes < 1:
            raise ValueError(f"batch_size and max_gen_bytes must be >= 1, got {batch_size}, {max_gen_bytes}")
        if isinstance(dtype, str):  # (the commands' dtype names)
            from ..dtypes import torch_dtype

            dtype = torch_dtype(dtype)
        if model is None or isinstance(model, (str, os.PathLike)):
            if model is None:
                from ..bundled import bundled_model_dir

                model = bundled_model_dir()
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model = load_model(model, device=device, dtype=dtype or torch.float32)
        elif device is not None or dtype is not None:
            import copy

            model = copy.deepcopy(model).to(device=device, dtype=dtype)
        self.model = model.eval()
        self.is_blt = isinstance(model, BLT)
        cfg = model.config
        # ids a sequence may hold (a BLT's T ids make at most T+1 patches)
        self.max_length = min(cfg.max_bytes, cfg.max_patches - 1) if self.is_blt else cfg.max_seqlen
        self.batch_size, self.max_gen_bytes = batch_size, max_gen_bytes
        self.truncated = 0  # contexts (or answers) cut on the left to fit max_length
        self.capped = 0  # generations shortened to fit max_length
        self._generator = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- scoring ----------------------------------------------------------------------------------

    def _fit(self, context: list[int], continuation: list[int], count: bool = True) -> list[int]:
        """BOS + context + continuation ids, the oldest bytes dropped where they do not fit: the
        context's, and past it the continuation's (the harness's Hugging Face models cut the
        joined sequence on the left too); `count` tallies the cuts for the report."""
        joined = [*context, *continuation]
        if len(joined) > self.max_length - 1:
            self.truncated += count
            joined = joined[len(joined) - (self.max_length - 1):]
        return [BOS_ID, *joined]

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]], count: bool = True) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy) for (context ids, continuation ids) without BOS,
        in batches of similar lengths, right-padded with 0: the model is causal (and so is its
        patcher), so padding after a row changes none of its logits."""
        seqs = [self._fit(ctx, cont, count) for ctx, cont in pairs]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(seqs)
        for b in range(0, len(order), self.batch_size):
            rows = order[b:b + self.batch_size]
            T = len(seqs[rows[0]])
            x = torch.zeros(len(rows), T, dtype=torch.long, device=self.device)
            for r, i in enumerate(rows):
                x[r, :len(seqs[i])] = torch.tensor(seqs[i])
            logp = F.log_softmax(self.model(x).float(), dim=-1)
            for r, i in enumerate(rows):
                n, m = len(seqs[i]), min(len(pairs[i][1]), len(seqs[i]) - 1)
                if m == 0:
                    continue
                target = x[r, n - m:n]
                lp = logp[r, n - m - 1:n - 1]  # logits at t predict byte t+1
                out[i] = (float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
        return out

    def _noised(self, text: str) -> str:
        if self.noise is None:
            return text
        from .noise import apply

        return apply(text, self.noise, self.noise_seed)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [([b + OFFSET for b in self._noised(ctx).encode()], [b + OFFSET for b in cont.encode()])
                 for ctx, cont in (req.args for req in requests)]
        return self._report(self._score(pairs))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        if self.noise is not None:  # the harness divides by the clean document's bytes
            raise ValueError("noise perturbs contexts; a rolling task scores the document itself, whose bits per "
                             "byte the harness would divide by the clean length: run it without --noise")
        result = []
        for req in requests:
            ids = encode(req.args[0], bos=False, eos=False)
            # windows of at most max_length ids: BOS, then (past the first) the one earlier byte the
            # harness's rule gives as context (context_len=1), then the bytes it scores (each once);
            # so max_length - 2 scored bytes a window, none of the context cut
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=ids, prefix_token=BOS_ID, max_seq_len=self.max_length - 2, context_len=1)]
            pairs = [([i for i in ctx if i != BOS_ID], cont) for ctx, cont in windows]
            # (a window's context is cut by the rule above, not a user's text: not reported)
            result.append(sum(lp for lp, _ in self._score(pairs, count=False)))
        return self._report(result)

    # -- generation -------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if not self.is_blt:
            raise ValueError("generate_until needs a BLT; an entropy model only scores")
        from ..generate import Generator

        if self._generator is None:
            self._generator = Generator(self.model)
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}  # requests with the same settings generate together
        seen: dict[tuple, int] = {}  # sampled requests asked before in this call (the harness's repeats)
        for i, req in enumerate(requests):
            kw = dict(req.args[1])
            until = kw.pop("until", None)
            until = [u for u in ([until] if isinstance(until, str) else list(until or [])) if u]
            n = int(kw.pop("max_gen_toks", self.max_gen_bytes))
            if n > self.max_length - 2:  # room for BOS and one context byte
                self.capped += 1
                n = max(0, self.max_length - 2)
            sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 1.0 if sample else 0.0)) if sample else 0.0
            seed = kw.pop("seed", None)
            seed = self.noise_seed if seed is None else seed
            top_k, top_p = kw.pop("top_k", None), kw.pop("top_p", None)
            if temperature > 0:  # the k-th copy of a sampled request (repeats) draws with seed + k:
                # the noise is keyed by seed and prompt, so copies would otherwise all be one sample
                ask = (req.args[0], tuple(until), n, temperature, top_k, top_p, seed)
                k = seen.get(ask, 0)
                seen[ask] = k + 1
                seed += k
            key = (tuple(until), n, temperature, top_k, top_p, seed)
            groups.setdefault(key, []).append(i)
        for (until, n, temperature, top_k, top_p, seed), idx in groups.items():
            for b in range(0, len(idx), self.batch_size):
                rows = idx[b:b + self.batch_size]
                # BOS + the context, cut on the left so that n new bytes fit
                fitted = [self._fit([c + OFFSET for c in self._noised(requests[i].args[0]).encode()], [0] * n)
                          for i in rows]  # (the [0] * n: room for the new bytes)
                prompts = [ids[:len(ids) - n] for ids in fitted]
                texts = self._generator.generate(prompts, n, temperature=temperature, top_k=top_k, top_p=top_p,
                                                 seed=seed, stop=list(until) or None)
                for i, t in zip(rows, texts, strict=True):
                    out[i] = t.decode("utf-8", errors="replace")
        return self._report(out)

    def _report(self, result):
        if self.truncated:
            print(f"bltkit: {self.truncated} request(s) longer than the model's {self.max_length} bytes kept "
                  "their last bytes", flush=True)
            self.truncated = 0
        if self.capped:
            print(f"bltkit: {self.capped} generation request(s) asked for more bytes than the model's "
                  f"{self.max_length} allow: generated {max(0, self.max_length - 2)}", flush=True)
            self.capped = 0
        return result


def evaluate_tasks(model, tasks: Sequence[str], num_fewshot: int | None = None, limit: float | None = None,
                   batch_size: int = 8, device: str | None = None, dtype: str | None = None,
                   include_path: str | None = None, seed: int = 0, noise: str | None = None) -> dict:
    """`lm_eval.simple_evaluate` of `tasks` on a bltkit model (a directory, a loaded model, or None
    for the bundled one), its contexts noised where `noise` says; returns the harness's results dict."""
    _need_harness()
    import lm_eval
    from lm_eval.tasks import TaskManager

    if isinstance(tasks, str):
        tasks = [tasks]
    if limit is not None and not limit > 0:
        raise ValueError(f"limit must be > 0 (documents a task, or a share of them below 1), got {limit}")
    lm = BLTLM(model, device=device, dtype=dtype, batch_size=batch_size, noise=noise, noise_seed=seed)
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}: `lm-eval ls tasks` lists them (or give a "
                         "folder of task YAMLs with --include-path)")
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                   task_manager=manager, random_seed=seed, numpy_random_seed=seed,
                                   torch_random_seed=seed, fewshot_random_seed=seed)
