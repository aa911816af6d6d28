"""Load a target and a draft into ready engines: what chat, bench and the demo share.

A draft records its target in `spectool.json`, so `--target` is only needed to override it. The draft is
checked against the target (width, vocabulary, depth, mask token) before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from spectool.chat_format import ChatFormat, Message
from spectool.checkpoint import LoadedDraft, check_against_target, draft_vocab, load_draft
from spectool.decoding.draft_length import DraftLengthController, profile_verify_cost
from spectool.decoding.engine import Engine, target_session
from spectool.decoding.kernels import plan_draft
from spectool.decoding.proposers import make_proposer
from spectool.draft_vocab import VOCAB_FILE
from spectool.errors import SpectoolError, UsageError
from spectool.gguf import progress_line
from spectool.hardware import check_device
from spectool.hub import TargetInfo, load_model_and_tokenizer, resolve_model
from spectool.registry import get, methods
from spectool.target import FrozenTarget, home_device

#: Tokens drafted per round by the EAGLE chains (DFlash / DSpark draft a whole block).
DEFAULT_CHAIN_LENGTH = 6
#: Upper bounds of `--tree TOP_K,DEPTH,TOTAL`: the target verifies TOTAL tokens in one forward and the draft
#: expands TOP_K x TOP_K nodes per level, so unbounded values exhaust memory (upstream EAGLE-2 uses 10,7,60).
MAX_TREE = (64, 64, 1024)


@dataclass
class Runtime:
    """A loaded target (and draft) with a speculative engine and a target-alone engine."""

    info: TargetInfo
    model: Any
    tokenizer: Any
    draft: LoadedDraft | None
    engine: Engine  # speculative when a draft is loaded, else the target alone
    target_engine: Engine  # the target alone through the same loop (the honest baseline)
    stop_token_ids: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    chat: ChatFormat | None = None
    notes: list[str] = field(default_factory=list)  # what the user may want to know, not a problem

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation rendered with the target's chat template, ready for the answer."""
        if self.chat is None:
            raise SpectoolError("the target's tokenizer has no chat template; chat and bench need one")
        return self.chat.prompt_ids([Message(m["role"], m["content"]) for m in messages])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def drafting_every_round(self) -> Runtime:
        """This runtime with an engine whose draft proposes every round (no `--verify auto` controller, no prefix
        scheduler), so every round shows what the draft got accepted."""
        return replace(self, engine=Engine(self.engine.session.target, self.engine.proposer))

    @property
    def max_positions(self) -> int | None:
        """The target's max_position_embeddings: prompt + answer must fit in it (None when the config has none)."""
        limit = self.info.arch.max_position_embeddings
        return limit if isinstance(limit, int) and limit > 0 else None

    def fit_conversation(
        self, system: str | None, history: list[dict[str, str]], user_text: str, max_new_tokens: int
    ) -> FittedPrompt:
        """The prompt of a chat turn within the target's positions: the oldest turns of `history` (user message +
        answer pairs) dropped until a full answer fits; when the message alone leaves room for fewer than
        `max_new_tokens`, the history goes and the answer is capped. A message that leaves no room for an answer
        even alone is a usage error."""
        head = [{"role": "system", "content": system}] if system else []
        user = [{"role": "user", "content": user_text}]
        ids = self.prompt_ids(head + history + user)
        limit = self.max_positions
        if limit is None or len(ids) + max_new_tokens <= limit:
            return FittedPrompt(ids, max_new_tokens, history, 0, limit)
        alone = len(self.prompt_ids(head + user))
        if alone >= limit:
            with_system = " and the system prompt" if system else ""
            raise UsageError(
                f"the prompt is {alone} tokens with the chat template{with_system}, which leaves no room for an answer "
                f"in the target's {limit} positions (max_position_embeddings); shorten it"
            )
        budget, dropped = min(max_new_tokens, limit - alone), 0
        while len(ids) + budget > limit and history:
            history, dropped = history[2:], dropped + 1  # one turn: the user's message and its answer
            ids = self.prompt_ids(head + history + user)
        return FittedPrompt(ids, budget, history, dropped, limit)


