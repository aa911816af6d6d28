"""What a draft method is: `DraftMethod`, the one place a method's facts and its method-specific steps live, and
`DraftSpec`, a draft resolved against one target.

A method subclasses `DraftMethod` in its own module (`spectool/methods/<name>.py`) and sets the class facts
(name, title, supported target architectures, on-disk names and keys, defaults) and the references to its
heavier parts (draft model, config, objective, proposer), which are imported only when used, so that the command
line and `spectool inspect` answer without importing torch. The hooks below each hold one method-specific rule;
the defaults are what most methods want. `spectool.registry` collects the methods; nothing outside a method's
own modules asks which method it has.

References are `"module:attribute"` strings or the objects themselves (a method defined in a test passes its
classes directly).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from spectool.errors import SpectoolError, UsageError
from spectool.layers import check_depth
from spectool.methods.options import MethodOption

if TYPE_CHECKING:
    from spectool.arch import TargetArch
    from spectool.layout import Tensor


@dataclass(frozen=True)
class DraftSpec:
    """A draft resolved against one target: its class, feature layers, depth and the method's own shape options
    (`DraftMethod.options` of part "shape", resolved by `DraftMethod.resolve_options`; None = not applicable or
    unknown, as the method says)."""

    method: str
    architecture: str  # the target architecture string that matched the registry
    draft_class: str
    checkpoint_format: str
    num_target_layers: int
    target_layer_ids: tuple[int, ...]
    num_draft_layers: int
    options: dict[str, Any] = field(default_factory=dict)

    def option(self, name: str) -> Any:
        """The resolved value of one of the method's shape options (None when it has none of that name)."""
        return self.options.get(name)


def load_reference(reference: Any) -> Any:
    """The object a `"module:attribute"` reference names (anything else is returned as it is)."""
    if not isinstance(reference, str):
        return reference
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


#: Prefixes published checkpoints put before spectool's module names (DDP `module.`, NeMo AutoModel `model.`).
MODEL_PREFIXES = ("module.", "model.", "draft_model.")


def strip_prefixes(name: str) -> str:
    """A checkpoint key without the wrapper prefixes of `MODEL_PREFIXES`."""
    while name.startswith(MODEL_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def int_list(value: Any, what: str, where: str) -> list[int] | None:
    """A config field that must hold a list of integers (None or empty: None); a one-line error otherwise."""
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise SpectoolError(f"{where}: {what} must be a list of integers, got {value!r}")
    return list(value) or None


def feature_count(config: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]) -> float | None:
    """How many feature layers `fc.weight` takes: its input width over the target's hidden size (None: unknown)."""
    fc = shapes.get("fc.weight")
    width = config.get("target_hidden_size") or config.get("hidden_size")
    if fc is None or len(fc) != 2 or not isinstance(width, int) or width < 1:
        return None
    return fc[1] / width


@dataclass
class PublishedConfig:
    """A draft directory's config.json as loading reads it, with what a method needs to read it: the weights'
    shapes, the file's path (for errors), the target's depth when spectool.json records it, and the notes the
    load shows (a method appends to them)."""

    config: dict[str, Any]
    shapes: Mapping[str, Sequence[int]]
    where: str
    depth: int | None = None
    notes: list[str] = field(default_factory=list)


