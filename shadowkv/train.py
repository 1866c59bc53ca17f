"""The main job: RL post-training with compressed rollouts (``shadowkv train``/``compare``).

One step: sample prompts, roll out ``group_size`` samples each with the method's sampler
(FullCache for ``dense``, the eviction policy at ``budget`` otherwise), score them with the
task's exact reward, compute GRPO advantages, then run ``epochs`` optimisation epochs of
:func:`shadowkv.learner.policy_loss`. Everything a step draws comes from generators seeded
by ``(seed, step)``, so a resumed run replays the same steps with the same metrics.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import numbers
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from . import learner
from .atomic import write_bytes, write_dir, write_text
from .policies import POLICIES, FullCache, budget_tokens, make_policy
from .sampler import NonFiniteLogitsError, Sampler, zero_in_float32
from .tasks import EOS, make_task
from .warmup import ModelConfig, SFTConfig, pretrained_policy

# The most sequences one sampler batch holds: a step's rollouts are one batch, evaluation is
# split into batches of this size.
MAX_BATCH = 4096


@dataclass
class TrainConfig:
    task: str = "kv-lookup"
    prompt_len: int = 256
    value_len: int = 2  # kv-lookup: answer tokens after the first are retrieved from the compressed cache
    method: str = "smd"
    algo: str = "grpo"  # grpo (group-normalised advantages) | ppo (value head + GAE)
    gamma: float = 1.0
    gae_lambda: float = 0.95
    vf_coef: float = 0.5
    policy: str = "snapkv"
    budget: float = 0.25
    page_size: int = 4  # short sequences: page rounding is paid once per sequence and layer
    # None: a sequence is evicted to its budget whenever it is a page over it; N: after the
    # prompt, then every N decode steps (Sparse-RL's schedule, DESIGN §6: 128).
    evict_every: int | None = None
    # None: whole prompts, many per prefill call; N: prompts prefilled N tokens at a time,
    # evicted at every chunk boundary (long prompts; the chunks at a position share a call).
    prefill_chunk: int | None = None
    # Sequences per learner forward/backward (gradients accumulated over a step's rollouts);
    # None: all of them at once. Changes memory, not the update (up to float rounding).
    micro_batch: int | None = None
    steps: int = 40
    prompts_per_step: int = 8
    group_size: int = 4
    epochs: int = 2
    lr: float = 1e-4
    clip: float = 0.2
    kl_ref: float = 0.0
    smd_beta: float = 0.1
    smd_direction: str = "forward"
    temperature: float = 1.0
    is_cap: float = 1.5
    is_reject_low: float = 0.5
    is_reject_high: float = 1.5
    is_veto: float = 1e-4
    eval_prompts: int = 64
    seed: int = 0
    init: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    ckpt_every: int = 5
    # Where rollouts and the learner run: cpu, cuda, or auto (cuda when torch sees a GPU and this
    # build has CUDA kernels). The warm-up of the default model always runs on the CPU (cached).
    device: str = "cpu"
    # float32, or bfloat16 mixed precision: rollouts from a bfloat16 copy of the weights, the
    # learner under autocast (bfloat16 matmuls and attention: the GPU's tensor-core kernels for
    # head dims 64/128), float32 master weights and optimizer.
    dtype: str = "float32"

    def check(self) -> None:
        """Raises ValueError naming the first bad setting (field and command-line flag), so that
        a run fails before its warm-up instead of training on NaN (temperature 0) or dividing
        by zero (page size 0) minutes later."""

        def need(ok: bool, name: str, what: str, value=None) -> None:
            if not ok:
                value = getattr(self, name) if value is None else value
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be {what}, got {value!r}")

        def number(name: str) -> float:
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), name,
                 "a finite number")
            return value

        need(self.method in learner.METHODS, "method", f"one of {', '.join(learner.METHODS)}")
        need(self.algo in ("grpo", "ppo"), "algo", "'grpo' or 'ppo'")
        need(self.policy in POLICIES, "policy", f"one of {', '.join(sorted(POLICIES))}")
        need(self.smd_direction in ("forward", "reverse"), "smd_direction", "'forward' or 'reverse'")
        try:
            if self.budget is None:  # budget_tokens' "no eviction": every method would run dense
                raise TypeError("must be a token count (int) or a fraction in (0, 1], got None")
            budget_tokens(self.budget, 1)
        except (TypeError, ValueError) as e:
            raise ValueError(f"budget (--budget): {e}") from None
        for name in ("page_size", "steps", "prompts_per_step", "group_size", "epochs", "ckpt_every", "eval_prompts"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, "an int >= 1")
        # GRPO's advantage is a reward minus its group's mean: a group of one learns nothing.
        need(self.algo != "grpo" or self.group_size >= 2, "group_size", "at least 2 with --algo grpo "
             "(a group of one has advantage 0)")
        need(isinstance(self.seed, int) and not isinstance(self.seed, bool) and -2**63 <= self.seed < 2**64, "seed",
             "an int in [-2**63, 2**64) (torch.manual_seed's range)")
        for name in ("evict_every", "prefill_chunk", "micro_batch"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1), name,
                 "an int >= 1 (or unset)")
        if self.prompts_per_step * self.group_size > MAX_BATCH:  # a step's rollouts are one sampler batch
            raise ValueError(f"prompts_per_step x group_size (--prompts-per-step {self.prompts_per_step} x "
                             f"--group-size {self.group_size} = {self.prompts_per_step * self.group_size}) must be "
                             f"at most {MAX_BATCH}, the rollouts of one step")
        if self.init is None:  # the default model, warmed up first
            need(isinstance(self.sft.steps, int) and self.sft.steps >= 1, "sft_steps", "an int >= 1", self.sft.steps)
            need(isinstance(self.prompt_len, int) and 8 <= self.prompt_len <= self.model.max_positions - 64,
                 "prompt_len", f"an int in [8, {self.model.max_positions - 64}] (the model's positions, less answers)")
        else:
            need(Path(self.init).is_dir(), "init", "a local model folder (from save_pretrained)")
            need(isinstance(self.prompt_len, int) and self.prompt_len >= 8, "prompt_len", "an int >= 8")
        for name in ("lr", "clip", "temperature", "is_cap"):  # the learner divides logits by temperature
            need(number(name) > 0, name, "> 0")
        need(not zero_in_float32(self.temperature), "temperature",
             "at least 1.4e-45 (float32's smallest positive number: the logits are divided by it)")
        need(self.task == "kv-lookup" or self.value_len == TrainConfig.value_len, "value_len",
             f"left at its default {TrainConfig.value_len}: only --task kv-lookup has values")
        for name in ("kl_ref", "smd_beta", "vf_coef", "is_veto", "is_reject_low"):
            need(number(name) >= 0, name, ">= 0")
        for name in ("gamma", "gae_lambda"):
            need(0 <= number(name) <= 1, name, "in [0, 1]")
        need(number("is_reject_high") >= self.is_reject_low, "is_reject_high", f">= is_reject_low ({self.is_reject_low})")
        need(self.device in ("cpu", "cuda", "auto"), "device", "'cpu', 'cuda' or 'auto'")
        need(self.dtype in ("float32", "bfloat16"), "dtype", "'float32' or 'bfloat16'")
        if self.device == "cuda" and (problem := _cuda_problem()) is not None:
            raise ValueError(f"device (--device) cuda: {problem}; use cpu or auto")
        if device_of(self).type == "cuda":  # else the first CUDA op refuses it, after the warm-up
            from .info import bad_kernel_choices

            if bad := bad_kernel_choices():
                var, value, allowed = bad[0]
                raise ValueError(f"{var}={value}: must be one of {', '.join(allowed)}")
        task = task_of(self)  # bad task settings (--value-len) fail here too
        if self.init is not None:
            check_init_model(self, task)
        elif self.prompt_len + task.max_answer_len > self.model.max_positions:  # copy's answer is its prompt
            raise ValueError(f"prompt_len (--prompt-len) {self.prompt_len}: --task {self.task}'s answers then take up "
                             f"to {task.max_answer_len} tokens, and prompt plus answer must fit the model's "
                             f"{self.model.max_positions} positions")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        # Run folders written before values had a length: kv-lookup's were one token; the other
        # tasks have no values and take the default (which check() requires of them).
        d.setdefault("value_len", 1 if d.get("task", cls.task) == "kv-lookup" else cls.value_len)
        if isinstance(d.get("init"), str):  # saved as typed before it was saved resolved: the run's own directory
            d["init"] = str(Path(d["init"]).resolve())
        d["model"] = ModelConfig(**d.get("model", {}))
        d["sft"] = SFTConfig(**d.get("sft", {}))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def same_budget(a, b) -> bool:
    """Whether two budgets are the same setting: ``1`` (one token) and ``1.0`` (the whole
    sequence) are equal numbers but not the same budget; kinds as ``budget_tokens`` reads them."""
    def kind(x):
        return "tokens" if isinstance(x, numbers.Integral) else "fraction"

    return a == b and kind(a) == kind(b)


def cuda_runs_here() -> bool:
    """Whether torch sees a CUDA device and this build has CUDA kernels for its arch."""
    return _cuda_problem() is None


def _cuda_problem() -> str | None:
    """Why ``--device cuda`` cannot run here (None when it can)."""
    from . import _C, info

    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if not _C.built_with_cuda():
        return "this build of shadowkv has no CUDA kernels (python -m shadowkv info)"
    major, minor = torch.cuda.get_device_capability()
    if not info.gpu_covered(major, minor, info.built_archs()):
        # Else `auto` picked the GPU and the first op refused it, after the warm-up.
        return (f"the GPU is sm_{major}{minor}, but this build has kernels for {info.built_archs()} only "
                f"(rebuild with SHADOWKV_CUDA_ARCHS={major}.{minor})")
    return None


def device_of(cfg: TrainConfig) -> torch.device:
    """The device a run uses (``auto`` resolved)."""
    if cfg.device == "auto":
        return torch.device("cuda" if cuda_runs_here() else "cpu")
    return torch.device(cfg.device)


def task_of(cfg: TrainConfig):
    """The task a config trains on."""
    return make_task(cfg.task, length=cfg.prompt_len, **({"value_len": cfg.value_len} if cfg.task == "kv-lookup" else {}))


def check_init_model(cfg: TrainConfig, task) -> None:
    """Raises ValueError (naming --init) unless ``cfg.init`` holds a model config whose vocabulary
    covers ``task``'s tokens. Reads only config.json, so a bad --init fails in the checks, not
    after the run folder was reset and the weights loaded."""
    from transformers import AutoConfig

    if not (Path(cfg.init) / "config.json").is_file():
        # transformers 4.x then guesses a model type from the folder's name ("empty" -> mpt).
        raise ValueError(f"init (--init) {cfg.init} is not a model folder from save_pretrained (no config.json)")
    try:
        config = AutoConfig.from_pretrained(cfg.init, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"init (--init) {cfg.init} is not a model folder from save_pretrained ({e})") from None
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < task.vocab_size:
        raise ValueError(f"init (--init) {cfg.init}: the model's vocabulary has {vocab} tokens, but --task {cfg.task} "
                         f"with --prompt-len {cfg.prompt_len} uses token ids up to {task.vocab_size - 1} "
                         f"(needs vocab_size >= {task.vocab_size})")
    # Learned position tables (GPT-2's n_positions) end there: a longer sequence was an IndexError
    # deep in the model after the run folder was reset.
    text = config.get_text_config()
    limit = getattr(text, "max_position_embeddings", None)
    rotary = any(getattr(text, a, None) is not None for a in (
        "rope_theta", "rope_parameters", "rope_scaling", "rotary_dim", "rotary_pct", "partial_rotary_factor"))
    if not rotary and isinstance(limit, int) and cfg.prompt_len + task.max_answer_len > limit:
        raise ValueError(f"init (--init) {cfg.init}: the model has {limit} positions, but --task {cfg.task} with "
                         f"--prompt-len {cfg.prompt_len} needs up to {cfg.prompt_len + task.max_answer_len} "
                         "(prompt and answer)")


def _seeded(cfg: TrainConfig, step: int, salt: int) -> torch.Generator:
    """A generator for one purpose (``salt``) of one step; hashing keeps the streams apart
    (evaluation uses step -1)."""
    digest = hashlib.sha256(f"{cfg.seed}/{step}/{salt}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:7], "little"))


def make_sampler(cfg: TrainConfig, model, dense: bool) -> Sampler:
    if dense:
        return Sampler(model, FullCache(), None, page_size=cfg.page_size, max_batch=MAX_BATCH,
                       prefill_chunk=cfg.prefill_chunk)
    return Sampler(model, make_policy(cfg.policy), cfg.budget, page_size=cfg.page_size, max_batch=MAX_BATCH,
                   evict_every=cfg.evict_every, prefill_chunk=cfg.prefill_chunk)


def rewards_of(task, rollout, answers) -> torch.Tensor:
    """``[B]`` rewards on the CPU (the answers are CPU tensors; one copy of the tokens)."""
    tokens, action = rollout.tokens.cpu(), rollout.action_mask.cpu()
    return torch.tensor([task.reward(tokens[b][action[b]], ans) for b, ans in enumerate(answers)])


def evaluate(cfg: TrainConfig, task, model) -> float:
    """Greedy reward on held-out prompts, with the method's own cache (dense for ``dense``), in
    batches the sampler takes (--eval-prompts may exceed its max_batch)."""
    prompts, answers = task.sample(cfg.eval_prompts, _seeded(cfg, -1, 99))
    sampler = make_sampler(cfg, model, cfg.method == "dense")
    rewards = []
    for i in range(0, len(prompts), sampler.max_batch):
        chunk = slice(i, i + sampler.max_batch)
        r = sampler.generate(prompts[chunk], task.max_answer_len, temperature=0.0, eos_token_id=EOS)
        sampler.release()
        rewards.append(rewards_of(task, r, answers[chunk]))
    return torch.cat(rewards).mean().item()


def rollout_model(cfg: TrainConfig, model):
    """The model the sampler runs: ``model`` itself, or its bfloat16 copy (``--dtype bfloat16``),
    which :func:`sync_rollout_model` keeps equal to the rounded master weights."""
    if cfg.dtype == "float32":
        return model
    import copy

    rollout = copy.deepcopy(model).eval().requires_grad_(False)
    # The parameters only: .to(dtype) also rounded the float32 buffers, RoPE's inv_freq among
    # them (0.5623 -> 0.5625), so the sampler rotated keys by other angles than the learner,
    # whose RoPE autocast leaves in float32 (mean |dlogp| 5.3e-3 instead of 4.3e-3 with SnapKV
    # 25% on 1000-token prompts). from_pretrained(dtype=bfloat16) keeps them float32 too.
    for p in rollout.parameters():
        p.data = p.data.to(getattr(torch, cfg.dtype))
    return rollout


@torch.no_grad()
def sync_rollout_model(rollout, model) -> None:
    if rollout is not model:
        for r, m in zip(rollout.parameters(), model.parameters()):
            r.copy_(m)


def learner_precision(cfg: TrainConfig, model):
    """The context the learner's forwards run in: autocast to ``cfg.dtype`` (a no-op for float32)."""
    device = next(model.parameters()).device.type
    return torch.autocast(device_type=device, dtype=getattr(torch, cfg.dtype), enabled=cfg.dtype != "float32")


