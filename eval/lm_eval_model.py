"""lm-evaluation-harness model `unmask`: masked diffusion (and AR) checkpoints of this project.

Importing this module registers the model with lm-eval (pip install 'unmask[lmeval]'):

    import eval.lm_eval_model, lm_eval
    lm_eval.simple_evaluate(model="unmask", model_args="ckpt=runs/NAME,mc_samples=32", tasks=["piqa"])

or run `python -m eval.downstream` (docs/downstream.md). Requests are served batched:
  - loglikelihood: LLaDA's Monte Carlo estimate of log p(continuation | context) (eval/likelihood.py), every
    (request, sample) pair a row of a shared forward pass; `is_greedy` is whether greedy joint decoding by
    iterative unmasking reproduces the continuation (what LAMBADA's `acc` reads). Computing it costs one
    forward per continuation token, so with greedy=auto it is computed only for tasks that ask one
    question per document (LAMBADA-like); multiple-choice tasks (several requests per document, scored by
    comparing log-likelihoods) get False.
  - loglikelihood_rolling: lm-eval's rolling windows, each conditioned on the text before it (the context stays
    visible, only the window's tokens are masked and scored; eval.elbo.rolling_nelbo): exact for AR
    checkpoints (lm-eval's HF numbers), an ELBO bound for diffusion, so lm-eval's word/byte perplexities are
    upper bounds. Monte Carlo draws are keyed on each document. Every objective uses its own estimator
    (rolling_method, default: "count" where the objective has it, else its first: sedd "t", d3pm "step",
    dfm "elbo").
  Objectives whose bound the masked-answer estimator is not (time-conditioned networks: sedd, d3pm, dfm,
  uniform, hybrid; Objective.conditional_refusal) refuse loglikelihood with that explanation instead of
  reporting a wrong number; their loglikelihood_rolling and generate_until work. Block diffusion's loglikelihood
  is its own block bound of the answer (eval/likelihood.py).
  - generate_until: the diffusion sampler on left-padded batches, semi-autoregressive blocks, rows leave the
    batch once a stop string or EOS appears after a finished block.

Model args (key=value): ckpt (or pretrained: also a LLaDA-format Hugging Face folder or hub id, converted on the
fly by eval/load.py), device (auto), dtype (auto|fp32|bf16), batch_size (rows per
forward), mc_samples (128), mc_round, stderr_tol, cfg_scale, seed, greedy (auto|always|never),
gen_length, steps, block_length, remasking, sampler (llada|mdlm|remdm), temperature, decode
(fixed|threshold|factor), threshold (0.9), factor (1.0), kv_cache (none|prefix|dual), refresh_every (0),
remdm_strategy (cap|rescale|conf|loop; sampler=remdm, model/remdm.py), eta (0.015), top_p (0.9: ReMDM's
nucleus, 1 off), rolling_samples (16), rolling_method
(the objective's: count for masked diffusion), max_length (default: the checkpoint's training sequence length). generate_until draws each request
from its own generator (seed and the context's tokens), so its text does not depend on its batch.
"""
from __future__ import annotations

import json
import logging
import os
import zlib
from collections import defaultdict
from typing import Optional

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from .generate import resolve_device, resolve_dtype
from .likelihood import conditional_loglikelihood, encode_pair, greedy_match
from .load import load
from model.remdm import ReMDMConfig
from model.sample import check_options, generate_many, strip_after_eos

log = logging.getLogger(__name__)


def _int_or_default(value, default: int) -> int:
    """lm-eval passes batch_size as an int, a string, None or 'auto'."""
    if value is None or (isinstance(value, str) and not value.strip().isdigit()):
        return default
    return int(value)