class DraftMethod(ABC):
    """One speculative-decoding draft method, declared once: facts, defaults and the method-specific steps.

    Subclasses set the class attributes and implement `layout` and `build_config`; `architectures` is copied per instance so that adding a target family is
    a one-line append on the registered method (``registry.get("dflash").architectures["MyForCausalLM"] = ...``).
    """

    #: Short name used on the command line, in spectool.json and in every JSON key (`--method NAME`).
    name: ClassVar[str]
    #: How people write it ("EAGLE-3").
    title: ClassVar[str]
    #: Where it stands in lists (`spectool inspect`, `--method` choices): lower first.
    order: ClassVar[int] = 100
    #: Target `architectures` string -> the draft class built for it.
    supported: ClassVar[Mapping[str, str]]
    #: config.json `architectures` of this method's checkpoints: the first is written, all are read.
    checkpoint_architectures: ClassVar[tuple[str, ...]]
    #: One line on the on-disk layout `init` / `train` write (the published checkpoint layouts).
    checkpoint_format: ClassVar[str]
    #: Keys a loader needs and silently misses otherwise; writing a checkpoint without them is refused.
    required_keys: ClassVar[tuple[str, ...]]
    #: Who loads what `init` / `train` write.
    loaders: ClassVar[str]
    #: `spectool convert --to X` destinations whose layout holds this method's drafts.
    conversions: ClassVar[tuple[str, ...]] = ()
    #: `spectool export --engine X`: how engine X names this method (vLLM's `--speculative-config` "method",
    #: SGLang's `--speculative-algorithm`); engines not named here do not serve it.
    engine_names: ClassVar[dict[str, str]] = {}
    #: vLLM's `speculators convert --algorithm X` for this method's drafts (None: the converter has none).
    speculators_algorithm: ClassVar[str | None] = None
    #: Engines that read Hugging Face `hidden_states` and so serve every feature-layer id (`layers.serving`).
    hf_readers: ClassVar[tuple[str, ...]] = ("spectool",)
    #: Peak learning rate when --lr is not given.
    default_lr: ClassVar[float]
    #: Whether the draft reads chosen target layers (False: the post-norm last hidden state only).
    reads_feature_layers: ClassVar[bool] = True
    #: The number of feature layers the format fixes (None: the user chooses).
    fixed_feature_count: ClassVar[int | None] = None
    #: The number of decoder layers the format fixes (None: --num-draft-layers chooses).
    fixed_draft_layers: ClassVar[int | None] = None
    #: Whether the checkpoint stores copies of target tensors (so `init` must read the target's weights).
    stores_target_tensors: ClassVar[bool] = False
    #: `spectool bench --baselines` names of the method's reference package loops that read its checkpoints.
    package_baselines: ClassVar[tuple[str, ...]] = ()
    #: Whether EAGLE-2's dynamic tree can draft with it (`--tree`).
    supports_tree: ClassVar[bool] = False
    #: Whether the draft scores a full-vocabulary head, which a decode-time draft vocabulary
    #: (`spectool.draft_vocab`, draft_vocab.safetensors) narrows (False: none, or its own, like EAGLE-3's d2t).
    takes_draft_vocab: ClassVar[bool] = False
    #: The method's own options (`spectool.methods.options`): the command line, `TrainConfig`, `DraftSpec` and
    #: the resume check are built from them. Shape options go to `resolve` besides target_layer_ids and
    #: num_draft_layers (`spectool inspect` passes every method's to every method, which ignores others' options);
    #: objective options to the objective's constructor.
    options: ClassVar[tuple[MethodOption, ...]] = ()
    #: Options for a short CPU run on short answers (the demo's), where the published ones are sized for GPUs.
    quick_run_options: ClassVar[dict[str, Any]] = {}
    #: References to the heavier parts, imported on first use.
    draft_model: ClassVar[Any]
    draft_config: ClassVar[Any]
    objective: ClassVar[Any]
    proposer: ClassVar[Any]

    def __init__(self) -> None:
        self.architectures: dict[str, str] = dict(self.supported)

    def __repr__(self) -> str:
        return f"<draft method {self.name}>"

    # -- the draft's shape ----------------------------------------------------------------------------------------

    def default_num_draft_layers(self, num_target_layers: int) -> int:
        """Draft depth when --num-draft-layers is not given."""
        return 1

    def default_layer_ids(self, num_target_layers: int, num_feature_layers: int | None) -> list[int]:
        """The feature-layer ids this method picks for an N-layer target (spectool's numbering)."""
        check_depth(num_target_layers)
        return [num_target_layers - 1]

    def default_feature_count(self, num_target_layers: int, num_draft_layers: int) -> int | None:
        """How many feature layers to pick when --num-feature-layers is not given (None: the rule's default)."""
        return None

    def resolve_options(
        self,
        arch: TargetArch,
        tokenizer_length: int | None,
        options: dict[str, Any],
        *,
        unused_token_id: int | None = None,
    ) -> dict:
        """The method's `DraftSpec` shape fields (block size, mask token, ...) from the options given (None =
        default), checked against the target; usage errors for values that cannot work. ``unused_token_id`` is a
        token id the target's tokenizer holds but chat never produces (`TargetInfo.unused_token_id`), if known."""
        return {}

    @abstractmethod
    def layout(self, spec: DraftSpec, arch: TargetArch) -> list[Tensor]:
        """Every tensor the draft holds or borrows, with its shape and role (`spectool.layout`)."""

    def serving_notes(self, config: Mapping[str, Any], engine: str) -> list[str]:
        """What `spectool export` says about serving a draft with this `config.json` as it is in `engine`."""
        return []

    def speculators_kwargs(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """`speculators convert --algorithm-kwargs` for a draft with this vLLM-layout `config.json`: what the
        converter does not read from the checkpoint itself."""
        return {}

    def notes(self, spec: DraftSpec, *, initialised: bool) -> list[str]:
        """What `inspect` (`initialised` False) and `init` (True) say about a resolved draft beyond its shape."""
        return []

    def shape_phrases(self, spec: DraftSpec, arch: TargetArch) -> list[str]:
        """Method-specific parts of the one-line draft shape `spectool inspect` shows (e.g. "mask token 151669")."""
        return []

    # -- building a draft -----------------------------------------------------------------------------------------

    def model_class(self, config: Mapping[str, Any] | Any) -> type:
        """The draft model class for a draft config (a dict read from config.json, or a config object)."""
        return load_reference(self.draft_model)

    def config_class(self) -> type:
        """The draft's transformers config class."""
        return load_reference(self.draft_config)

    @abstractmethod
    def build_config(self, target_config: Any, ids: list[int] | None, options: dict[str, Any]) -> Any:
        """A draft config on a target whose transformers config is `target_config`: feature layers `ids` (checked),
        `options` = num_draft_layers, the method's shape options given and ``overrides`` (of the config)."""

    def copy_target_tensors(self, draft: Any, weights: Mapping[str, Any], spec: DraftSpec) -> None:
        """Copy the target tensors the format stores (`weights`: `embed_tokens`, `lm_head`) into a new draft."""
        return None  # nothing by default

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def claims(self, config: Mapping[str, Any]) -> bool:
        """Whether a config.json is this method's draft (beyond its `architectures`)."""
        return False

    def claims_by_weights(self, config: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]) -> bool:
        """Whether a checkpoint that names no draft architecture is this method's, told by its weights' shapes."""
        return False

    #: How `checkpoint_key` renames published keys, for the note a load shows ("" when it renames none).
    key_renaming: ClassVar[str] = ""

    def checkpoint_key(self, name: str) -> str:
        """A published checkpoint key (prefixes already removed) as spectool's module names it."""
        return name

    def normalise_config(self, published: PublishedConfig) -> dict[str, Any]:
        """A published config.json as this method's config class reads it (facts kept elsewhere moved where
        spectool expects them, with a note in `published.notes`)."""
        return dict(published.config)

    def config_layer_ids(self, config: Mapping[str, Any]) -> list[int] | None:
        """The feature-layer ids a (normalised) config.json names, or None."""
        return config.get("target_layer_ids") or None

    def check_feature_layers(self, config: Mapping[str, Any], shapes: Mapping[str, Sequence[int]], where: str) -> None:
        """The feature layers config.json names x their width must be what `fc.weight` takes (one-line error)."""
        if not self.reads_feature_layers:
            return
        k = feature_count(config, shapes)
        if k is None:
            return  # no fc.weight (reported as missing) or no width (reported by the config check)
        width = config.get("target_hidden_size") or config.get("hidden_size")
        fc_in = shapes["fc.weight"][1]
        ids = self.config_layer_ids(config)
        if ids:
            if len(ids) * width != fc_in:
                raise SpectoolError(
                    f"{where}: names {len(ids)} feature layers {list(ids)} of width {width} ({len(ids) * width} "
                    f"inputs) but fc.weight takes {fc_in} inputs ({k:g} layers); the layer ids and the weights disagree"
                )
            return
        self.missing_feature_layers(k, fc_in, width, where)

    def missing_feature_layers(self, count: float, fc_in: int, width: int, where: str) -> None:
        """A config.json that names no feature layers: an error unless the method has a rule for it."""
        raise SpectoolError(f"{where}: names no feature layers; a {self.title} config needs target_layer_ids")

    def check_config(self, config: Any) -> None:
        """Reject values of a loaded draft config the draft would only trip over later (a ValueError naming the
        field): by default the sizes and rotary base every transformer draft has."""
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
            value = getattr(config, name, None)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        rope = config.rope_parameters
        theta = rope.get("rope_theta") if isinstance(rope, dict) else None
        if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
            raise ValueError(f"rope_theta (or rope_parameters.rope_theta) must be a positive number, got {theta!r}")

    def adapt_loaded_weights(self, model: Any, tensors: dict[str, Any], notes: list[str]) -> None:
        """Reconcile a checkpoint's tensors with the built model before the strict load (in place)."""
        return None  # nothing by default

    def layer_ids_for_target(self, loaded_ids: list[int], num_target_layers: int) -> tuple[list[int], str] | None:
        """Feature layers for a draft whose config names none (engines' defaults), with the note to show; None
        when the draft's ids are known or the method has no default."""
        return None

    def export_weights(self, model: Any, tensors: dict[str, Any]) -> None:
        """Tensors every loader of the format expects beyond the model's own state (added in place)."""
        return None  # nothing by default

    def export_config(self, config: dict[str, Any], model: Any) -> None:
        """Fields of config.json the engines read beyond the config class's own (set in place)."""
        return None  # nothing by default

    # -- training and decoding -----------------------------------------------------------------------------------

    def objective_class(self) -> type:
        """The training objective's class."""
        return load_reference(self.objective)

    def proposer_class(self) -> type:
        """The decoding proposer's class."""
        return load_reference(self.proposer)

    # -- its options -----------------------------------------------------------------------------------------------

    def option_names(self, part: str | None = None) -> tuple[str, ...]:
        """The names of the method's options (of one part: "shape" or "objective")."""
        return tuple(option.name for option in self.options if part is None or option.part == part)

    def check_option(self, option: str, value: Any, part: str = "shape") -> None:
        """Refuse an option (of `part`) this method does not take when it is given (a usage error naming it)."""
        if value is not None and option not in self.option_names(part):
            raise UsageError(f"--{option.replace('_', '-')} does not apply to {self.title} drafts")

    def check_options(self, values: Mapping[str, Any], *, max_length: int | None = None) -> None:
        """Usage errors for option values out of range or that cannot work together (None = not given);
        ``max_length``: the tokens of a training example, when training."""
        for option in self.options:
            option.check(values.get(option.name))

    def check_spec(self, spec: DraftSpec, target: str) -> None:
        """Refuse (a usage error) to build a draft whose resolved spec lacks what the method cannot default."""
        return None

    def training_notes(self, given: Mapping[str, Any], objective: Any, device_type: str) -> list[str]:
        """What `train` says about the options given (``given``) and the objective built from them on a device."""
        return []

    def block_length(self, config: Mapping[str, Any]) -> int | None:
        """Tokens one draft forward proposes together (a block drafter's block, from its config.json); None for
        drafters that propose a token per forward."""
        return None

    def target_fit_problems(self, config: Any, arch: TargetArch) -> list[str]:
        """What in a loaded draft config does not fit the target, beyond width, vocabulary, depth and layers."""
        return []