def rl_step(cfg: TrainConfig, task, model, ref_model, opt, sampler, step: int, value_head=None) -> dict:
    """One GRPO (or PPO) step; returns its metrics. ``sampler`` runs ``model`` or its rollout
    copy (:func:`rollout_model`), which is re-synced after the update."""
    prompts, answers = task.sample(cfg.prompts_per_step, _seeded(cfg, step, 1))
    prompts = [p for p in prompts for _ in range(cfg.group_size)]
    answers = [a for a in answers for _ in range(cfg.group_size)]
    seed = int(_seeded(cfg, step, 2).initial_seed() % 2**62)
    model.eval()
    rollout = sampler.generate(prompts, task.max_answer_len, temperature=cfg.temperature, seed=seed, eos_token_id=EOS)
    sampler.release()  # the learner's step runs without the rollout's KV pool
    rewards = rewards_of(task, rollout, answers).to(rollout.tokens.device)
    loss_cfg = learner.LossConfig(
        method=cfg.method, clip=cfg.clip, kl_ref=cfg.kl_ref, smd_beta=cfg.smd_beta, smd_direction=cfg.smd_direction,
        temperature=cfg.temperature, vf_coef=cfg.vf_coef,
        is_cfg=learner.ISConfig(cap=cfg.is_cap, reject_low=cfg.is_reject_low, reject_high=cfg.is_reject_high,
                                veto=cfg.is_veto),
    )
    mask = rollout.action_mask
    # The learner's forwards run micro_batch sequences at a time (all at once by default): its
    # logits ([rows, answer positions, vocabulary] float32, twice with SMD's teacher) and
    # activations are what bounds the batch, not the sampler's KV cache. Each is cut after its
    # longest sequence (learner.micro_batches) and replayed packed, without padding.
    chunks = learner.micro_batches(rollout, cfg.micro_batch)
    T = mask.shape[1]

    def rows_of(c):
        return rollout.rows(c.rows, c.cols)

    def by_chunk(fn) -> torch.Tensor:
        return learner.gather_rows([fn(rows_of(c)) for c in chunks], T)

    old_logp, weights, keep, teacher, ref_logp = rollout.logprobs, None, None, None, None
    with torch.no_grad(), learner_precision(cfg, model):
        if cfg.method == "is":
            old_logp = by_chunk(lambda part: learner.token_logprobs(model, part, "dense", cfg.temperature))
            weights, keep = learner.is_weights(old_logp, rollout.logprobs, mask, loss_cfg.is_cfg)
        if cfg.kl_ref > 0:
            ref_logp = by_chunk(lambda part: learner.token_logprobs(ref_model, part, loss_cfg.learner_mask,
                                                                    cfg.temperature))
        returns = None
        if value_head is None:
            adv = learner.grpo_advantages(rewards, cfg.group_size)
        else:
            values = by_chunk(lambda part: value_head(
                learner.replay_rows(model, part, loss_cfg.learner_mask, return_hidden=True)))
            adv, returns = learner.gae(rewards, values, mask, cfg.gamma, cfg.gae_lambda)
            valid = adv[mask]
            std = valid.std() if valid.numel() > 1 else torch.tensor(1.0)
            adv = (adv - valid.mean()) / (std + 1e-6) * mask  # whitened over the batch's tokens
    counts = learner.loss_counts(rollout, keep)

    stats0 = {}
    for epoch in range(cfg.epochs):
        opt.zero_grad(set_to_none=True)
        total, stats_sum, logps = 0.0, {}, []
        for c in chunks:
            part = rows_of(c)
            if cfg.method == "smd" and cfg.smd_beta > 0:
                # DESIGN §6's teacher has the student's weights: after an epoch's update the last
                # teacher would pull the student back to the old weights (a stray trust region).
                with torch.no_grad(), learner_precision(cfg, model):
                    teacher = learner.replay_rows(model, part, "dense")
            model.train()
            with learner_precision(cfg, model):
                loss, stats = learner.policy_loss(model, part, c.take(adv), c.take(old_logp), loss_cfg,
                                                  c.take(weights), c.take(keep), teacher, c.take(ref_logp),
                                                  value_head, c.take(returns), counts)
            loss.backward()  # the micro-batches' gradients add up to the batch's
            model.eval()
            total += loss.item()
            teacher = loss = None  # not held while the next micro-batch's teacher is computed
            logps.append(stats.pop("logp"))
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + v
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        if epoch == 0:
            stats0 = {**stats_sum, "logp": learner.gather_rows(logps, T), "loss": total}
    sync_rollout_model(sampler.model, model)
    n = mask.sum().clamp_min(1)
    delta = (rollout.logprobs - stats0.pop("logp")) * mask
    return {
        "step": step,
        "reward": rewards.mean().item(),
        "kv_peak_bytes": rollout.kv_peak_bytes,
        "dense_kv_bytes": rollout.dense_kv_bytes,
        "kv_ratio": rollout.kv_peak_bytes / rollout.dense_kv_bytes,
        "mismatch_abs": (delta.abs().sum() / n).item(),
        "mismatch_kl": (delta.sum() / n).item(),  # k1 estimate of KL(sampler || learner)
        **{k: v for k, v in stats0.items()},
        "is_kept_frac": (keep.sum() / n).item() if keep is not None else 1.0,
        "tokens_per_s": rollout.timings["tokens_per_s"],
    }


