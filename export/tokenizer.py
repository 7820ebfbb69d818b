"""A real tokenizer for preset checkpoints, made offline: a BPE trained with the `tokenizers` library
on generated text, its vocabulary exactly the config's `vocab_size`, with special tokens, a chat
template and a generation config -- the files a downloaded Jamba checkpoint has, so the text path
(encode, chat template, EOS, streaming decode) runs end to end without a download.

Layout, like AI21's (a SentencePiece-style BPE: `▁` marks a word start, byte fallback when the
vocabulary has room for the 256 byte tokens): pad 0, start-of-text 1, end-of-text 2, unk 3, then the
chat tokens. The end-of-message token takes the second EOS id of the preset's generation config
(Jamba-1.5: 518), so the published EOS list is the tokenizer's own. The corpus is seeded words made of
syllables: the same seed gives the same files."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

from jambatrt.config import JambaConfig

PAD, BOS, EOS, UNK = "<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|unk|>"
SYSTEM, USER, ASSISTANT, EOM = "<|system|>", "<|user|>", "<|assistant|>", "<|eom|>"
SPECIALS = (PAD, BOS, EOS, UNK, SYSTEM, USER, ASSISTANT, EOM)
ALPHABET = string.ascii_letters + string.digits + string.punctuation
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
MIN_MERGES = 16                     # a "BPE" with fewer merges than this teaches nothing
TEST_GENERATION = {"bos_token_id": 1, "eos_token_id": [2, 7], "pad_token_id": 0}    # 7: <|eom|>

# Our own template (not AI21's): BOS, then each message as <|role|>content<|eom|>; the generation
# prompt opens the assistant's turn. Unknown roles are refused by the template itself.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('role ' ~ message['role'] ~ ' (accepted: system, user, assistant)') -}}"
    "{%- endif -%}"
    "{{- '<|' ~ message['role'] ~ '|>' ~ message['content'] ~ '<|eom|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}")

_SYLLABLES = ("ka to mi ra ne su lo pe chi an or ex qu zy ba de fo gu hi ja ko lu ma no pi re sa ti um vo "
              "wa ye zo ing th st er on en al ar").split()


def fits(vocab_size: int) -> bool:
    """Room for the special tokens, the alphabet and some merges."""
    return vocab_size >= len(SPECIALS) + len(ALPHABET) + MIN_MERGES


def special_ids(generation: dict) -> dict[str, int]:
    """Special token -> id: in SPECIALS order from 0, except end-of-message at the second EOS id."""
    eos = generation.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos]
    ids = {tok: i for i, tok in enumerate(SPECIALS)}
    if len(eos) > 1 and isinstance(eos[1], int):
        ids[EOM] = eos[1]
    return ids


def _corpus(n_lines: int, n_words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = sorted({"".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 5))) for _ in range(n_words)})
    weights = [1.0 / (k + 1) for k in range(len(words))]            # Zipf-like: merges have an order
    lines = []
    for i in range(n_lines):
        ws = rng.choices(words, weights, k=rng.randint(4, 16))
        if i % 7 == 0:
            ws[0] = ws[0].capitalize()
        if i % 11 == 0:
            ws.append(str(rng.randint(0, 10 ** rng.randint(1, 6))))
        lines.append(" ".join(ws) + rng.choice(".,;:!?") + (" " + "".join(rng.sample(ALPHABET, 6)) if i % 13 == 0 else ""))
    return lines


def _train(target: int, seed: int):
    """(vocab: token -> rank, merges) of a BPE trained to exactly `target` tokens (alphabet included)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    n_lines, n_words = max(400, target // 2), max(800, 2 * target)
    for _ in range(4):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.train_from_iterator(_corpus(n_lines, n_words, seed),
                                trainers.BpeTrainer(vocab_size=target, initial_alphabet=list(ALPHABET) + ["▁"],
                                                    show_progress=False))
        model = json.loads(tok.to_str())["model"]
        if len(model["vocab"]) == target:
            return model["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
        n_lines, n_words = 2 * n_lines, 2 * n_words            # the corpus ran out of pairs: more text
    raise RuntimeError(f"could not train a BPE of {target} tokens")


def build_tokenizer(vocab_size: int, generation: dict, seed: int = 0):
    """A `tokenizers.Tokenizer` with exactly `vocab_size` ids: specials at `special_ids`, byte tokens
    when they fit, the trained BPE in the remaining ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    specials = special_ids(generation)
    if max(specials.values()) >= vocab_size or len(set(specials.values())) != len(specials):
        raise ValueError(f"special token ids {specials} do not fit a vocabulary of {vocab_size}")
    byte_fallback = vocab_size >= len(SPECIALS) + len(BYTE_TOKENS) + len(ALPHABET) + 4 * MIN_MERGES
    reserved = len(SPECIALS) + (len(BYTE_TOKENS) if byte_fallback else 0)
    trained, merges = _train(vocab_size - reserved, seed)
    taken = set(specials.values())
    free = (i for i in range(vocab_size) if i not in taken)
    vocab = dict(specials)
    for tok in (BYTE_TOKENS if byte_fallback else ()) + tuple(sorted(trained, key=trained.get)):
        vocab[tok] = next(free)
    assert len(vocab) == vocab_size
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=byte_fallback))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, specials[BOS])])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


def write_tokenizer(cfg: JambaConfig, out: str | Path, generation: dict | None = None, seed: int = 0) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json (with the chat template), special_tokens_map.json
    and generation_config.json into `out`; -> the files written ([] when the vocabulary is too small
    for a tokenizer: such a checkpoint exports without one)."""
    if not fits(cfg.vocab_size):
        return []
    out = Path(out)
    generation = dict(generation or TEST_GENERATION)
    build_tokenizer(cfg.vocab_size, generation, seed).save(str(out / "tokenizer.json"))
    roles = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", **roles, "chat_template": CHAT_TEMPLATE,
        "model_max_length": cfg.max_position_embeddings, "clean_up_tokenization_spaces": False}, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(roles, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]
