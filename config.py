"""The model config: Hugging Face `JambaConfig` field names, read from / written to config.json,
plus named presets (gpt-fast style: a dict of dicts)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from jambatrt.errors import ConfigError

# Field types, checked at load (JambaConfig.validate): JSON gives strings, bools, floats, NaN and
# Infinity where a field wants something else, and a dataclass does not check annotations.
_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "attn_layer_period", "expert_layer_period", "num_experts",
                  "num_experts_per_tok", "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_dt_rank",
                  "max_position_embeddings")
_NONNEGATIVE_INTS = ("attn_layer_offset", "expert_layer_offset")
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")
_BOOLS = ("mamba_conv_bias", "mamba_proj_bias", "tie_word_embeddings")
_FLOATS = {"rms_norm_eps": True, "initializer_range": False}     # name -> must be > 0 (else >= 0)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)       # bool is an int subclass: true is not 1 layer


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class JambaConfig:
    vocab_size: int = 65536
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    attn_layer_period: int = 8
    attn_layer_offset: int = 4
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    num_experts: int = 16
    num_experts_per_tok: int = 2
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 262144
    initializer_range: float = 0.02
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    extra: dict = field(default_factory=dict, compare=False, repr=False)  # unknown HF keys, kept on save

    # ---- derived ------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    def is_attention(self, i: int) -> bool:
        return i % self.attn_layer_period == self.attn_layer_offset

    def is_moe(self, i: int) -> bool:
        return self.num_experts > 1 and i % self.expert_layer_period == self.expert_layer_offset

    # Layer counts in closed form: the memory plan must answer for any num_hidden_layers (10^9
    # included) without walking the layers, so a config that cannot fit is refused before anything.
    @staticmethod
    def _every(n: int, period: int, offset: int) -> int:
        """How many i in [0, n) have i % period == offset."""
        return 0 if offset >= n else (n - 1 - offset) // period + 1

    @property
    def num_attention_layers(self) -> int:
        return self._every(self.num_hidden_layers, self.attn_layer_period, self.attn_layer_offset)

    @property
    def num_mamba_layers(self) -> int:
        return self.num_hidden_layers - self.num_attention_layers

    @property
    def num_moe_layers(self) -> int:
        if self.num_experts <= 1:
            return 0
        return self._every(self.num_hidden_layers, self.expert_layer_period, self.expert_layer_offset)

    @property
    def num_dense_layers(self) -> int:
        return self.num_hidden_layers - self.num_moe_layers

    @property
    def attention_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_attention(i)]

    @property
    def mamba_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if not self.is_attention(i)]

    # ---- checks -------------------------------------------------------------------------------
    def validate(self) -> "JambaConfig":
        """Types first (a JSON string or bool where a number belongs is refused, never coerced:
        "false" is a truthy string and would tie the embeddings), then finiteness and ranges, then
        consistency between fields. Every problem names its field."""
        problems = []
        for name in _POSITIVE_INTS:
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                problems.append(f"{name}={v!r} (accepted: an integer >= 1)")
        for name in _NONNEGATIVE_INTS:
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                problems.append(f"{name}={v!r} (accepted: an integer >= 0)")
        for name in _TOKEN_IDS:
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 0):
                problems.append(f"{name}={v!r} (accepted: an integer >= 0, or null)")
        for name in _BOOLS:
            v = getattr(self, name)
            if not isinstance(v, bool):
                problems.append(f"{name}={v!r} (accepted: true or false, as JSON booleans, not strings or numbers)")
        for name, positive in _FLOATS.items():
            v = getattr(self, name)
            if not _is_number(v) or not math.isfinite(v) or (v <= 0 if positive else v < 0):
                problems.append(f"{name}={v!r} (accepted: a finite number {'> 0' if positive else '>= 0'})")
        if problems:
            raise ConfigError("inconsistent config: " + "; ".join(problems))
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size={self.hidden_size} is not a multiple of "
                            f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads={self.num_key_value_heads}")
        if not 0 <= self.attn_layer_offset < self.attn_layer_period:
            problems.append(f"attn_layer_offset={self.attn_layer_offset} (accepted: 0 <= offset < "
                            f"attn_layer_period={self.attn_layer_period})")
        if not 0 <= self.expert_layer_offset < self.expert_layer_period:
            problems.append(f"expert_layer_offset={self.expert_layer_offset} (accepted: 0 <= offset < "
                            f"expert_layer_period={self.expert_layer_period})")
        if self.num_experts_per_tok > self.num_experts:
            problems.append(f"num_experts_per_tok={self.num_experts_per_tok} > num_experts={self.num_experts}")
        if problems:
            raise ConfigError("inconsistent config: " + "; ".join(problems))
        return self

    # ---- HF JSON ------------------------------------------------------------------------------
    def to_hf_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        d.update(self.extra)
        d.update({"model_type": "jamba", "architectures": ["JambaForCausalLM"], "hidden_act": "silu",
                  "torch_dtype": d.get("torch_dtype", "float32")})
        return dict(sorted(d.items()))

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config") -> "JambaConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("model_type", "jamba") != "jamba":
            raise ConfigError(f"{source}: model_type={d.get('model_type')!r} (accepted: 'jamba')")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act={d.get('hidden_act')!r} (accepted: 'silu')")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        hidden = kwargs.get("hidden_size", cls.hidden_size)
        if kwargs.get("mamba_dt_rank") == "auto" and _is_int(hidden):     # else validate() names hidden_size
            kwargs["mamba_dt_rank"] = math.ceil(hidden / 16)
        listed = {}
        for k in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if isinstance(kwargs.get(k), list):  # HF allows lists: the field keeps the first, the list is
                listed[k] = kwargs[k]            # written back as it was (Jamba-1.5: eos [2, 518])
                kwargs[k] = kwargs[k][0] if kwargs[k] else None
            if kwargs.get(k) is None and k in kwargs:
                kwargs.pop(k)
        extra = {k: v for k, v in d.items() if k not in known and k not in ("model_type", "architectures")}
        extra.update(listed)
        try:
            cfg = cls(**kwargs, extra=extra)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None
        try:
            return cfg.validate()
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> "JambaConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json (a Hugging Face checkpoint directory has one)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=str(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")


# Named presets. tiny/small/bench are for tests and CPU sweeps (every block kind present); the
# published ones mirror AI21's config.json field for field (unknown HF keys ride along in `extra` and
# are written back) and are for memory planning: never instantiated in tests.
PRESETS: dict[str, dict] = {
    # layer 1: attention+MoE, layer 3: Mamba+MoE, layers 0,2: Mamba+dense
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, attn_layer_period=4, attn_layer_offset=1,
                 expert_layer_period=2, expert_layer_offset=1, num_experts=4, num_experts_per_tok=2,
                 mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8),
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, attn_layer_period=4, attn_layer_offset=2,
                  expert_layer_period=2, expert_layer_offset=1, num_experts=8, num_experts_per_tok=2,
                  mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=16),
    # 262,144-token prefill in a few GB on CPU: logits 262144 x 256 x 4 B = 256 MiB.
    "bench": dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, attn_layer_period=4, attn_layer_offset=2,
                  expert_layer_period=2, expert_layer_offset=1, num_experts=4, num_experts_per_tok=2,
                  mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8),
    # the checkpoint `make bench-peer` runs against llama.cpp (426e6 parameters, 1.7 GB in float32):
    # big enough that decode reads weights at memory bandwidth, small enough for 16K-token prefills
    # on 2 cores; 8 heads of 128, llama.cpp's Jamba needs mamba_expand 2
    "peer": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=2, attn_layer_period=8, attn_layer_offset=4,
                 expert_layer_period=2, expert_layer_offset=1, num_experts=8, num_experts_per_tok=2,
                 mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=64),
    # Jamba-v0.1: huggingface.co/ai21labs/Jamba-v0.1 config.json, the in-library checkpoint (its PR #43,
    # "Move to in-library checkpoint"); the same fields as the transformers-format conversion
    # huggingface.co/TechxGenus/Jamba-v0.1-hf/config.json (which says torch_dtype float16: AI21 ships bf16).
    # Published: 52B parameters, 12B active (model card; the Open LLM Leaderboard's request records 51.57B).
    "jamba-v0.1": {
        "attention_dropout": 0.0, "attn_layer_offset": 4, "attn_layer_period": 8, "bos_token_id": 1,
        "eos_token_id": 2, "expert_layer_offset": 1, "expert_layer_period": 2, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "mamba_conv_bias": True,
        "mamba_d_conv": 4, "mamba_d_state": 16, "mamba_dt_rank": 256, "mamba_expand": 2, "mamba_proj_bias": False,
        "max_position_embeddings": 262144, "model_type": "jamba", "num_attention_heads": 32, "num_experts": 16,
        "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_logits_to_keep": 1,
        "output_router_logits": False, "pad_token_id": 0, "rms_norm_eps": 1e-06, "router_aux_loss_coef": 0.001,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1", "use_cache": True, "use_mamba_kernels": True, "vocab_size": 65536},
}
# Jamba-1.5-Mini (huggingface.co/ai21labs/AI21-Jamba-1.5-Mini config.json): v0.1's architecture
# exactly; what differs is the chat tuning, so EOS is a list -- end of text (2) and end of message
# (518), as in its config.json (kept by derived checkpoints, e.g. LaferriereJC/jamba_550M_trained, whose
# _name_or_path is AI21-Jamba-1.5-Mini) and in generation_config.json (AI21-Jamba-Large-1.6 lists the
# same [2, 518]). Published: 52B total, 12B active (Jamba-1.5 paper, arXiv 2408.12570; Jamba-tiny-dev's
# model card).
PRESETS["jamba-1.5-mini"] = {**{k: v for k, v in PRESETS["jamba-v0.1"].items() if k != "transformers_version"},
                             "eos_token_id": [2, 518]}
# Jamba-1.5-Large (huggingface.co/ai21labs/AI21-Jamba-1.5-Large config.json): 72 layers (9 attention,
# 36 MoE), hidden 8192, 64 query / 8 KV heads, FFN 24576, dt_rank 512 = 8192 / 16; 16 experts top-2 and
# EOS [2, 518] as Mini. Published: 398B total, 94B active (Jamba-1.5 paper; Jamba-tiny-dev's model card).
PRESETS["jamba-1.5-large"] = {**PRESETS["jamba-1.5-mini"], "hidden_size": 8192, "intermediate_size": 24576,
                              "num_hidden_layers": 72, "num_attention_heads": 64, "mamba_dt_rank": 512}
# Not presets: AI21's small published models, Jamba-tiny-dev (huggingface.co/ai21labs/Jamba-tiny-dev) and
# AI21-Jamba-Reasoning-3B (huggingface.co/ai21labs/AI21-Jamba-Reasoning-3B). Their config.json was looked
# up (issue 17) and could not be read from the sources reachable here: the stored pages hold their file
# listings (config.json 1.01 kB for tiny-dev) and model cards, not the files. What was found:
# tiny-dev's generation_config.json is v0.1's (eos_token_id 2; .../Jamba-tiny-dev/blob/refs%2Fpr%2F1/
# generation_config.json); it has about 319M parameters (the model card of AI21's Jamba-tiny-reward-dev,
# made from it); Reasoning-3B has about 3B parameters, a 256K context and a ChatML-style chat template
# (<|im_start|> / <|im_end|>, <think> reasoning; its model card). Layer count, hidden size, experts,
# periods and vocabulary were not found, so they are not written here: add the presets from the two
# config.json files, field for field, when they can be read (and their totals to PUBLISHED_PARAMS).
# generation_config.json of each published preset (huggingface.co/ai21labs/<model>/generation_config.json);
# the test presets list two EOS ids (end of text, end of message) like Jamba-1.5, so stopping at any of
# several is exercised. Presets written as checkpoints carry these (export/tokenizer.py).
PRESET_GENERATION: dict[str, dict] = {
    "jamba-v0.1": {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
    "jamba-1.5-mini": {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": [2, 518], "pad_token_id": 0},
    "jamba-1.5-large": {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": [2, 518], "pad_token_id": 0},
}
# Published parameter totals (and active per token), as stated in the sources above; `inspect` is
# checked against them (tests/test_text.py).
PUBLISHED_PARAMS: dict[str, tuple[float, float]] = {
    "jamba-v0.1": (52e9, 12e9), "jamba-1.5-mini": (52e9, 12e9), "jamba-1.5-large": (398e9, 94e9)}


def preset(name: str, **overrides) -> JambaConfig:
    """A named preset, optionally with fields overridden (tests vary periods, experts, sizes)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (accepted: {', '.join(sorted(PRESETS))})")
    return JambaConfig.from_hf_dict({**PRESETS[name], **overrides}, source=f"preset {name}")