# ---- run folder: config.json, metrics.jsonl, ckpt-<step>/ + LATEST, curves.png
def save_checkpoint(out: Path, model, opt, step: int, value_head=None) -> None:
    """Writes ``ckpt-<step>/`` then flips ``LATEST`` to it; a kill at any point leaves the
    previous checkpoint intact."""
    def fill(folder: Path) -> None:
        model.save_pretrained(folder)
        torch.save({"opt": opt.state_dict(), "step": step,
                    "value_head": value_head.state_dict() if value_head is not None else None}, folder / "trainer.pt")

    final = out / f"ckpt-{step}"
    write_dir(final, fill)
    previous = (out / "LATEST").read_text().strip() if (out / "LATEST").exists() else None
    write_text(out / "LATEST", final.name)
    if previous and previous != final.name:
        shutil.rmtree(out / previous, ignore_errors=True)


def load_checkpoint(out: Path):
    """(model, trainer state dict, next step) of the run in ``out``, or None."""
    from transformers import AutoModelForCausalLM

    if not (out / "LATEST").exists():
        return None
    try:
        ck = out / (out / "LATEST").read_text().strip()
    except (OSError, ValueError) as e:
        raise ValueError(f"--resume: {out / 'LATEST'} cannot be read ({e}); start a new run") from None
    # A checkpoint of this run: from_pretrained would take a missing folder for a Hub repo id,
    # and save_checkpoint later deletes the folder LATEST named (../other-run/ckpt-9 too).
    if ck.parent != out or not ck.name.startswith("ckpt-") or not ck.is_dir():
        raise ValueError(f"--resume: {out / 'LATEST'} names {ck}, which is not a ckpt-* folder of this run; "
                         "start a new run")
    try:
        model = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32, local_files_only=True)
        # On the CPU: a run trained on a GPU may resume where there is none (load_state_dict
        # moves the optimizer state to the parameters' device).
        state = torch.load(ck / "trainer.pt", weights_only=True, map_location="cpu")
        return model, state, int(state["step"]) + 1
    except Exception as e:  # a checkpoint damaged outside shadowkv (its own writes are atomic)
        raise ValueError(f"--resume: the checkpoint {ck} named by {out / 'LATEST'} cannot be loaded "
                         f"({type(e).__name__}: {e}); start a new run") from None


