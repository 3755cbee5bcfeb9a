"""Training and scoring one adapter run on a frozen causal LM, the same way for every
method: the data order and the adapter-init seed come from the run's seed, the
optimiser from the method's options, the loss is cross-entropy on completion tokens.

With ``adapted_layers`` (adapters on the last k decoder layers only) the frozen first
layers' hidden states are computed once per problem and every run trains and scores
on them (``Stack``): the same logits as the whole model at a fraction of the cost.
Greedy decoding for exact match always runs the whole adapted model."""

from __future__ import annotations

import copy
import re
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from peft import PeftModel, PromptLearningConfig, get_peft_model
from torch import Tensor, nn
from transformers import GenerationConfig, get_scheduler
from transformers.masking_utils import create_causal_mask

from cera_rs.compare.data import Encoded, Problems, encode, end_token
from cera_rs.compare.methods import Method


class Stack:
    """A decoder split in two: the frozen first layers, run once per problem
    (``prefix``), and the last ``k`` layers with the norm and the head (``logits``),
    run by every step. Right padding needs no mask: attention is causal, so a real
    token never sees the padding after it."""

    def __init__(self, model: nn.Module, k: int) -> None:
        inner = getattr(model, "model", None)
        if not all(
            hasattr(inner, a) for a in ("layers", "embed_tokens", "rotary_emb", "norm")
        ) or not hasattr(model, "lm_head"):
            raise ValueError(
                f"adapted_layers needs a Llama-style decoder (model.layers, "
                f"embed_tokens, rotary_emb, norm, lm_head); "
                f"{type(model).__name__} is not one: compare without "
                "adapted_layers"
            )
        if not 0 < k <= len(inner.layers):
            raise ValueError(f"adapted_layers={k}: the model has {len(inner.layers)} layers")
        self.model = model
        self.inner = inner
        self.split = len(inner.layers) - k

    def _layers(self, h: Tensor, layers) -> Tensor:
        positions = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        rotary = self.inner.rotary_emb(h, positions)
        # The cache positionally: transformers 5.24 renamed the argument (past_key_values).
        mask = create_causal_mask(self.inner.config, h, None, None, position_ids=positions)
        for layer in layers:
            h = layer(h, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
        return h

    @torch.no_grad()
    def prefix(self, ids: Tensor, batch: int = 256) -> Tensor:
        """Hidden states after the first ``split`` layers, (n, T, d)."""
        out = []
        for i in range(0, len(ids), batch):
            h = self.inner.embed_tokens(ids[i : i + batch])
            out.append(self._layers(h, self.inner.layers[: self.split]))
        return torch.cat(out)

    def suffix(self, hidden: Tensor) -> Tensor:
        return self._layers(hidden, self.inner.layers[self.split :])

    def logits(self, hidden: Tensor, owners: Tensor, positions: Tensor) -> Tensor:
        """Logits at ``(owners, positions)`` from prefix states: the head runs on those
        positions only."""
        h = self.suffix(hidden)
        return self.model.lm_head(self.inner.norm(h[owners, positions]))


class Suffix(nn.Module):
    """The adapted last layers as a model of their own, run on cached prefix states
    (what the spectra and the linearity stream through). The decoder is held as
    ``model``, as in the causal LM, so adapted layers keep their names
    (``model.layers.N.self_attn.q_proj``)."""

    def __init__(self, stack: Stack) -> None:
        super().__init__()
        self.model = stack.inner
        self.stack = stack

    def forward(self, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.stack.suffix(hidden)  # the analyses drop padded tokens by the mask


@dataclass
class Split:
    """One split's problems, and their prefix states when the stack is used."""

    data: Encoded
    hidden: Tensor | None

    def batches(self, batch: int = 64) -> list[dict]:
        """Inputs for the spectral and linearity passes, with the ``attention_mask``
        they read to leave padding out: prefix states or token ids."""
        out = []
        for i in range(0, len(self.data), batch):
            rows = torch.arange(i, min(i + batch, len(self.data)))
            width = int(self.data.lengths[rows].max())
            mask = self.data.attention_mask(rows, width)
            if self.hidden is not None:
                out.append({"hidden": self.hidden[rows, :width], "attention_mask": mask})
            else:
                out.append({"input_ids": self.data.ids[rows, :width], "attention_mask": mask})
        return out


@dataclass
class TrainStats:
    train_loss: float  # mean of the last tenth of the steps
    train_time: float  # seconds
    tokens: int  # real tokens in the training batches
    samples: int
    memory: dict  # bytes: avg, max, 99th
    optimizer: dict  # what the training used: optimiser, rate, weight decay, clip, schedule
    curve: list  # at each quarter: step, train_loss (over it), valid_loss, valid_exact_match


def quarters(steps: int) -> list[int]:
    """The steps at which a run's losses are recorded: the end of each quarter."""
    return sorted({max(1, steps * k // 4) for k in range(1, 5)})


@contextmanager
def memory_samples(device: torch.device, interval: float = 0.01) -> Iterator[list[int]]:
    """Memory in use above its level at entry, sampled every ``interval`` seconds while
    the block runs: the resident set on CPU; on a GPU the CUDA allocator's reserved
    bytes, and at the end its peak allocation."""
    from cera_rs.measure import rss_bytes, sampled

    if device.type != "cuda":
        with sampled(rss_bytes, interval) as samples:
            yield samples
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    allocated = torch.cuda.memory_allocated(device)
    with sampled(lambda: torch.cuda.memory_reserved(device), interval) as samples:
        yield samples
        torch.cuda.synchronize(device)
    samples.append(torch.cuda.max_memory_allocated(device) - allocated)


def _memory_figures(samples: list[int]) -> dict:
    arr = np.maximum(np.array(samples or [0], dtype=np.int64), 0)
    return {"avg": int(arr.mean()), "max": int(arr.max()), "99th": int(np.quantile(arr, 0.99))}


@contextmanager
def peft_quietly() -> Iterator[None]:
    """PEFT's model wrapper reads transformers' deprecated ``is_gradient_checkpointing``:
    a warning to PEFT's authors, not to the user, that printed inside the progress bar."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning
        )
        yield


class Runner:
    """The frozen base model, the problems encoded (and their prefix states), and the
    training settings every method shares."""

    def __init__(
        self,
        base: nn.Module,
        tokenizer,
        problems: Problems,
        *,
        steps: int,
        batch: int,
        adapted_layers: int | None,
        device: torch.device,
        max_seq_length: int | None = None,
    ) -> None:
        self.base = base.to(device)
        self.problems = problems
        self.tokenizer = tokenizer
        self.steps, self.batch = steps, batch
        self.device = device
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        )
        self.eos = end_token(tokenizer)
        self.stack = Stack(base, adapted_layers) if adapted_layers else None
        self._frozen = self._base_state()
        self.splits: dict[str, Split] = {}
        self._base_nats: dict[str, np.ndarray] = {}
        for name in problems.splits:
            same = next((k for k in self.splits if problems.split(k) == problems.split(name)), None)
            if same is not None:  # e.g. phonebook: valid and test are the training facts
                self.splits[name] = self.splits[same]
                continue
            data = encode(tokenizer, problems.split(name), max_seq_length)
            data.ids = data.ids.to(device)
            hidden = None
            if self.stack is not None:
                with self.autocast:
                    hidden = self.stack.prefix(data.ids)
            self.splits[name] = Split(data, hidden)
        if self.stack is not None:
            self._check_stack()

    def _check_stack(self, rows: int = 4) -> None:
        """The split forward gives the whole model's logits on a few training problems,
        or the model computes something the split leaves out (a logit soft-cap, ...)."""
        split = self.splits["train"]
        picked = torch.arange(min(rows, len(split.data)))
        owners, positions, _, _ = split.data.answer_positions(picked)
        width = int(split.data.lengths[picked].max())
        with torch.no_grad():
            ids = split.data.ids[picked.to(self.device), :width]
            full = self.base(input_ids=ids).logits[owners, positions].float()
            hidden = self.stack.prefix(ids)
            cached = self.stack.logits(
                hidden, owners.to(self.device), positions.to(self.device)
            ).float()
        if not torch.allclose(cached, full, rtol=1e-3, atol=1e-3):
            raise ValueError(
                f"adapted_layers: {type(self.base).__name__}'s logits differ from "
                "its decoder layers run in two parts (max difference "
                f"{float((cached - full).abs().max()):.3g}); compare without "
                "adapted_layers"
            )

    def _base_state(self) -> list[tuple[int, int, bool]]:
        return [(p.data_ptr(), p._version, p.requires_grad) for p in self.base.parameters()]

    def check_base(self, method: Method) -> None:
        """Every run shares the frozen base's weights; a method that writes to them (a
        PiSSA-style init) or trains them (``bias="all"``) would change every later run."""
        if self._base_state() != self._frozen:
            for p in self.base.parameters():
                p.requires_grad_(False)
            raise ValueError(
                f"{method.name}: writes to or trains the base model's own weights "
                "(an init such as PiSSA, OLoRA or CorDA, or bias='all'), which "
                "every run of a comparison shares; compare it on its own"
            )

    @property
    def adapted_layers(self) -> list[int] | None:
        if self.stack is None:
            return None
        return list(range(self.stack.split, len(self.stack.inner.layers)))

    def copy_base(self) -> nn.Module:
        """A copy of the base model that shares its frozen weights (copies none)."""
        return copy.deepcopy(self.base, memo={id(p): p for p in self.base.parameters()})

    def build(self, method: Method, seed: int) -> PeftModel:
        """The method's adapters on a copy of the base that shares its frozen weights,
        initialised from ``seed`` (not from whatever earlier runs left in the global
        generator)."""
        torch.manual_seed(seed)
        model = self.copy_base()
        config = method.config(self.adapted_layers)
        if self.stack is not None and isinstance(config, PromptLearningConfig):
            raise ValueError(
                f"{method.name}: a prompt-learning method changes the input, not "
                "the last layers; compare without adapted_layers"
            )
        with peft_quietly():
            model = get_peft_model(model, config)
        self.check_base(method)
        if self.stack is not None:
            self._check_below_split(model, method)
        return model.to(self.device)

    def _check_below_split(self, model: nn.Module, method: Method) -> None:
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            layer = re.search(r"\.layers\.(\d+)\.", name)
            if (layer and int(layer.group(1)) < self.stack.split) or "embed_tokens" in name:
                raise ValueError(
                    f"{method.name}: trains {name}, below the last adapted layers "
                    "whose inputs are cached; compare without adapted_layers"
                )

    def stack_of(self, model: PeftModel) -> Stack:
        return Stack(model.get_base_model(), len(self.stack.inner.layers) - self.stack.split)

    def _logits(
        self, model: PeftModel, split: Split, rows: Tensor, stack: Stack | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Logits predicting each completion token of ``rows``, the tokens, and the
        index of their problem."""
        data = split.data
        owners, positions, targets, problem = data.answer_positions(rows.cpu())
        width = int(data.lengths[rows.cpu()].max())
        owners, positions = owners.to(self.device), positions.to(self.device)
        with self.autocast:
            if stack is not None:
                logits = stack.logits(split.hidden[rows, :width], owners, positions)
            else:
                ids = data.ids[rows, :width]
                out = model(
                    input_ids=ids,
                    attention_mask=data.attention_mask(rows.cpu(), width).to(self.device),
                )
                full = out.logits
                shift = full.shape[1] - width  # virtual tokens of prompt-learning methods
                logits = full[owners, positions + shift]
        return logits.float(), targets.to(self.device), problem

    def train(self, model: PeftModel, method: Method, lr: float, seed: int, bar=None) -> TrainStats:
        """AdamW at a constant rate with clipping 1.0 unless the method's training
        options say otherwise; batches drawn from ``seed`` (the same for every method);
        the train and valid loss recorded at each quarter (the valid passes are left
        out of the run's time)."""
        opts = method.training
        kwargs = {"weight_decay": 0.0, **opts.get("optimizer_kwargs", {}), "lr": lr}
        optimizer_type = opts.get("optimizer_type", "AdamW")
        if not isinstance(getattr(torch.optim, optimizer_type, None), type):
            raise ValueError(
                f"{method.name}: optimizer_type {optimizer_type!r} is not a torch.optim optimiser"
            )
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{method.name}: no trainable parameters")
        opt = getattr(torch.optim, optimizer_type)(params, **kwargs)
        schedule = get_scheduler(
            opts.get("lr_scheduler", "constant"),
            opt,
            num_warmup_steps=0,
            num_training_steps=self.steps,
        )
        clip = opts.get("grad_norm_clip", 1.0)
        used = {
            "optimizer": optimizer_type,
            **{k: v for k, v in kwargs.items() if k != "lr"},
            "lr": lr,
            "clip": clip,
            "schedule": opts.get("lr_scheduler", "constant"),
        }
        probes, curve, since, probing = set(quarters(self.steps)), [], 0, 0.0
        split = self.splits["train"]
        stack = self.stack_of(model) if self.stack is not None else None
        order = torch.Generator().manual_seed(seed)
        losses, tokens = [], 0
        model.train()
        start = time.perf_counter()
        with memory_samples(self.device) as samples:
            for step in range(1, self.steps + 1):
                rows = torch.randint(0, len(split.data), (self.batch,), generator=order)
                tokens += int(split.data.lengths[rows].sum())
                logits, targets, _ = self._logits(model, split, rows.to(self.device), stack)
                loss = nn.functional.cross_entropy(logits, targets)
                opt.zero_grad()
                loss.backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                opt.step()
                schedule.step()
                losses.append(float(loss.detach()))
                if bar is not None:
                    bar.update()
                if step in probes:  # eval mode draws no dropout: the run trains as without
                    probe = time.perf_counter()
                    hits, valid = self.teacher_forced(model, "valid")
                    model.train()
                    curve.append(
                        {
                            "step": step,
                            "train_loss": float(np.mean(losses[since:])),
                            "valid_loss": valid,
                            "valid_exact_match": float(hits.mean()),
                        }
                    )
                    since, probing = step, probing + time.perf_counter() - probe
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start - probing
        model.eval()
        tail = losses[-max(1, len(losses) // 10) :]
        return TrainStats(
            float(np.mean(tail)),
            elapsed,
            tokens,
            self.steps * self.batch,
            _memory_figures(samples),
            used,
            curve,
        )

    def teacher_forced(self, model: PeftModel, name: str) -> tuple[np.ndarray, float]:
        """Per problem: is every completion token (the end included) the argmax given
        the ones before it (then greedy decoding writes exactly the completion); and
        the mean cross-entropy over all completion tokens."""
        correct, nats, tokens = self.forced_scores(model, name)
        return correct, float(nats.sum() / tokens)

    @torch.no_grad()
    def forced_scores(
        self, model: nn.Module, name: str, batch: int = 64
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Teacher-forced, per problem: every completion token the argmax, and the
        completion's cross-entropy summed over its tokens (nats); and the token count.
        ``model`` is a PeftModel, or the frozen base itself (no adapter)."""
        split = self.splits[name]
        stack = None
        if self.stack is not None:
            stack = self.stack if model is self.base else self.stack_of(model)
        n = len(split.data)
        correct = np.ones(n, dtype=bool)
        nats = np.zeros(n, dtype=np.float64)
        count = 0
        model.eval()
        for i in range(0, n, batch):
            rows = torch.arange(i, min(i + batch, n))
            logits, targets, problem = self._logits(model, split, rows.to(self.device), stack)
            per_token = nn.functional.cross_entropy(logits, targets, reduction="none")
            np.add.at(nats, problem.numpy(), per_token.double().cpu().numpy())
            count += len(targets)
            correct[problem[(logits.argmax(-1) != targets).cpu()].unique().numpy()] = False
        return correct, nats, count

    def base_nats(self, name: str) -> np.ndarray:
        """The frozen base's summed completion cross-entropy per problem of ``name``
        (computed once): what an adapter's stored information is measured against."""
        if name not in self._base_nats:
            self._base_nats[name] = self.forced_scores(self.base, name)[1]
        return self._base_nats[name]

    @torch.no_grad()
    def generated(self, model: nn.Module, name: str = "test", batch: int = 128) -> np.ndarray:
        """Exact match by greedy ``generate`` on the whole model: the continuation up to
        the end-of-sequence token is the completion (surrounding whitespace aside)."""
        data = self.splits[name].data
        budget = data.completion_tokens() + 4
        with self.autocast:
            rows = greedy_tokens(model, data.prompts(), budget, self.eos, batch)
        return np.array(
            [
                answered(self.tokenizer, row, completion, self.eos)
                for row, (_, completion) in zip(rows, data.items)
            ],
            dtype=bool,
        )


def answered(tokenizer, tokens: list[int], completion: str, eos: int) -> bool:
    """The exact-match verdict on a greedy continuation: it ended with ``eos`` and the
    text before it is the completion."""
    if eos not in tokens:
        return False
    text = tokenizer.decode(tokens[: tokens.index(eos)], skip_special_tokens=True)
    return text.strip() == completion.strip()


@torch.no_grad()
def greedy_tokens(
    model: nn.Module, prompts: list[list[int]], max_new_tokens: int, eos: int, batch: int = 128
) -> list[list[int]]:
    """Each prompt's greedy continuation by ``generate`` (``max_new_tokens``, or up to
    and including ``eos``). Up to ``batch`` prompts go in one call, shortest first, padded
    on the left and masked out (each row's answer is the prompt's own, up to float
    rounding: tests/test_smollm2_runner.py compares): one call per split, where
    batching only prompts of equal length took one per length, each a full decode."""
    model.eval()
    device = next(model.parameters()).device
    # A fresh config: the checkpoint's own (repetition penalties, ...) would not be greedy.
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos
    )
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch):
        indices = order[start : start + batch]
        width = max(len(prompts[i]) for i in indices)
        ids = torch.full((len(indices), width), eos, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(indices):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        rows = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
        )
        for i, row in zip(indices, rows[:, width:].tolist()):
            out[i] = row[: row.index(eos) + 1] if eos in row else row
    return out