@register_model("unmask")
class UnmaskLM(LM):
    def __init__(self, ckpt: Optional[str] = None, pretrained: Optional[str] = None, device: Optional[str] = None,
                 dtype: str = "auto", batch_size=32, max_batch_size=None,  # max_batch_size: lm-eval's, unused
                 mc_samples: int = 128,
                 mc_round: Optional[int] = None, stderr_tol: Optional[float] = None, cfg_scale: float = 0.0,
                 seed: int = 1234, greedy: str = "auto", gen_length: Optional[int] = None,
                 steps: Optional[int] = None, block_length: Optional[int] = None,
                 remasking: str = "low_confidence", sampler: str = "llada", temperature: float = 0.0,
                 rolling_samples: int = 16, rolling_method: Optional[str] = None, max_length: Optional[int] = None,
                 decode: str = "fixed", threshold: float = 0.9, factor: float = 1.0, kv_cache: str = "none",
                 refresh_every: int = 0, remdm_strategy: str = "rescale", eta: float = 0.015, top_p: float = 0.9,
                 **unused):
        super().__init__()
        # lm-eval bootstraps stderrs (perplexity, median, ...) in a fork()ed Pool; a fork of a process that
        # runs torch's intra-op threads can deadlock in the child (seen in CI: a 900 s hang). Its in-process
        # loop computes the same resamples, so ask for that unless the user chose otherwise.
        os.environ.setdefault("DISABLE_MULTIPROC", "1")
        path = ckpt or pretrained
        if not path:
            raise ValueError("the unmask model needs ckpt=PATH (a run directory, checkpoint folder or export)")
        if unused:  # a typo (mc_sample=32) must not silently run with the defaults
            raise ValueError(f"unknown unmask model args {sorted(unused)}; see eval/lm_eval_model.py")
        if greedy not in ("auto", "always", "never"):
            raise ValueError(f"greedy={greedy!r}; choices: auto, always, never")
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line passes device=cuda by default, even on machines without one
            log.warning("unmask: CUDA is not available, evaluating on the CPU")
            device = "cpu"
        self._device = resolve_device(device or "auto")
        self.run = load(path, device=self._device, dtype=resolve_dtype(dtype, self._device))
        self.model = self.run.model
        self.tok = self.run.tokenizer
        self.mask_id = int(self.run.cfg.model.mask_id)
        self.batch_size = _int_or_default(batch_size, 32)
        self.mc_samples, self.mc_round = int(mc_samples), mc_round and int(mc_round)
        self.stderr_tol = None if stderr_tol is None else float(stderr_tol)
        self.cfg_scale, self.seed, self.greedy = float(cfg_scale), int(seed), greedy
        self.gen_length, self.steps, self.block_length = gen_length, steps, block_length
        self.remasking, self.sampler, self.temperature = remasking, sampler, float(temperature)
        # parallel decoding and KV caching (model/sample.py); checked here so a typo fails before any request
        self.fast = dict(decode=decode, threshold=float(threshold), factor=float(factor), kv_cache=kv_cache,
                         refresh_every=int(refresh_every))
        check_options(sampler, remasking, decode, float(threshold), float(factor), kv_cache, int(refresh_every),
                       1, 1, exact_cache=bool(getattr(self.run.objective, "exact_kv_cache", False)))
        self.remdm = ReMDMConfig(remdm_strategy, float(eta), float(top_p))  # sampler=remdm's remasking
        self.remdm.check()
        objective = None if self.run.is_ar else self.run.objective
        if objective is not None:
            methods = objective.eval_methods
            rolling_method = rolling_method or ("count" if "count" in methods else methods[0])
            if rolling_method not in methods:
                raise ValueError(f"rolling_method={rolling_method!r} does not fit objective {objective.name!r}; "
                                 f"choices: {', '.join(methods)}")
        self.rolling_samples, self.rolling_method = int(rolling_samples), rolling_method or "count"
        self.refusal = None if objective is None else objective.conditional_refusal()
        self.max_length = int(max_length or min(self.run.cfg.data.seq_len, self.run.cfg.model.max_seq_len))
        self.eos_id = getattr(self.tok, "eos_id", None)
        bos = getattr(self.tok, "bos_id", None)
        self.prefix_id = bos if bos is not None else self.eos_id  # what an empty context is conditioned on

    # ------------------------------------------------------------------ helpers
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return encode_pair(self.tok, context, continuation, self.prefix_id)

    # ------------------------------------------------------------------ lm-eval API
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if self.refusal:
            raise ValueError(self.refusal)
        pairs = [self._encode_pair(*req.args) for req in requests]
        # Deduplicate identical (context, continuation) token pairs: score each once.
        uniq: dict[tuple, int] = {}
        for c, x in pairs:
            uniq.setdefault((tuple(c), tuple(x)), len(uniq))
        keys = list(uniq)
        ctxs, conts = [list(k[0]) for k in keys], [list(k[1]) for k in keys]
        # Progress in forward rows (example x Monte Carlo sample); early stopping can end it short.
        rows = len(keys) if self.run.is_ar else sum(0 if not c else 1 if len(c) == 1 else self.mc_samples
                                                     for c in conts)
        bar = tqdm(total=rows, desc="unmask loglikelihood (rows)", disable=disable_tqdm or self.rank != 0)
        tick = bar.update
        lls = conditional_loglikelihood(self.model, ctxs, conts, mask_id=self.mask_id, mc_samples=self.mc_samples,
                                        batch_size=self.batch_size, cfg_scale=self.cfg_scale,
                                        stderr_tol=self.stderr_tol, round_size=self.mc_round,
                                        seed=self.seed, max_length=self.max_length, progress=tick,
                                        objective=self.run.objective)
        bar.close()
        want = self._greedy_wanted(requests)
        greedy_keys = sorted({uniq[(tuple(c), tuple(x))] for (c, x), w in zip(pairs, want) if w})
        greedy = {}
        if greedy_keys:
            flags = greedy_match(self.model, [ctxs[k] for k in greedy_keys], [conts[k] for k in greedy_keys],
                                 mask_id=self.mask_id, batch_size=self.batch_size, max_length=self.max_length,
                                 objective=self.run.objective)
            greedy = dict(zip(greedy_keys, flags))
        out = []
        for req, (c, x), w in zip(requests, pairs, want):
            k = uniq[(tuple(c), tuple(x))]
            res = (lls[k].logprob, bool(greedy.get(k, False)) if w else False)
            out.append(res)
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def _greedy_wanted(self, requests) -> list[bool]:
        if self.greedy != "auto":
            return [self.greedy == "always"] * len(requests)
        # One request per (task, document) marks a loglikelihood task (LAMBADA: acc = is_greedy); several
        # mark a multiple-choice task, whose metrics compare log-likelihoods and never read is_greedy.
        per_doc = defaultdict(int)
        for r in requests:
            per_doc[(getattr(r, "task_name", None), getattr(r, "doc_id", None))] += 1
        return [getattr(r, "doc_id", None) is None or per_doc[(r.task_name, r.doc_id)] == 1 for r in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from .elbo import rolling_nelbo
        out = []
        for req in tqdm(requests, desc="unmask loglikelihood_rolling", disable=disable_tqdm or self.rank != 0):
            (text,) = req.args
            ids = self.tok.encode(text)
            res = rolling_nelbo(self.model, ids, mask_id=self.mask_id, window=self.max_length,
                                samples=self.rolling_samples, seed=self.seed, bos_id=self.prefix_id,
                                method="ar" if self.run.is_ar else self.rolling_method,
                                batch_size=self.batch_size, ar=self.run.is_ar,
                                objective=None if self.run.is_ar else self.run.objective)
            ll = -res.total_nats  # a lower bound on log p(text) for diffusion (ELBO), exact for AR
            out.append(ll)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), ll)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[Optional[str]] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        bar = tqdm(total=len(requests), desc="unmask generate_until", disable=disable_tqdm or self.rank != 0)
        for key, idx in groups.items():
            kw = dict(requests[idx[0]].args[1])
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kw.pop("max_gen_toks", 256))
            do_sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", self.temperature if do_sample else 0.0))
            if not do_sample:
                temperature = 0.0
            gen_length, steps, block = self._gen_plan(max_gen)
            ctxs = []
            for i in idx:
                c = self.tok.encode(requests[i].args[0]) if requests[i].args[0] else []
                if not c and self.prefix_id is not None:
                    c = [self.prefix_id]
                ctxs.append(c[max(0, len(c) - (self.max_length - gen_length)):])
            order = sorted(range(len(idx)), key=lambda j: -len(ctxs[j]))  # similar lengths end up together
            chunk = max(1, 8 * self.batch_size)  # a progress update every few batches
            for j0 in range(0, len(order), chunk):
                part = order[j0:j0 + chunk]
                texts = self._generate_batch([ctxs[j] for j in part], until, gen_length, steps, block,
                                             temperature, max_gen)
                for j, text in zip(part, texts):
                    out[idx[j]] = text
                    self.cache_hook.add_partial("generate_until", requests[idx[j]].args, text)
                bar.update(len(part))
        bar.close()
        return out  # type: ignore[return-value]

    def _gen_plan(self, max_gen: int) -> tuple[int, int, int]:
        """(gen_length, steps, block_length): gen_length rounded up to whole blocks; steps default to one
        token per step (best quality) and are rounded up to a multiple of the number of blocks."""
        want = min(int(self.gen_length or max_gen), self.max_length - 1)  # leave room for some context
        block = min(int(self.block_length or want), want)
        gen_length = -(-want // block) * block
        if gen_length > self.max_length - 1:  # whole blocks do not fit: one block of exactly `want`
            gen_length = block = want
        n_blocks = max(1, gen_length // block)
        steps = int(self.steps or gen_length)
        steps = -(-steps // n_blocks) * n_blocks
        return gen_length, steps, block

    def _generate_batch(self, ctxs, until, gen_length, steps, block, temperature, max_gen) -> list[str]:
        def stopped(gen: torch.Tensor) -> torch.Tensor:
            flags = []
            for row in gen.tolist():
                ids = [t for t in row if t != self.mask_id]
                text = self.tok.decode(strip_after_eos(ids, self.eos_id))
                flags.append(any(s in text for s in until) or (self.eos_id is not None and self.eos_id in ids))
            return torch.tensor(flags, dtype=torch.bool)
        rows = generate_many(self.model, ctxs, batch_size=self.batch_size, mask_id=self.mask_id,
                             gen_length=gen_length, steps=steps, block_length=block, temperature=temperature,
                             remasking=self.remasking, sampler=self.sampler,
                             seeds=[zlib.crc32(repr((self.seed, c)).encode()) for c in ctxs],
                             cfg_scale=0.0 if self.run.is_ar else self.cfg_scale, eos_id=self.eos_id,
                             objective=self.run.objective, remdm=self.remdm,
                             stop_at_eos=self.eos_id is not None,
                             stop_fn=stopped if (until or self.eos_id is not None) else None, **self.fast)
        texts = []
        for row in rows:
            text = self.tok.decode(strip_after_eos(row[:max_gen], self.eos_id))
            for s in until:
                if s and s in text:
                    text = text.split(s)[0]
            texts.append(text)
        return texts


if __name__ == "__main__":
    # lm-eval's own command line with the `unmask` model registered (its CLI cannot import project models):
    #   python -m eval.lm_eval_model run --model unmask --model_args ckpt=runs/NAME --tasks piqa
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()