def read_metrics(out: str | Path) -> list[dict]:
    """The rows of ``out/metrics.jsonl`` ([] when there is none). A last line without its newline
    is a row a kill cut short; its step had no checkpoint yet, so a resume replays it: dropped."""
    p = Path(out) / "metrics.jsonl"
    if not p.exists():
        return []
    try:
        lines = p.read_text().split("\n")[:-1]  # drops "" after the final newline, or a torn last row
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{p} cannot be read ({e})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} line {number} is not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or isinstance(row["step"], bool):
            raise ValueError(f"{p} line {number} is not a metrics row (a JSON object with an integer \"step\")")
        rows.append(row)
    return rows


def plot_curves(curves: dict[str, list[dict]], path: Path, title: str) -> None:
    """reward, KV peak / dense and sampler/learner mismatch per step, one line per label
    (``{label: metrics rows}``): one run in ``curves.png``, one method each in ``compare.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    for label, rows in curves.items():
        steps = [r["step"] for r in rows]
        ax[0].plot(steps, [r["reward"] for r in rows], label=label)
        ax[1].plot(steps, [r["kv_ratio"] for r in rows], label=label)
        ax[2].semilogy(steps, [max(r["mismatch_abs"], 1e-12) for r in rows], label=label)
    ax[0].set(title="reward (train rollouts)", xlabel="step", ylim=(0, 1.05))
    # Up to 1.15 at least, so the dense level (1.0) shows; dense runs with big pages go above it.
    kv_top = max([1.15] + [1.05 * r["kv_ratio"] for rows in curves.values() for r in rows])
    ax[1].set(title="KV peak / dense KV", xlabel="step", ylim=(0, kv_top))
    ax[2].set(title="sampler/learner mean |Δlogp|", xlabel="step")
    if len(curves) > 1:
        ax[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    # Rendered in memory and written atomically like the run's other files: a kill while
    # saving leaves the previous plot, not a truncated PNG.
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buf.getvalue())


class _RunLock:
    """An exclusive lock on the run folder for one train() call, so that a second process
    writing the same --out is refused instead of mixing two runs' files."""

    def __init__(self, out: Path):
        self.path = out / ".lock"

    def __enter__(self):
        import fcntl

        try:
            self._file = open(self.path, "w")
        except OSError as e:  # a read-only folder, or .lock a folder
            raise ValueError(f"--out {self.path.parent}: cannot create its lock file {self.path.name} "
                             f"({e.strerror or e})") from None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise ValueError(f"--out {self.path.parent} is in use by another shadowkv run") from None
        return self

    def __exit__(self, *exc):
        self._file.close()  # releases the lock