@dataclass
class FittedPrompt:
    """A chat turn's prompt fitted into the target's positions (`Runtime.fit_conversation`)."""

    ids: list[int]
    max_new_tokens: int  # the answer's budget: the asked one, or less when the message alone leaves less room
    history: list[dict[str, str]]  # the history kept
    dropped_turns: int  # the oldest turns dropped to fit
    limit: int | None  # the target's positions


def stop_token_ids(model: Any, chat: ChatFormat | None, tokenizer: Any) -> list[int]:
    """End-of-answer ids: the chat template's end-of-turn token, the tokenizer's eos, the generation config's."""
    ids = set(chat.stop_token_ids if chat else [])
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def target_ref_of(draft: LoadedDraft, target: str | None) -> str:
    if target:
        return target
    if draft.metadata and draft.metadata.target:
        ref = draft.metadata.target
        if ref.startswith(("./", "../")):  # relative to the draft (shipped drafts name their shipped target so)
            ref = str((Path(draft.path) / ref).resolve())
        if Path(ref).is_absolute() and not Path(ref).exists():
            raise UsageError(f"the draft's target {ref} no longer exists; pass --target with the model's new location")
        return ref
    raise UsageError(f"{draft.path} does not record its target (no spectool.json); pass --target MODEL")


def load_runtime(
    draft_dir: str | Path | None,
    target: str | None = None,
    *,
    device: str | None = "cpu",
    chain_length: int = DEFAULT_CHAIN_LENGTH,
    verify: str = "full",
    tree: str | None = None,
    device_map: str | None = None,
    max_memory: dict[int | str, int | str] | None = None,
) -> Runtime:
    """Load the draft (if any) and its target, check they fit, and build both engines.

    `verify="auto"` profiles the target's verify cost once and lets the engine choose, each round, how many
    tokens to draft (0: a plain target step) from that cost, the measured drafting time and the running
    acceptance; a DSpark draft with a confidence head also stops each block at its first unprofitable slot.
    `"full"` drafts and verifies as much as the draft offers (or `--max-drafts`). `tree="TOP_K,DEPTH,TOTAL"`
    drafts an EAGLE-2 dynamic tree with an EAGLE-1 / EAGLE-3 draft (greedy or sampled). `device` None picks CUDA
    when available (the target then runs in bfloat16), else the CPU (float32). `device_map` (`--device-map`)
    spreads the target over the GPUs (then the CPU and disk) instead, `max_memory` capping each device; the draft
    then runs where the target's embedding does, and the target through the transformers forward.
    """
    if verify not in ("full", "auto"):
        raise UsageError(f"--verify must be full or auto, got {verify!r}")
    if chain_length < 1:
        raise UsageError(f"--chain-length must be at least 1, got {chain_length}")
    tree_shape = parse_tree(tree) if tree is not None else None
    device = check_device(device) if device_map is None else "cpu"  # the draft's, until the target is placed
    draft = (
        load_draft(draft_dir, device=device, dtype=torch.float32 if device == "cpu" else None) if draft_dir else None
    )
    if draft is None and target is None:
        raise UsageError("give --draft DIR (or --target MODEL to run the target alone)")
    info = resolve_model(target_ref_of(draft, target) if draft else target)
    model, tokenizer = load_model_and_tokenizer(info, device=device, device_map=device_map, max_memory=max_memory)
    if draft is not None and device_map is not None:
        draft.model.to(home_device(model))
    warnings = (list(draft.notes) if draft else []) + placement_notes(model)
    if draft is not None:
        warnings += check_against_target(draft, info.arch, info.tokenizer_length)
        if draft.model.dtype != model.dtype:
            draft.model.to(model.dtype)
    n = info.arch.num_hidden_layers
    ids = (draft.target_layer_ids or [n - 1]) if draft else []
    frozen = FrozenTarget(model, ids)
    if tree_shape and (draft is None or not get(draft.method).supports_tree):
        titles = " or ".join(m.title for m in methods() if m.supports_tree)
        raise UsageError(f"--tree needs an {titles} draft (EAGLE-2 is their dynamic-tree decoding)")
    vocab = draft_vocab(draft) if draft else None
    notes = []
    if vocab is not None:
        notes.append(f"drafting over {vocab.numel():,} of the target's tokens ({VOCAB_FILE}; remove it for all)")
    proposer = (
        make_proposer(draft.method, draft.model, model, num_steps=chain_length, tree=tree_shape, vocab=vocab)
        if draft
        else None
    )
    scheduler = controller = None
    if verify == "auto":
        if proposer is None:
            raise UsageError("--verify auto chooses how many tokens a draft proposes: give --draft DIR")
        profile = profile_verify_cost(target_session(frozen), (proposer.tree_size or proposer.max_drafts) + 1)
        controller = DraftLengthController(
            profile, per_token_drafting=proposer.per_token_drafting, tree=proposer.tree_size is not None
        )
        scheduler = proposer.prefix_scheduler(profile)  # DSpark: cut each block by confidence too
        if scheduler is not None:
            scheduler.follow(controller)
    engine = Engine(frozen, proposer, scheduler, controller)
    if draft is not None and getattr(getattr(engine.session, "kernel_plan", None), "tables", None):
        plan_draft(draft.model, report=progress_line)  # the target's products have a plan: the draft's get theirs
        if getattr(proposer, "lm_head", None) is frozen.lm_head:  # DFlash and EAGLE-1 borrow the target's lm_head:
            proposer.lm_head = engine.session.head_op  # a block's rows through the kernels measured for it
        if getattr(proposer, "vocab_head", None) is not None:  # a draft vocabulary's rows: planned like the draft's
            plan_draft(proposer.vocab_head, report=progress_line)
    target_engine = Engine(FrozenTarget(model, []))
    chat = ChatFormat(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    stops = stop_token_ids(model, chat, tokenizer)
    return Runtime(info, model, tokenizer, draft, engine, target_engine, stops, warnings, chat, notes)


def placement_notes(model: Any) -> list[str]:
    """What a target placed by `--device-map` costs: the transformers forward instead of the lean one when it is
    spread over several devices, and a read of every offloaded module at every forward when some sit on disk."""
    where = list((getattr(model, "hf_device_map", None) or {}).values())
    notes = []
    if len(set(where)) > 1:
        named = [f"cuda:{place}" if isinstance(place, int) else place for place in where]
        places = ", ".join(f"{named.count(place)} on {place}" for place in dict.fromkeys(named))
        notes.append(
            f"the target is spread over several devices ({places} of its modules): it runs the transformers forward, "
            "not spectool's lean one"
        )
    if "disk" in where:
        notes.append(
            "part of the target is offloaded to disk: every forward reads it back, so decoding is slow; free GPU or "
            "CPU memory to keep it off the disk"
        )
    return notes


def parse_tree(text: str) -> tuple[int, int, int]:
    """`--tree TOP_K,DEPTH,TOTAL_TOKENS` (upstream EAGLE-2 uses 10,7,60; small CPU targets prefer ~4,5,16)."""
    try:
        top_k, depth, total = (int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--tree takes TOP_K,DEPTH,TOTAL_TOKENS, e.g. 4,5,16; got {text!r}") from None
    if not all(1 <= value <= cap for value, cap in zip((top_k, depth, total), MAX_TREE, strict=True)):
        k, d, t = MAX_TREE
        raise UsageError(
            f"--tree needs TOP_K in 1..{k}, DEPTH in 1..{d} and TOTAL_TOKENS in 1..{t} (e.g. 10,7,60); got {text!r}"
        )
    return top_k, depth, total