class _StopFlag:
    """First Ctrl-C: finish the current step, checkpoint, stop. Second: stop now.

    Only the main thread can install a signal handler (and receives Ctrl-C); a run in another
    thread goes on without one."""

    def __init__(self):
        self.set = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, *_):
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        print("\nshadowkv: stopping after this step (Ctrl-C again to abort)", flush=True)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _resumed_config(out: Path, overrides: dict | None) -> tuple[TrainConfig, bool]:
    """The run's saved config with ``overrides`` (the settings the user gave again, by
    field name; ``sft_steps`` for ``sft.steps``) applied, and whether that changed it. Only
    ``steps`` (upwards: it extends the run), ``device`` and ``micro_batch`` (memory only: a run
    that ran out of it resumes with smaller micro-batches) may change; any other difference is a
    ``ValueError`` naming it, because it would change what the replayed steps mean."""
    try:
        cfg = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    except (ValueError, TypeError, AttributeError, OSError) as e:  # bad JSON or UTF-8, not an object, a folder
        raise ValueError(f"--resume: {out / 'config.json'} cannot be read ({e}); start a new run") from None
    saved = {**{f.name: getattr(cfg, f.name) for f in fields(cfg)}, "sft_steps": cfg.sft.steps}

    def differs(name: str, given) -> bool:
        return not same_budget(saved[name], given) if name == "budget" else saved[name] != given

    changed = {k: v for k, v in (overrides or {}).items() if differs(k, v)}
    fixed = sorted(k for k in changed if k not in ("steps", "device", "micro_batch"))
    if fixed:
        raise ValueError(f"--resume: the run in {out} was trained with "
                         + ", ".join(f"{k}={saved[k]!r}" for k in fixed)
                         + "; only --steps, --device and --micro-batch can change on resume "
                         "(drop the other flags, or start a new run with another --out)")
    if changed.get("steps", cfg.steps) < cfg.steps:
        raise ValueError(f"--resume: --steps {changed['steps']} is fewer than the run's {cfg.steps}; a resume "
                         "can only extend a run")
    cfg.steps = changed.get("steps", cfg.steps)
    cfg.device = changed.get("device", cfg.device)  # before the check: a GPU run may move to a CPU machine
    cfg.micro_batch = changed.get("micro_batch", cfg.micro_batch)
    cfg.check()  # a saved config edited by hand is held to the same rules, and so is a new device
    return cfg, bool(changed)


def _resume_point(out: Path, overrides: dict | None):
    """(config, whether overrides changed it, checkpoint or None, first step to run, metrics rows
    before it) of the run in ``out``. Checked before the warm-up and before the folder changes:
    a damaged config, checkpoint or log fails in seconds, naming the file."""
    cfg, changed = _resumed_config(out, overrides)
    saved = load_checkpoint(out)
    start = saved[2] if saved is not None else 0
    rows = [r for r in read_metrics(out) if r["step"] < start]  # later steps are replayed
    if [r["step"] for r in rows] != list(range(start)):
        raise ValueError(f"--resume: {out / 'metrics.jsonl'} does not hold steps 0..{start - 1} of the "
                         f"checkpoint's run (it was changed or lost); start a new run")
    return cfg, changed, saved, start, rows


def _remove(path: Path) -> None:
    """Removes a file or a folder tree (a kill can leave either as ``.tmp-*``)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _prepare_folder(out: Path, cfg: TrainConfig, resume: bool, write_config: bool) -> None:
    """Brings ``out`` to the state the run starts from; called once every check has passed."""
    (out / "summary.json").unlink(missing_ok=True)  # rewritten when the run finishes
    if resume:
        # What a kill can leave beside the checkpoint LATEST names (each a full model copy).
        latest = (out / "LATEST").read_text().strip() if (out / "LATEST").exists() else None
        leftovers = [*out.glob(".tmp-*"), *(p for p in out.glob("ckpt-*") if p.name != latest)]
    else:  # a fresh run never resumes another run's weights later: drop old checkpoints
        leftovers = [*out.glob("ckpt-*"), *out.glob(".tmp-*"), out / "LATEST"]
    for old in leftovers:
        _remove(old)
    if write_config:
        write_text(out / "config.json", json.dumps(asdict(cfg), indent=2))


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, progress: bool = True,
          max_steps_this_run: int | None = None, overrides: dict | None = None) -> dict:
    """Runs (or resumes) a training run in ``out``; returns the summary dict (``stopped``: a
    Ctrl-C ended it early; ``eval_reward`` and ``summary.json`` only when it finished).

    A resumed run takes its settings from ``out/config.json`` (``cfg`` is ignored), except
    that ``overrides={"steps": 80}`` extends a finished 40-step run; an override that differs
    from any other saved setting is a ``ValueError``.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # checkpoint writes would interleave with our bar
    out = Path(out)
    if resume and not (out / "config.json").exists():
        raise ValueError(f"--resume: {out / 'config.json'} does not exist, so there is no run to resume "
                         "(drop --resume to start one)")
    if not resume:
        if cfg.init is not None:  # config.json names the folder from anywhere (a resume from another directory)
            cfg = replace(cfg, init=str(Path(cfg.init).resolve()))
        cfg.check()  # before the folder is created or anything in it changes
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: {e.strerror or e}") from None
    with _RunLock(out):
        return _train_locked(cfg, out, resume, progress, max_steps_this_run, overrides)


def _diverged(cfg: TrainConfig, step: int, what) -> str:
    """The error of a run whose update at ``step`` made the policy non-finite."""
    return (f"step {step}'s update diverged ({what}): lower --lr (now {cfg.lr}); the last checkpoint "
            "holds the weights before it")


def _initial_model(cfg: TrainConfig, task, progress: bool):
    """The run's initial policy: the ``--init`` folder, or the warmed-up default model (trained
    once per setting, then loaded from the model cache)."""
    from tqdm.auto import tqdm

    if cfg.init:
        from transformers import AutoModelForCausalLM

        try:  # its config was checked; the weights may still be missing or damaged
            return AutoModelForCausalLM.from_pretrained(cfg.init, dtype=torch.float32).eval()
        except Exception as e:  # OSError, ValueError, safetensors' SafetensorError for a damaged file
            raise ValueError(f"init (--init) {cfg.init}: the model cannot be loaded ({e})") from None
    bar = tqdm(total=cfg.sft.steps, desc="SFT warm-up", disable=not progress, leave=False)
    base = pretrained_policy(task, cfg.model, cfg.sft, progress=lambda loss: (bar.update(), bar.set_postfix(loss=f"{loss:.3f}")))
    bar.close()
    return base


def _train_locked(cfg, out: Path, resume: bool, progress: bool, max_steps_this_run, overrides) -> dict:
    from tqdm.auto import tqdm

    if resume:
        cfg, write_config, saved, start, rows = _resume_point(out, overrides)
    else:  # cfg.check() passed in train(); a fresh run writes its config
        write_config, saved, start, rows = True, None, 0, []
    torch.manual_seed(cfg.seed)
    task = task_of(cfg)
    # The initial weights are loaded and checked before the folder changes: an --init whose
    # weights are missing or damaged, or which the sampler refuses, used to fail after the
    # previous run's checkpoints were deleted. A resume trains its checkpoint and needs them only
    # as the KL reference (it re-ran a whole warm-up on a machine without the model cache).
    base = None
    if saved is None or cfg.kl_ref > 0:
        base = _initial_model(cfg, task, progress)
        if cfg.init and saved is None:
            try:
                make_sampler(cfg, base, cfg.method == "dense")
            except (NotImplementedError, TypeError) as e:
                raise ValueError(f"init (--init) {cfg.init}: {e}") from None
    _prepare_folder(out, cfg, resume, write_config)
    device = device_of(cfg)
    ref_model = None
    if cfg.kl_ref > 0:  # the frozen initial policy
        import copy

        ref_model = copy.deepcopy(base).to(device).eval().requires_grad_(False)
    # A resume trains the checkpoint: the initial weights are not moved to the device (nor kept,
    # a whole float32 model of GPU memory for the run).
    model, trainer_state = (base, None) if saved is None else saved[:2]
    del base
    model = model.to(device)
    learner.disable_dropout(model)  # an --init model's: the learner trains in training mode
    value_head = learner.ValueHead(model.config.hidden_size).to(device) if cfg.algo == "ppo" else None
    params = list(model.parameters()) + (list(value_head.parameters()) if value_head is not None else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    if trainer_state is not None:
        opt.load_state_dict(trainer_state["opt"])
        if value_head is not None:
            value_head.load_state_dict(trainer_state["value_head"])
    write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    sampler = make_sampler(cfg, rollout_model(cfg, model), cfg.method == "dense")
    end = cfg.steps if max_steps_this_run is None else min(cfg.steps, start + max_steps_this_run)
    bar = tqdm(range(start, end), desc=f"RL {cfg.method}", disable=not progress, initial=start, total=cfg.steps)
    t0 = time.perf_counter()
    with _StopFlag() as stop, open(out / "metrics.jsonl", "a") as log:
        for step in bar:
            try:
                row = rl_step(cfg, task, model, ref_model, opt, sampler, step, value_head)
            except NonFiniteLogitsError as e:
                raise ValueError(_diverged(cfg, step - 1, e) if step > start else
                                 f"step {step}: {e}. The weights the run started from are not finite") from None
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.set_postfix(reward=f"{row['reward']:.2f}", kv=f"{row['kv_ratio']:.2f}x",
                            mism=f"{row['mismatch_abs']:.1e}")
            if (step + 1) % cfg.ckpt_every == 0 or step + 1 == end or stop.set:
                if not bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()):  # one sync
                    raise ValueError(_diverged(cfg, step, "the weights are no longer finite"))  # not saved
                os.fsync(log.fileno())  # the rows a checkpoint's resume needs reach the disk first
                save_checkpoint(out, model, opt, step, value_head)
            if stop.set:
                break
    # A stopped run is not evaluated even after its last step (Ctrl-C means stop now); its
    # resume runs no step and evaluates.
    finished = bool(rows) and rows[-1]["step"] == cfg.steps - 1 and not stop.set
    summary = {"method": cfg.method, "steps_done": len(rows), "seconds": time.perf_counter() - t0,
               "device": str(device), "stopped": stop.set}
    if rows:
        last = rows[-max(1, len(rows) // 5):]
        summary.update({
            "final_train_reward": sum(r["reward"] for r in last) / len(last),
            "kv_ratio": max(r["kv_ratio"] for r in rows),
            "mismatch_abs": sum(r["mismatch_abs"] for r in rows) / len(rows),
        })
        plot_curves({cfg.method: rows}, out / "curves.png", f"{cfg.task} · {cfg.method} · {cfg.policy} @ {cfg.budget}")
    if finished:
        try:
            summary["eval_reward"] = evaluate(cfg, task, sampler.model)
        except NonFiniteLogitsError as e:
            raise ValueError(_diverged(cfg, end - 1, e)) from None
        write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary
